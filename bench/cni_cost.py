"""Part 1, CNI cost: ADD and DEL of ptp+host-local → iamlink against ptp+host-local alone.

cnibench drives both conflists through libcni in one process (the way containerd does), in
batches that alternate which chain goes first, so both see the same machine load. Times are
libcni's AddNetworkList/DelNetworkList calls; creating and removing the pod namespace is not
timed. Each plugin run is timed as well (cnibench's executor), which splits the difference.
iamlinkd runs, as on a node; the pods' namespace has no role, so no STS call competes.
"""

import os
import time

from . import profile
from .stats import median, percentile, ratio

TARGET_OVERHEAD = 0.25
NAMESPACE = "bench-cni"


def _summary(chain):
    add, dele = chain["add_ms"], chain["del_ms"]
    both = [a + d for a, d in zip(add, dele)]
    plugins = {k: median(v) for k, v in chain["plugins_ms"].items()}
    return {"n": len(both), "add_p50": median(add), "add_p99": percentile(add, 99),
            "del_p50": median(dele), "del_p99": percentile(dele, 99),
            "both_p50": median(both), "both_p99": percentile(both, 99), "plugins_p50": plugins}


NFT_WRAPPER = """#!/bin/bash
# Counts and times the plugin's nft runs for the benchmark's diagnosis (bash: no forks to time).
s=$EPOCHREALTIME
{nft} "$@"
rc=$?
echo "$s $EPOCHREALTIME $rc $*" >> {log}
exit $rc
"""


def _nft_calls(b, pods):
    """Runs `pods` ADD+DEL of the iamlink chain with a logging `nft` first in PATH; returns
    (calls per ADD+DEL, median ms per call, {argv: count})."""
    import shutil
    real = shutil.which("nft") or "/usr/sbin/nft"
    wrap_dir = os.path.join(b.node.workdir, "nft-wrapper")
    log = os.path.join(b.node.workdir, "nft-calls.log")
    os.makedirs(wrap_dir, exist_ok=True)
    with open(os.path.join(wrap_dir, "nft"), "w") as f:
        f.write(NFT_WRAPPER.format(nft=real, log=log))
    os.chmod(os.path.join(wrap_dir, "nft"), 0o755)
    env = b.env({"PATH": wrap_dir + ":" + b.env()["PATH"]})
    b.cnibench("cost", ["--conflist", "iamlink=" + b.conflists["iamlink"], "--pods", pods, "--batch", pods,
                        "--namespace", NAMESPACE], timeout=120, env=env)
    calls = []
    if os.path.exists(log):  # absent: no `nft` ran (the plugin speaks nf_tables over netlink)
        with open(log) as f:
            for line in f:
                s, e, rc, *argv = line.split()
                calls.append((float(e) - float(s), " ".join(argv)))
    kinds = {}
    for _, argv in calls:
        kinds[argv] = kinds.get(argv, 0) + 1
    return len(calls) / pods, (median([c[0] * 1000 for c in calls]) if calls else 0.0), kinds


def run(b, quick, want_profile):
    pods, batch = (12, 6) if quick else (200, 25)
    args = ["--conflist", "plain=" + b.conflists["plain"], "--conflist", "iamlink=" + b.conflists["iamlink"],
            "--namespace", NAMESPACE]
    b.cnibench("cost", args + ["--pods", 4, "--batch", 4], timeout=120)  # warm-up, not counted
    t0 = time.monotonic()
    out = b.cnibench("cost", args + ["--pods", pods, "--batch", batch], timeout=600)
    seconds = time.monotonic() - t0
    chains = {c["name"]: _summary(c) for c in out["chains"]}
    plain, iam = chains["plain"], chains["iamlink"]
    over_p50 = ratio(iam["both_p50"], plain["both_p50"]) - 1
    over_p99 = ratio(iam["both_p99"], plain["both_p99"]) - 1
    rows = [
        {"metric": "ADD+DEL median", "value": iam["both_p50"], "unit": "ms", "baseline": plain["both_p50"],
         "ratio": ratio(iam["both_p50"], plain["both_p50"]), "target": "iamlink adds ≤ 25%",
         "met": over_p50 <= TARGET_OVERHEAD},
        {"metric": "ADD+DEL p99", "value": iam["both_p99"], "unit": "ms", "baseline": plain["both_p99"],
         "ratio": ratio(iam["both_p99"], plain["both_p99"]), "target": "iamlink adds ≤ 25%",
         "met": over_p99 <= TARGET_OVERHEAD},
        {"metric": "ADD median", "value": iam["add_p50"], "unit": "ms", "baseline": plain["add_p50"],
         "ratio": ratio(iam["add_p50"], plain["add_p50"])},
        {"metric": "ADD p99", "value": iam["add_p99"], "unit": "ms", "baseline": plain["add_p99"],
         "ratio": ratio(iam["add_p99"], plain["add_p99"])},
        {"metric": "DEL median", "value": iam["del_p50"], "unit": "ms", "baseline": plain["del_p50"],
         "ratio": ratio(iam["del_p50"], plain["del_p50"])},
        {"metric": "DEL p99", "value": iam["del_p99"], "unit": "ms", "baseline": plain["del_p99"],
         "ratio": ratio(iam["del_p99"], plain["del_p99"])},
    ]
    for k in ("iamlink ADD", "iamlink DEL"):
        rows.append({"metric": f"`{k}` plugin run, median", "value": iam["plugins_p50"].get(k), "unit": "ms",
                     "baseline": None, "ratio": None})
    result = {"title": "CNI cost (ADD + DEL, libcni)", "rows": rows, "seconds": seconds,
              "pods": pods, "batch": batch, "chains": chains, "overhead_p50": over_p50, "overhead_p99": over_p99}
    result["met"] = all(r.get("met", True) for r in rows)
    if want_profile:
        result["diagnosis"] = diagnose(b, quick)
    return result


def diagnose(b, quick):
    """nft runs per pod and their time; a system-wide profile of iamlink-chain ADD+DELs by command."""
    d = {}
    per_pod, per_call_ms, kinds = _nft_calls(b, 4 if quick else 20)
    d["nft_pods"] = 4 if quick else 20
    d["nft_calls_per_pod"] = per_pod
    d["nft_ms_per_call"] = per_call_ms
    d["nft_kinds"] = kinds
    if profile.available():
        path = os.path.join(b.node.workdir, "cni.perf")
        rec = profile.Recording(path, max_seconds=120)
        pods = 6 if quick else 60
        t0 = time.monotonic()
        b.cnibench("cost", ["--conflist", "iamlink=" + b.conflists["iamlink"], "--pods", pods, "--batch", pods,
                            "--namespace", NAMESPACE], timeout=300)
        d["profile_seconds"] = time.monotonic() - t0
        rec.stop()
        comms = profile.cpu_by_comm(path)
        ours = ("nft", "iamlink", "ptp", "host-local", "cnibench", "iamlinkd", "tokio-runtime-w", "ip", "nsenter")
        d["profile_pods"] = pods
        d["cpu_ms_per_pod"] = {c: comms.get(c, 0) * 1000 / pods for c in ours}
        d["nft_top"] = profile.top_symbols(path, "nft", 10)
        d["iamlink_top"] = profile.top_symbols(path, "iamlink", 10)
    return d


def explain(r):
    d = r.get("diagnosis") or {}
    iam = r["chains"]["iamlink"]["plugins_p50"]
    plugin_ms = (iam.get("iamlink ADD") or 0) + (iam.get("iamlink DEL") or 0)
    lines = []
    over = r["overhead_p50"]
    lines.append(f"**Result.** iamlink adds {over:.0%} to the median ADD+DEL of the plain chain "
                 f"({r['chains']['iamlink']['both_p50']:.1f} ms against {r['chains']['plain']['both_p50']:.1f} ms; "
                 f"{r['pods']} pods per chain in batches of {r['batch']}). The plugin's own runs take "
                 f"{iam.get('iamlink ADD', 0):.1f} ms (ADD) and {iam.get('iamlink DEL', 0):.1f} ms (DEL), median.")
    if d and not d["nft_calls_per_pod"]:
        lines.append("")
        lines.append(f"**Where the time goes.** With a counting wrapper in front of `nft`, the plugin ran no `nft` "
                     f"in {d.get('nft_pods')} pods' ADD + DEL: it speaks nf_tables over netlink.")
    elif d:
        kinds = "; ".join(f"`nft {k}` ×{v}" for k, v in sorted(d["nft_kinds"].items(), key=lambda kv: -kv[1]))
        kinds += f" (for {d.get('nft_pods')} pods)"
        nft_ms = d["nft_calls_per_pod"] * d["nft_ms_per_call"]
        lines.append("")
        lines.append(f"**Where the time goes.** With a counting wrapper in front of `nft`, the plugin runs `nft` "
                     f"{d['nft_calls_per_pod']:.1f} times per pod (ADD + DEL), median {d['nft_ms_per_call']:.1f} ms per run "
                     f"(each a process that reads the whole ruleset from the kernel before it acts): ≈ {nft_ms:.0f} ms of "
                     f"the plugin's {plugin_ms:.0f} ms. Runs seen: {kinds}.")
        if d.get("cpu_ms_per_pod"):
            cpu = d["cpu_ms_per_pod"]
            parts = ", ".join(f"`{k}` {v:.1f} ms" for k, v in sorted(cpu.items(), key=lambda kv: -kv[1]) if v >= 0.05)
            lines.append("")
            lines.append(f"System-wide CPU profile (`perf record -a -e cpu-clock`, {d['profile_pods']} iamlink-chain "
                         f"pods ADD+DEL), CPU time per pod by command: {parts}.")
            if d.get("nft_top"):
                lines.append("")
                lines.append("Top of `nft`'s own samples (share of all samples): process start-up — page faults and the "
                             "dynamic loader — not rule work:\n\n```\n" + "\n".join(d["nft_top"][:8]) + "\n```")
    if not r["met"] and d and not d["nft_calls_per_pod"]:
        lines.append("")
        lines.append("**What remains.** No `nft` process runs any more; the plugin's own time is its process start, "
                     "the tokio runtime, netlink work in two namespaces, the store's files and the round trip to "
                     "iamlinkd, and iamlinkd's guard rereads the store and the table after every nf_tables change "
                     "(part 8), which competes with ADD and DEL for the CPU.")
    elif not r["met"]:
        per = d.get("nft_ms_per_call") or 0
        runs = d.get("nft_calls_per_pod") or 0
        budget = 0.25 * r["chains"]["plain"]["both_p50"]
        lines.append("")
        lines.append(
            "**Proposed fix.** Stop spawning `nft`. Every run is a process start (dynamic loading and page faults, "
            "the top of the profile above) plus a dump of the ruleset, and runs under the store's `flock`, so it "
            "also serializes churn (part 6). `common/src/intercept.rs` is the only code that runs `nft`: let it send "
            "each command's changes as one nf_tables netlink batch (add/delete the map element and the slot chain; "
            "the map listing becomes one element dump) over a netlink socket — e.g. the `rustables` or `nftnl` "
            "crates, or a small NFNL batch writer next to the rtnetlink code the plugin already has. "
            + (f"Expected effect: ≈ {runs:.0f} × {per:.1f} ms ≈ {runs * per:.0f} ms off the plugin's "
               f"{plugin_ms:.0f} ms per ADD+DEL. The target allows iamlink {budget:.0f} ms (25 % of the plain "
               f"chain's {r['chains']['plain']['both_p50']:.0f} ms); what remains after that is the plugin's "
               "process start, netlink, store writes and libcni's handling of one more plugin."
               if d else "The full run measures the runs per pod and their cost."))
    return "\n".join(lines)

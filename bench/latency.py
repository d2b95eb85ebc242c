"""Part 2, cached credential answers: wrk in pod namespaces against iamlinkd through the real
interception path, and against a bare hyper server on the same node, side by side.

Path to iamlinkd: pod eth0 → veth → node prerouting, table inet iamlink (mark from the ingress
interface, DNAT to 198.18.0.1:8181) → iamlinkd (mark → slot → record → role → cache → JSON).
Path to the baseline: the same pods, veths and conntrack, and a DNAT at the same hook and priority
(table inet iamlink_bench: 198.18.0.254:80 → 198.18.0.3:8182) → bare_server, which answers the
same bytes iamlinkd answered with the same hyper settings and nothing else. So the ratio prices
exactly what iamlinkd does per request (and the two extra rule evaluations per new connection).

Runs alternate between the servers and repeat; every wrk is bounded by -d and a timeout. The
servers' CPU time per request comes from /proc/<pid>/stat, which is less sensitive to the other
tenants of the machine than latency is.
"""

import json
import os
import subprocess
import time

from . import profile
from .node import BARE_HOST, BARE_PORT, BARE_VIP, REPO
from .stats import median, percentile, ratio

ROLE = "bench-lat"
NAMESPACE = "bench-lat"
PATH = f"/latest/meta-data/iam/security-credentials/{ROLE}"
IMDS = "169.254.169.254"
WRK_LUA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "wrk_report.lua")
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def wrk_all(pods, host, conns, seconds, close, pid):
    """One wrk per pod at once; returns the merged result."""
    procs = []
    c0 = cpu_seconds(pid)
    for p in pods:
        argv = ["ip", "netns", "exec", p["netns"], "wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--timeout", "2s",
                "-s", WRK_LUA]
        if close:
            argv += ["-H", "Connection: close"]
        argv.append(f"http://{host}{PATH}")
        procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=seconds + 30)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
        lines = [l for l in out.splitlines() if l.startswith("{")]
        if p.returncode != 0 or not lines:
            raise RuntimeError(f"wrk failed ({p.returncode}): {err.strip()[-500:]} {out[-500:]}")
        outs.append(json.loads(lines[-1]))
    cpu = cpu_seconds(pid) - c0
    requests = sum(o["requests"] for o in outs)
    errors = sum(sum(o["errors"].values()) for o in outs)
    return {
        "rps": sum(o["requests"] / (o["duration_us"] / 1e6) for o in outs),
        "requests": requests,
        "errors": errors,
        "p50_ms": median([o["latency_us"]["p50"] / 1000 for o in outs]),
        "p99_ms": max(o["latency_us"]["p99"] / 1000 for o in outs),
        "p999_ms": max(o["latency_us"]["p999"] / 1000 for o in outs),
        "cpu_us_per_req": cpu * 1e6 / requests if requests else None,
        "raw": outs,
    }


class BareServer:
    """bare_server on 198.18.0.3:8182 answering `body` on `path`, reached from pods at
    198.18.0.254:80 through a DNAT of the bench's own table."""

    def __init__(self, b, body, path=PATH):
        self.b = b
        body_path = os.path.join(b.node.workdir, "bare-body")
        with open(body_path, "wb") as f:
            f.write(body)
        log = open(os.path.join(b.node.workdir, "bare-server.log"), "ab")
        self.proc = b.node.spawn([b.bare_server, "--listen", f"{BARE_HOST}:{BARE_PORT}", "--path", path,
                                  "--body", body_path], stdout=log, stderr=log)
        log.close()
        b.node.exec(["nft", "-f", "-"], input=(
            "table inet iamlink_bench {\n"
            "  chain prerouting {\n"
            "    type nat hook prerouting priority dstnat - 10; policy accept;\n"
            f"    ip daddr {BARE_VIP} tcp dport 80 dnat ip to {BARE_HOST}:{BARE_PORT}\n"
            "  }\n"
            "}\n"))
        from harness import wait_until
        wait_until(lambda: b.node.can_connect(BARE_HOST, BARE_PORT), 20, "bare_server listening")

    @property
    def pid(self):
        return self.proc.pid

    def close(self):
        from harness.util import stop_process
        stop_process(self.proc, timeout=5)
        self.b.node.forget(self.proc)
        self.b.node.exec(["nft", "delete", "table", "inet", "iamlink_bench"], check=False)


def fetch(netns, url):
    p = subprocess.run(["ip", "netns", "exec", netns, "curl", "-sS", "--noproxy", "*", "-m", "5",
                        "-w", "\n%{http_code}", url], capture_output=True, timeout=20)
    body, _, code = p.stdout.rpartition(b"\n")
    return int(code or 0), body


CONFIGS = [
    # (key, label, pods, connections per pod, Connection: close)
    ("ka-load", "keep-alive, 4 pods × 2 connections", 4, 2, False),
    ("ka-single", "keep-alive, 1 pod × 1 connection", 1, 1, False),
    ("close-load", "new connection per request, 4 pods × 2 connections", 4, 2, True),
]


def measure(b, pods, bare, seconds, reps, configs=CONFIGS):
    results = {}
    for key, label, npods, conns, close in configs:
        runs = []
        for rep in range(reps):
            order = [("iamlinkd", IMDS, b.daemon.pid), ("bare", BARE_VIP, bare.pid)]
            if rep % 2:
                order.reverse()
            pair = {}
            for name, host, pid in order:
                pair[name] = wrk_all(pods[:npods], host, conns, seconds, close, pid)
            runs.append(pair)
        agg = {}
        for name in ("iamlinkd", "bare"):
            rs = [r[name] for r in runs]
            agg[name] = {k: median([r[k] for r in rs]) for k in ("rps", "p50_ms", "p99_ms", "p999_ms", "cpu_us_per_req")}
            agg[name]["errors"] = sum(r["errors"] for r in rs)
            agg[name]["requests"] = sum(r["requests"] for r in rs)
        agg["rps_ratio"] = median([ratio(r["iamlinkd"]["rps"], r["bare"]["rps"]) for r in runs])
        agg["label"] = label
        agg["runs"] = [{n: {k: v for k, v in r[n].items() if k != "raw"} for n in r} for r in runs]
        results[key] = agg
    return results


# iamlinkd's per-pod token bucket (default 500 requests/s, burst 1,000) answers a load generator
# with 429 by design. It is set so high here that it never refuses but still runs on every request.
UNLIMITED = {"requests_per_second": 1_000_000_000, "burst": 1_000_000_000}


def run(b, quick, want_profile):
    b.daemon.limits = UNLIMITED
    b.daemon.restart()
    try:
        return _run(b, quick, want_profile)
    finally:
        b.daemon.limits = None
        b.daemon.restart()


def _run(b, quick, want_profile):
    npods = 4
    seconds, reps = (1, 1) if quick else (5, 3)
    spec = os.path.join(b.node.workdir, "latency-spec.json")
    with open(spec, "w") as f:
        json.dump([{"namespace": NAMESPACE, "name": f"lat-{i}", "role": ROLE} for i in range(npods)], f)
    hold = b.cnibench_interactive("hold", ["--conflist", b.conflists["iamlink"], "--spec", spec, "--role", ROLE])
    bare = None
    try:
        pods = hold.next(120)["pods"]
        # Every pod's credentials cached before measuring (prefetch), checked by the answers.
        status, body = fetch(pods[0]["netns"], f"http://{IMDS}{PATH}")
        if status != 200:
            raise RuntimeError(f"iamlinkd answered {status}: {body[:200]!r}")
        akid = json.loads(body)["AccessKeyId"]
        owner = [c for c in b.sts_calls() if c.get("akid") == akid]
        if not owner or owner[0]["session"] != f"{NAMESPACE}.{pods[0]['name']}":
            raise RuntimeError(f"answer's key {akid} is not pod {pods[0]['name']}'s session: {owner}")
        bare = BareServer(b, body)
        status, bare_body = fetch(pods[0]["netns"], f"http://{BARE_VIP}{PATH}")
        if status != 200 or len(bare_body) != len(body):
            raise RuntimeError(f"bare server answered {status} with {len(bare_body)} bytes")
        for p in pods:
            fetch(p["netns"], f"http://{IMDS}{PATH}")
        calls_before = len(b.sts_calls())
        t0 = time.monotonic()
        res = measure(b, pods, bare, seconds, reps)
        seconds_spent = time.monotonic() - t0
        sts_during = len(b.sts_calls()) - calls_before
        result = {"title": "Cached credential answer (wrk from pod namespaces)", "configs": res,
                  "sts_calls_during": sts_during, "body_bytes": len(body), "seconds": seconds_spent,
                  "wrk_seconds": seconds, "reps": reps}
        probes = probe_all(b, pods[:2], quick)
        result["probes"] = probes
        rows = []
        for key, cfg in res.items():
            i, bb = cfg["iamlinkd"], cfg["bare"]
            targeted = key == "ka-load"
            rows.append({"metric": f"throughput, {cfg['label']}", "value": i["rps"], "unit": "req/s",
                         "baseline": bb["rps"], "ratio": cfg["rps_ratio"],
                         **({"target": "≥ 0.8× bare", "met": cfg["rps_ratio"] >= 0.8} if targeted else {})})
            rows.append({"metric": f"p50 latency, {cfg['label']}", "value": i["p50_ms"], "unit": "ms",
                         "baseline": bb["p50_ms"], "ratio": ratio(i["p50_ms"], bb["p50_ms"])})
            rows.append({"metric": f"p99 latency, {cfg['label']}", "value": i["p99_ms"], "unit": "ms",
                         "baseline": bb["p99_ms"], "ratio": ratio(i["p99_ms"], bb["p99_ms"]),
                         **({"target": "≤ 1 ms", "met": i["p99_ms"] <= 1.0} if targeted else {})})
            rows.append({"metric": f"server CPU per request, {cfg['label']}", "value": i["cpu_us_per_req"],
                         "unit": "µs", "baseline": bb["cpu_us_per_req"],
                         "ratio": ratio(i["cpu_us_per_req"], bb["cpu_us_per_req"])})
        for key, pr in probes.items():
            i, bb = pr["iamlinkd"], pr["bare"]
            rows.append({"metric": f"p50 latency, {pr['label']}", "value": i["p50_ms"], "unit": "ms",
                         "baseline": bb["p50_ms"], "ratio": ratio(i["p50_ms"], bb["p50_ms"])})
            rows.append({"metric": f"p99 latency, {pr['label']}", "value": i["p99_ms"], "unit": "ms",
                         "baseline": bb["p99_ms"], "ratio": ratio(i["p99_ms"], bb["p99_ms"]),
                         "target": "≤ 1 ms", "met": i["p99_ms"] <= 1.0})
        errors = sum(pr[n]["errors"] for pr in probes.values() for n in ("iamlinkd", "bare"))
        errors += sum(cfg[n]["errors"] for cfg in res.values() for n in ("iamlinkd", "bare"))
        rows.append({"metric": "non-2xx answers and socket errors (all runs)", "value": errors, "unit": "",
                     "baseline": None, "ratio": None, "target": "0", "met": errors == 0, "check": True})
        rows.append({"metric": "STS calls during the runs", "value": sts_during, "unit": "", "baseline": None,
                     "ratio": None, "target": "0 (all answers cached)", "met": sts_during == 0, "check": True})
        result["rows"] = rows
        result["met"] = all(r.get("met", True) for r in rows)
        if want_profile:
            result["diagnosis"] = diagnose(b, pods, bare, quick)
        return result
    finally:
        if bare is not None:
            bare.close()
        hold.close()


PROBES = [
    # (key, label, keep-alive)
    ("probe-ka", "2 pods × 500 req/s, keep-alive", True),
    ("probe-new", "2 pods × 500 req/s, new connection per request", False),
]


def probe_all(b, pods, quick):
    """Fixed-rate requests (cnibench probe), alternating servers; exact percentiles of all samples."""
    count = 500 if quick else 2500
    reps = 1 if quick else 2
    out = {}
    for key, label, keepalive in PROBES:
        samples = {"iamlinkd": [], "bare": []}
        errors = {"iamlinkd": 0, "bare": 0}
        for rep in range(reps):
            order = [("iamlinkd", IMDS), ("bare", BARE_VIP)]
            if rep % 2:
                order.reverse()
            for name, host in order:
                args = ["--host", host, "--path", PATH, "--rate", 500, "--count", count,
                        "--request-timeout", "2s", "--deadline", f"{count // 500 + 60}s"]
                for p in pods:
                    args += ["--target", p["netns"]]
                if keepalive:
                    args.append("--keepalive")
                for r in b.cnibench("probe", args, timeout=count // 500 + 90):
                    samples[name] += r["latency_ms"]
                    errors[name] += r["errors"] + sum(n for st, n in r["statuses"].items() if st != "200")
        out[key] = {"label": label, **{n: {"p50_ms": median(samples[n]), "p99_ms": percentile(samples[n], 99),
                                           "p999_ms": percentile(samples[n], 99.9), "n": len(samples[n]),
                                           "errors": errors[n]} for n in samples}}
    return out


G = r"(<.*>)?"  # generic parameters in a symbol, e.g. answer<iamlinkd::creds::sts::Sts, ...>
PATTERNS = [
    ("identify: mark → slot → record (`identify::identify`)", rf"^iamlinkd::request::identify::identify{G}$"),
    ("  of which reading + parsing the record file (`store::read_record`)", r"^iamlink_common::store::read_record$"),
    ("per-answer log line (tracing fmt `Subscriber::event`)",
     r"^<tracing_subscriber::fmt::Subscriber<.*> as tracing_core::subscriber::Subscriber>::event$"),
    ("answering from the cache (`imds::execute`)", rf"^iamlinkd::request::imds::execute{G}::\{{\{{closure\}}\}}$"),
    ("  of which rendering the JSON (`render_credentials`)", rf"^iamlinkd::request::imds::render_credentials{G}$"),
    ("  of which the cache lookup (`Cache::get`)", rf"^iamlinkd::creds::cache::Cache<.*>::get{G}::\{{\{{closure\}}\}}$"),
    ("writing answers to sockets (`writev`)", r"^__GI___writev$|^__writev$|^writev$"),
    ("reading requests from sockets (`recvfrom`)", r"^__libc_recv$|^__libc_recvfrom$|^recvfrom$|^__GI___recvfrom$"),
]


def syscalls_per_request(b, pods, bare, seconds):
    """System calls per answer of each server under the keep-alive load (strace -c, 2 s)."""
    import shutil
    if not shutil.which("strace"):
        return None
    out = {}
    for name, host, pid in (("iamlinkd", IMDS, b.daemon.pid), ("bare", BARE_VIP, bare.pid)):
        procs = [subprocess.Popen(["ip", "netns", "exec", p["netns"], "wrk", "-t1", "-c2", "-d4s", "--timeout", "2s",
                                   "-s", WRK_LUA, f"http://{host}{PATH}"], stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True) for p in pods]
        try:
            time.sleep(1)
            st = subprocess.run(["timeout", "-s", "INT", "2", "strace", "-c", "-f", "-p", str(pid)],
                                capture_output=True, text=True, timeout=30).stderr
        finally:
            for p in procs:
                try:
                    p.communicate(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
        calls = {}
        for line in st.splitlines():
            f = line.split()
            if len(f) >= 5 and f[0].replace(".", "").isdigit() and f[-1] != "total":
                calls[f[-1]] = int(f[3])
        # Answers counted by the socket writes (one writev per answer for both servers).
        answers = calls.get("writev") or 1
        out[name] = {k: v / answers for k, v in sorted(calls.items(), key=lambda kv: -kv[1]) if v / answers >= 0.05}
    return out


def diagnose(b, pods, bare, quick):
    """A DWARF call-graph profile of iamlinkd under the keep-alive load; and the same load with
    iamlinkd's per-answer log lines off (IAMLINKD_LOG=warn), to price that step."""
    d = {}
    seconds = 2 if quick else 5
    if profile.available():
        path = os.path.join(b.node.workdir, "iamlinkd.perf")
        procs = []
        rec = None
        try:
            for p in pods:
                procs.append(subprocess.Popen(
                    ["ip", "netns", "exec", p["netns"], "wrk", "-t1", "-c2", f"-d{seconds + 2}s", "--timeout", "2s",
                     f"http://{IMDS}{PATH}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            time.sleep(1)
            rec = profile.Recording(path, pid=b.daemon.pid, callgraph=True)
            time.sleep(seconds)
        finally:
            if rec:
                rec.stop()
            for p in procs:
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
        d["iamlinkd_children"] = profile.children_of(path, PATTERNS)
        d["iamlinkd_top"] = profile.top_symbols(path, None, 14)
    d["syscalls"] = syscalls_per_request(b, pods, bare, seconds)
    # The log's price: restart iamlinkd with per-answer lines off, measure the keep-alive load again.
    b.daemon.log_level = "warn"
    try:
        answered = sum(1 for c in b.sts_calls() if "answered" in c)
        b.daemon.restart()
        b.wait_sts_answers(answered + len(pods), 30, "prefetch after restart")
        for p in pods:
            fetch(p["netns"], f"http://{IMDS}{PATH}")
        res = measure(b, pods, bare, 1 if quick else 5, 1 if quick else 3, configs=CONFIGS[:1])
        d["no_log"] = res["ka-load"]
    finally:
        b.daemon.log_level = None
        answered = sum(1 for c in b.sts_calls() if "answered" in c)
        b.daemon.restart()
        b.wait_sts_answers(answered + len(pods), 30, "prefetch after restart")
    return d


def explain(r):
    c = r["configs"]
    load = c["ka-load"]
    lines = [f"**Result.** Under the keep-alive load iamlinkd answers {load['iamlinkd']['rps']:,.0f} req/s against the "
             f"bare server's {load['bare']['rps']:,.0f} ({load['rps_ratio']:.2f}×) and spends "
             f"{load['iamlinkd']['cpu_us_per_req']:.1f} µs of CPU per answer against {load['bare']['cpu_us_per_req']:.1f} µs. "
             f"The answer body is {r['body_bytes']} bytes for both. Latency tails: both servers share 2 cores with 4 wrk "
             "threads and with the machine's other tenants, so p99 under saturation measures the scheduler more than "
             "the server — compare iamlinkd's p99 with the bare server's in the same row. The fixed-rate probes "
             "(cnibench, 500 req/s per pod, every request timed) show the latency without self-inflicted queueing."]
    d = r.get("diagnosis") or {}
    if d.get("syscalls"):
        sc = d["syscalls"]
        fmt_sc = lambda m: ", ".join(f"`{k}` {v:.2f}" for k, v in m.items())
        lines.append("")
        lines.append(f"**System calls per answer** (strace -c, 2 s under the same load): iamlinkd {fmt_sc(sc['iamlinkd'])}; "
                     f"bare server {fmt_sc(sc['bare'])}.")
    if d.get("iamlinkd_children"):
        lines.append("")
        lines.append("**Where iamlinkd's time goes** (perf, DWARF call graphs, share of iamlinkd's samples including "
                     "callees):\n")
        lines.append("| step | share |\n|---|---|")
        for label, share in d["iamlinkd_children"]:
            lines.append(f"| {label} | {share:.1f} % |" if share is not None else f"| {label} | not in the samples |")
        if d.get("iamlinkd_top"):
            lines.append("")
            lines.append("Top self-time symbols of iamlinkd in the same profile:\n\n```\n"
                         + "\n".join(d["iamlinkd_top"][:12]) + "\n```")
    if d.get("no_log"):
        nl = d["no_log"]
        lines.append("")
        lines.append(f"With iamlinkd's per-answer log lines off (`IAMLINKD_LOG=warn`, iamlinkd restarted), the same "
                     f"load costs iamlinkd {nl['iamlinkd']['cpu_us_per_req']:.1f} µs of CPU per answer (bare server "
                     f"{nl['bare']['cpu_us_per_req']:.1f} µs) and gives {nl['iamlinkd']['rps']:,.0f} req/s against "
                     f"{nl['bare']['rps']:,.0f} ({nl['rps_ratio']:.2f}×): the log line's price per answer is the "
                     f"CPU difference to the run above, {load['iamlinkd']['cpu_us_per_req'] - nl['iamlinkd']['cpu_us_per_req']:.1f} µs.")
    if not r["met"]:
        share = {k: v for k, v in (d.get("iamlinkd_children") or []) if v}
        ident = share.get("identify: mark → slot → record (`identify::identify`)")
        logs = share.get("per-answer log line (tracing fmt `Subscriber::event`)")
        pct = lambda x: f" (≈ {x:.0f} % of iamlinkd's CPU here)" if x is not None else ""
        lines.append("")
        lines.append(
            "**Proposed fix** (iamlinkd, request path; the per-slot record cache, the batched log writer, static metric "
            "labels and bodies rendered once per credentials are in):\n\n"
            f"1. Identification{pct(ident)}: the slot link's `readlink` and the record's `statx` per request are what "
            "keeps an answer from ever being decided from a view that lags behind churn; they stay.\n"
            f"2. The audit line (`node-server/src/request/imds.rs` `answer`){pct(logs)}: with `audit_log` set, each "
            "credential answer is formatted twice, for the audit file and for stderr (documented in "
            "`conf/iamlinkd.toml`); one copy saved ≈ 10 µs per answer in a release-build measurement: a behaviour change to "
            "decide, not a tuning.\n"
            "3. `node-server/src/role`: the granted role is parsed (`Role::parse`) on every request; keep it parsed "
            "with the cached record.\n"
            "4. `node-server/src/main.rs` binds with the default listen backlog (128, see part 4): take "
            "`tokio::net::TcpSocket`, `listen(4096)`.\n\n"
            "Throughput under saturation is bounded by CPU on this 2-core machine (wrk and the server share it), "
            f"so CPU per answer is the number to drive down: iamlinkd spends "
            f"{load['iamlinkd']['cpu_us_per_req'] - load['bare']['cpu_us_per_req']:.1f} µs more per answer than the bare "
            "server, and that gap is the throughput gap.")
    return "\n".join(lines)

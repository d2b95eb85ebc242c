"""Part 5, memory: iamlinkd's resident set with 250 pods of 50 roles, every pod's credentials
cached, against a freshly started iamlinkd with no pods. VmRSS from /proc/<pid>/status.

iamlinkd is restarted first (no pods exist then), so the baseline is a fresh process with the
same config. The pods come through the real chain; each pod's prefetch fills its cache entry
(waited for at the STS proxy), and one request per pod checks that every answer is the pod's own.
Then two steps of bench/view_memory.py: the RSS 30 s after a 1,000-connection burst, and the
Kubernetes view's memory at 5,000 namespaces and 20,000 service accounts.
"""

import json
import os
import time

from . import view_memory
from .stats import mib

ROLES = 50
PER_ROLE = 5


def spec(quick):
    roles, per = (5, 4) if quick else (ROLES, PER_ROLE)
    return [{"namespace": f"mem-{r:02d}", "name": f"pod-{i}", "role": f"mem-role-{r:02d}"}
            for r in range(roles) for i in range(per)]


def pod_roles():
    return [{"namespace": f"mem-{r:02d}", "role": f"mem-role-{r:02d}"} for r in range(ROLES)]


def role_names():
    return [f"mem-role-{r:02d}" for r in range(ROLES)]


def run(b, quick, want_profile):
    pods = spec(quick)
    answered0 = sum(1 for c in b.sts_calls() if "answered" in c)
    worn = b.daemon.status()  # the daemon that served every earlier part, before its restart
    b.daemon.restart()
    time.sleep(1.0)  # let the fresh process settle (first scan, runtime threads)
    fresh = b.daemon.status()
    path = os.path.join(b.node.workdir, "memory-spec.json")
    with open(path, "w") as f:
        json.dump(pods, f)
    hold = b.cnibench_interactive("hold", ["--conflist", b.conflists["iamlink"], "--spec", path,
                                           "--parallelism", 2, "--deadline", "600s"])
    try:
        ready = hold.next(300)
        calls = b.wait_sts_answers(answered0 + len(pods), 120, f"{len(pods)} prefetches answered")
        hold.send("request")
        answers = hold.next(120)
        time.sleep(0.5)
        loaded = b.daemon.status()
        smaps = smaps_rollup(b.daemon.pid)
    finally:
        hold.close()
    owner = {c.get("akid"): c["session"] for c in calls if c.get("akid")}
    wrong = sum(1 for t in answers["pods"]
                if t["statuses"] != {"200": 1} or any(owner.get(k) != f"{t['namespace']}.{t['name']}" for k in t["akids"]))
    nroles = len({p["role"] for p in pods})
    burst_rows, burst = view_memory.burst_recovery(b, quick)
    view_rows, view = view_memory.view_at_scale(b, quick)
    rows = [
        {"metric": f"iamlinkd VmRSS, {len(pods)} pods / {nroles} roles cached",
         "value": f"{mib(loaded['VmRSS']):.2f} MiB ({loaded['VmRSS'] * 1024 / 1e6:.2f} MB)", "unit": "",
         "baseline": f"{mib(fresh['VmRSS']):.2f} MiB", "ratio": loaded["VmRSS"] / fresh["VmRSS"], "target": "≤ 15 MB",
         "met": loaded["VmRSS"] * 1024 <= 15e6},
        {"metric": "iamlinkd VmHWM (peak RSS)", "value": mib(loaded["VmHWM"]), "unit": "MiB",
         "baseline": mib(fresh["VmHWM"]), "ratio": loaded["VmHWM"] / fresh["VmHWM"]},
        {"metric": "anonymous memory (RssAnon)", "value": mib(loaded.get("RssAnon")), "unit": "MiB",
         "baseline": mib(fresh.get("RssAnon")), "ratio": None},
        {"metric": "file-backed (RssFile: the binary's pages)", "value": mib(loaded.get("RssFile")), "unit": "MiB",
         "baseline": mib(fresh.get("RssFile")), "ratio": None},
        {"metric": "iamlinkd VmRSS / VmHWM after the earlier parts (load, 1,000 connections, churn), 0 pods",
         "value": f"{mib(worn['VmRSS']):.1f} / {mib(worn['VmHWM']):.1f}", "unit": "MiB", "baseline": None, "ratio": None},
        {"metric": "pods whose answer was not 200 with their own key", "value": wrong, "unit": f"of {len(pods)}",
         "baseline": None, "ratio": None, "target": "0", "met": wrong == 0, "check": True},
    ] + burst_rows + view_rows
    return {"title": "Memory (iamlinkd RSS)", "rows": rows, "met": all(r.get("met", True) for r in rows),
            "burst": burst, "view": view,
            "fresh": fresh, "loaded": loaded, "worn": worn, "smaps": smaps, "pods": len(pods), "roles": nroles,
            "add_seconds": ready.get("seconds"), "threads": loaded.get("Threads")}


def smaps_rollup(pid):
    out = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                k, _, v = line.partition(":")
                if v.strip().endswith("kB"):
                    out[k.strip()] = int(v.split()[0])
    except OSError:
        pass
    return out


def explain(r):
    f, l = r["fresh"], r["loaded"]
    per_pod = (l["RssAnon"] - f["RssAnon"]) / r["pods"]
    lines = [f"**Result.** {r['pods']} pods of {r['roles']} roles with credentials cached add "
             f"{(l['VmRSS'] - f['VmRSS']) / 1024:.1f} MiB to a fresh iamlinkd ({f['VmRSS'] / 1024:.1f} → "
             f"{l['VmRSS'] / 1024:.1f} MiB; {l['VmRSS'] * 1024 / 1e6:.1f} MB), ≈ {per_pod:.1f} KiB of heap per pod. "
             f"Most of the resident set is file-backed: {l['RssFile'] / 1024:.1f} MiB of the binary's pages (its .text "
             "is ≈ 11 MB, mostly the AWS SDK; these pages are shared page cache, not private memory), against "
             f"{l['RssAnon'] / 1024:.1f} MiB of anonymous memory. {l.get('Threads')} threads."]
    w = r.get("worn")
    if w:
        lines.append("")
        lines.append(f"The daemon that served the earlier parts had grown to {w['VmRSS'] / 1024:.1f} MiB "
                     f"(peak {w['VmHWM'] / 1024:.1f} MiB) with no pods left: the allocator keeps what the load and "
                     "the 1,000 concurrent connections of part 4 took (hyper buffers per connection); iamlinkd "
                     "caps malloc at two arenas and returns freed memory every 10 s (`node-server/src/memory.rs`), "
                     "so what stays is what the allocator could not hand back (fragmentation) and the peak.")
    bu, v = r.get("burst"), r.get("view")
    if bu:
        lines.append("")
        lines.append(f"**Burst recovery.** {bu['connections']:,} connections at once took iamlinkd from "
                     f"{bu['steady']['VmRSS'] / 1024:.1f} MiB (steady) to a sampled peak of "
                     f"{bu['peak']['VmRSS'] / 1024:.1f} MiB; {bu['mark_s']:.0f} s after the last answer it held "
                     f"{bu['after']['VmRSS'] / 1024:.1f} MiB ({bu['after']['VmRSS'] / bu['steady']['VmRSS']:.2f}× "
                     "steady; target ≤ 1.5× at 30 s).")
    if v:
        lines.append("")
        lines.append(f"**The Kubernetes view at scale.** With {v['namespaces']:,} namespaces and "
                     f"{v['service_accounts']:,} service accounts in the API (objects like a real cluster's: labels, "
                     f"last-applied-configuration, managed fields; {v['state_mb']:.0f} MB as JSON), iamlinkd holds "
                     f"{v['full']['RssAnon'] / 1024:.1f} MiB of anonymous memory against {v['empty']['RssAnon'] / 1024:.1f} "
                     f"MiB with an empty API: ≈ {v['per_object_bytes']:.0f} B per object (VmRSS "
                     f"{v['full']['VmRSS'] / 1024:.1f} MiB). Namespaces and service accounts are watched as metadata "
                     "only and kept as name, namespace and the annotations roles are read from "
                     "(`node-server/src/role/kube_view.rs`); listing them all (20 per page, `LIST_PAGE`, so that a relist of huge objects holds one small page at a time) took "
                     f"{v['listed_s']:.1f} s from the restart. Watched as whole objects, as before December 2026, "
                     "the same 25,000 objects held 104 MiB of anonymous memory, ≈ 4,250 B each (release build, "
                     "this bench); what remains per object is mostly kube's `ObjectMeta` and the reflector's "
                     "`ObjectRef` key, which a store of name → annotations would shrink further.")
    if not r["met"]:
        lines.append("")
        lines.append("**Proposed fix.** What is left over the target is the file-backed part, the binary's resident "
                     "text (the dist profile already has fat LTO and one codegen unit; `panic = \"abort\"` stays out: a "
                     "panic in one connection's task must end that connection, not the daemon): `opt-level = \"s\"` "
                     "for the crates off the request path (aws-sdk-sts, aws-config, kube), or replacing `aws-sdk-sts` "
                     "(one call, AssumeRole) by a small SigV4-signed query over the hyper client already in the binary.")
    return "\n".join(lines)

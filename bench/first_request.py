"""Part 3, first request after pod start: from libcni's ADD returning to the first credential
answer in the new pod, against cached answers in the same pod timed the same way.

cnibench parks a requester thread inside the pod's namespace before ADD, so nothing but the
request lies between ADD returning and the answer; each cached request is started by the same
hand-off and timed from it. One pod at a time, each a new session key (cold cache, only the
prefetch that the plugin's record triggers). The STS proxy's timestamps (same clock) tell whether
the pod's AssumeRole was still in flight when ADD returned, and whether a request ever made an
STS call of its own (it would be a second call for the key).
"""

import json

from .latency import BARE_VIP, BareServer
from .node import role_arn
from .stats import median, percentile, ratio

ROLE = "bench-first"
NAMESPACE = "bench-first"
TARGET = 2.0


# A credentials document for the bare server (cnibench checks Code and AccessKeyId).
BARE_DOC = json.dumps({"Code": "Success", "LastUpdated": "2026-01-01T00:00:00Z", "Type": "AWS-HMAC",
                       "AccessKeyId": "ASIABARESERVERBASELINE", "SecretAccessKey": "x" * 40, "Token": "x" * 400,
                       "Expiration": "2026-01-01T01:00:00Z"}).encode()


def run(b, quick, want_profile):
    pods = 6 if quick else 100
    out = b.cnibench("first", ["--conflist", b.conflists["iamlink"], "--pods", pods, "--namespace", NAMESPACE,
                               "--role", ROLE, "--cached", 3], timeout=60 + pods * 3)
    samples = out["samples"]
    # The network's own first-packet cost (ARP, conntrack, route lookups from a brand-new pod): the
    # same ADD, then the first request to the bare server instead of iamlinkd.
    bare = BareServer(b, BARE_DOC, path=f"/latest/meta-data/iam/security-credentials/{ROLE}")
    try:
        nbare = 3 if quick else 30
        bare_out = b.cnibench("first", ["--conflist", b.conflists["iamlink"], "--pods", nbare, "--namespace",
                                        "bench-first-bare", "--role", ROLE, "--cached", 3, "--host", BARE_VIP],
                              timeout=60 + nbare * 3)
    finally:
        bare.close()
    bare_first = [s["first_ms"] for s in bare_out["samples"]]
    bare_cached = [x for s in bare_out["samples"] for x in s["cached_ms"]]
    calls = [c for c in b.sts_calls() if c["role"] == role_arn(ROLE)]
    by_session = {}
    for c in calls:
        by_session.setdefault(c["session"], []).append(c)
    first = [s["first_ms"] for s in samples]
    cached = [x for s in samples for x in s["cached_ms"]]
    bad = [s for s in samples if s["first"]["status"] != 200 or s["first"].get("error")
           or any(a["status"] != 200 or a.get("error") for a in s["cached"])]
    in_flight = waited = extra_calls = 0
    lead_ms, arrive_ms = [], []
    first_ready, first_late = [], []
    for s in samples:
        session = f"{NAMESPACE}.{s['pod'].split('/')[1]}"
        cs = by_session.get(session, [])
        if len(cs) != 1:
            extra_calls += 1
        if cs:
            c = cs[0]
            lead_ms.append((s["add_end"] - c["answered"]) * 1000)  # > 0: cached before ADD returned
            arrive_ms.append((c["arrived"] - s["add_start"]) * 1000)
            (first_late if c["answered"] > s["add_end"] else first_ready).append(s["first_ms"])
            if c["answered"] > s["add_end"]:
                in_flight += 1
                if c["answered"] > s["first"]["start"]:
                    waited += 1
    f50, f99 = median(first), percentile(first, 99)
    c50, c99 = median(cached), percentile(cached, 99)
    rows = [
        {"metric": "first answer after ADD, median", "value": f50, "unit": "ms", "baseline": c50,
         "ratio": ratio(f50, c50), "target": "≤ 2× cached", "met": ratio(f50, c50) <= TARGET},
        {"metric": "first answer after ADD, p99", "value": f99, "unit": "ms", "baseline": c99,
         "ratio": ratio(f99, c99), "target": "≤ 2× cached", "met": ratio(f99, c99) <= TARGET},
        {"metric": "context: first answer after ADD from the bare server instead, median (vs its cached)",
         "value": median(bare_first), "unit": "ms", "baseline": median(bare_cached),
         "ratio": ratio(median(bare_first), median(bare_cached))},
        {"metric": "first answers that waited for the pod's in-flight prefetch", "value": waited, "unit": f"of {len(samples)}",
         "baseline": None, "ratio": None},
        {"metric": "pods whose key saw ≠ 1 AssumeRole (a request's own STS call)", "value": extra_calls, "unit": f"of {len(samples)}",
         "baseline": None, "ratio": None, "target": "0", "met": extra_calls == 0, "check": True},
        {"metric": "failed first or cached answers", "value": len(bad), "unit": "", "baseline": None, "ratio": None,
         "target": "0", "met": not bad, "check": True},
    ]
    return {"title": "First request after pod start", "rows": rows, "met": all(r.get("met", True) for r in rows),
            "pods": len(samples), "add_p50": median([s["add_ms"] for s in samples]),
            "prefetch_lead_p50_ms": median(lead_ms), "prefetch_lead_p1_ms": percentile(lead_ms, 1),
            "sts_arrival_p50_ms": median(arrive_ms), "first_ready_p50": median(first_ready),
            "first_late_p50": median(first_late), "n_ready": len(first_ready), "n_late": len(first_late),
            "in_flight": in_flight, "waited": waited, "sts_ms_p50": median([(c["answered"] - c["arrived"]) * 1000 for c in calls]),
            "first_ms": first, "cached_ms": cached, "bare_first_p50": median(bare_first),
            "bare_cached_p50": median(bare_cached)}


def explain(r):
    lines = [f"**Result.** ADD takes {r['add_p50']:.1f} ms (median). The pod's AssumeRole reaches STS "
             f"{r['sts_arrival_p50_ms']:.1f} ms after ADD starts (median: ptp, then the iamlink plugin writes the record, "
             f"iamlinkd sees it through inotify and starts the prefetch) and STS (moto behind the counting proxy) "
             f"answers in {r['sts_ms_p50']:.1f} ms. In {r['n_ready']} of {r['pods']} pods the credentials were cached "
             f"before ADD returned — their first answer took {r['first_ready_p50'] or 0:.2f} ms (median); in "
             f"{r['n_late']} the prefetch was still in flight when ADD returned and {r['waited']} first requests "
             f"waited for it ({r['first_late_p50'] or 0:.2f} ms median for those pods). No first request made an STS call of its own: every key "
             "saw exactly one AssumeRole, the prefetch.",
             "",
             f"Part of the first answer's extra time is the network's, not iamlinkd's: a brand-new pod's first "
             f"connection resolves its gateway (ARP) and creates conntrack state. The same ADD followed by a first "
             f"request to the bare server takes {r['bare_first_p50']:.2f} ms against {r['bare_cached_p50']:.2f} ms for "
             f"its later requests ({r['bare_first_p50'] / r['bare_cached_p50']:.1f}×), so iamlinkd's own first-request "
             f"cost with a cached credential is about the difference."]
    if not r["met"]:
        lines.append("")
        lines.append(
            "**Why it misses, and the fix.** Nothing but the prefetch's head start separates the first request from "
            "STS: the record is written in the middle of ADD and STS needs longer than the rest of ADD. Real STS takes "
            "tens of milliseconds, more than moto here, so on a node the race is lost more often, not less. "
            "(In Kubernetes the application starts well after ADD — image, container start — so pods rarely see it; the "
            "target is about the worst case.) Two changes, in order of effect:\n\n"
            "1. Make ADD return only once the pod's credentials are cached, with a bound: iamlinkd marks a slot ready "
            "after its prefetch (e.g. `node-server/src/creds/refresh.rs` `prefetch` creates `<store>/ready/<slot>` when "
            "`cache.get` succeeds; the plugin's `cmd_del`/`Store::remove` deletes it) and `cni-plugin/src/commands.rs` "
            "`cmd_add` waits for it (inotify on `ready/`, at most ~1 s, never failing ADD on timeout: the pod then "
            "behaves as today). ADD grows by the STS time when STS is slow, which is the intended trade; a pod "
            "without a role or a stopped iamlinkd never waits.\n"
            "2. Start the prefetch sooner: `watch::run` re-reads every record (`Store::list`) on each inotify wake-up "
            "before prefetching, O(pods) file reads per new pod; prefetching from the event's file name alone (a "
            "`read_record` of that file) takes the scan off the critical path, which matters at 100+ pods.\n\n"
            "With (1) the first answer is a cached answer by construction (≤ 2× holds whenever STS answers within "
            "the bound).")
    return "\n".join(lines)

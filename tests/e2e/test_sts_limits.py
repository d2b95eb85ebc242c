"""The daemon-wide cap on STS calls (`[sts] max_calls_per_second`, `call_burst`): a node whose
pods all want credentials at once (iamlinkd restarted with 30 pods) calls STS no faster than the
cap and every pod still gets its own role; a pod whose turn would come past its patience
(`timeout_seconds`) is answered 429 with Retry-After; STS's Throttling is counted and slows the
whole daemon down, and no pod ever gets another pod's role meanwhile; a negative cap is refused.

Real parts: namespaces and veths, the built iamlink plugin and iamlinkd with its real AWS SDK
STS client (its own retries included), requests from sockets inside the pods' namespaces.
Emulated: STS is moto behind tests/harness/sts_fault_proxy.py, which records the time and the
SDK's attempt number of every call and answers Throttling on command.
"""

import concurrent.futures
import json
import os
import re
import subprocess
import time

import pytest

from harness import is_assumed_role, wait_until
from harness.netns_threads import NetnsThreads
from harness.rawhttp import request
from harness.sts_faults import StsFaultProxy
from harness.util import IAMLINKD

CREDS = "/latest/meta-data/iam/security-credentials/"
PODS = 30
CAP, BURST = 5, 5
PATIENCE = 3  # [sts] timeout_seconds: a pod's patience under the cap
ROLES = [{"namespace": "lim", "name": f"p{i}", "role": f"lim{i}"} for i in range(PODS)]


@pytest.fixture(scope="module")
def bench(make_module_bench):
    b = make_module_bench(pod_roles=ROLES, start_daemon=False)
    b.proxy = StsFaultProxy(b.node, b.moto)
    b.callback(b.proxy.stop)
    b.daemon.sts.update(endpoint=b.proxy.endpoint, timeout_seconds=PATIENCE, max_calls_per_second=CAP,
                        call_burst=BURST)
    b.daemon.start()
    b.lim = [b.pods.add("lim", f"p{i}") for i in range(PODS)]
    b.threads = [NetnsThreads(p.netns) for p in b.lim]
    b.callback(lambda: [t.close() for t in b.threads])
    return b


@pytest.fixture(autouse=True)
def sts_back_to_normal(bench):
    yield
    bench.proxy.reset()


def restart(bench, **sts):
    """Restarts iamlinkd (an empty cache) with these [sts] keys; the monotonic time before it started."""
    bench.daemon.stop()
    bench.daemon.sts.update(sts)
    t0 = time.monotonic()
    bench.daemon.start()
    return t0


def ask(i, bench, timeout=15):
    """GET pod i's credentials from inside it: (i, Reply, document or None)."""
    r = bench.threads[i].call(lambda: request("GET", CREDS + f"lim{i}", timeout=timeout), timeout=timeout + 5)
    return i, r, (json.loads(r.body) if r.status == 200 else None)


def ask_all(bench, timeout=15):
    with concurrent.futures.ThreadPoolExecutor(max_workers=PODS) as pool:
        return list(pool.map(lambda i: ask(i, bench, timeout), range(PODS)))


def assert_own_role(bench, i, doc):
    arn = bench.moto.caller_arn(doc)
    assert is_assumed_role(arn, f"lim{i}"), f"pod lim/p{i} got credentials of {arn}"


def metric(bench, name):
    status, text = bench.daemon.metrics_get("/metrics")
    assert status == 200, text
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def most_in_a_second(times):
    return max(sum(1 for u in times if t <= u < t + 1.0) for t in times)


def test_a_node_restarted_with_thirty_pods_calls_sts_no_faster_than_the_cap_and_each_pod_gets_its_own_role(bench):
    t0 = restart(bench, max_calls_per_second=CAP, call_burst=BURST, timeout_seconds=PATIENCE)
    docs = {}

    def all_served():
        for i, r, doc in ask_all(bench):
            assert r.status in (200, 429), f"lim/p{i}: {r}"
            if doc:
                docs[i] = doc
        return len(docs) == PODS

    wait_until(all_served, 30, "every pod's own credentials", interval=0.5)
    for i, doc in docs.items():
        assert_own_role(bench, i, doc)
    calls = bench.proxy.calls(since=t0)
    sessions = sorted(c["session"] for c in calls)
    assert sessions == sorted(f"lim.p{i}" for i in range(PODS)), f"one call per pod's session: {sessions}"
    times = sorted(c["t"] for c in calls)
    worst = most_in_a_second(times)
    assert worst <= CAP + BURST, f"{worst} STS calls within one second; the cap allows {CAP}/s with a burst of {BURST}"
    assert times[-1] - times[0] >= (PODS - BURST) / CAP - 0.5, f"30 calls over {times[-1] - times[0]:.1f}s"


def test_a_pod_whose_turn_would_come_past_its_patience_gets_429_with_retry_after(bench):
    # 1/s and 30 pods: a line of 30 s, far past a patience of 2 s.
    t0 = restart(bench, max_calls_per_second=1, call_burst=1, timeout_seconds=2)
    answers = ask_all(bench, timeout=10)
    limited = [(i, r) for i, r, _ in answers if r.status == 429]
    served = [(i, doc) for i, r, doc in answers if r.status == 200]
    assert len(limited) + len(served) == PODS, [str(r) for _, r, _ in answers if r.status not in (200, 429)]
    assert len(limited) >= PODS - 10, f"only {len(limited)} of {PODS} pods told to come back"
    for i, r in limited:
        assert "too many STS calls" in r.text, r
        assert int(r.headers.get("retry-after", "0")) >= 1, f"lim/p{i}: no Retry-After: {r.headers}"
        assert r.elapsed < 2 * 2 + 1, f"lim/p{i} waited {r.elapsed:.1f}s for its 429"
    for i, doc in served:
        assert_own_role(bench, i, doc)
    i = limited[0][0]
    line = re.compile(rf"STS call cap: answered 429.*pod=lim/p{i} .*interface=\S+")
    wait_until(lambda: line.search(bench.daemon.log_text()), 5, "a log line with the pod and its interface")
    early = [c for c in bench.proxy.calls(since=t0) if c["t"] < t0 + 5]
    assert len(early) <= 1 + 5, f"{len(early)} calls in the first 5 s at 1/s"


def test_sts_throttling_is_counted_slows_the_whole_daemon_and_never_gives_a_pod_another_pods_role(bench):
    bench.proxy.fault("throttle")
    t0 = restart(bench, max_calls_per_second=CAP, call_burst=BURST, timeout_seconds=PATIENCE)
    # While STS throttles: answers are 429 or 503, never credentials.
    for i, r, _ in ask_all(bench, timeout=10):
        assert r.status in (429, 503), f"lim/p{i} while STS throttles: {r}"
    wait_until(lambda: time.monotonic() > t0 + 8, 10, "8 s of throttling", interval=0.2)
    throttled = metric(bench, "iamlink_sts_throttled_total")
    rate = metric(bench, "iamlink_sts_cap_calls_per_second")
    calls = bench.proxy.calls(since=t0)
    first_tries = [c for c in calls if c["attempt"] == 1]
    # The SDK retried each throttled call itself (standard mode); the metric counts exchanges.
    assert 1 <= throttled <= len(first_tries), (throttled, len(first_tries), len(calls))
    assert any((c["attempt"] or 1) > 1 for c in calls), "the SDK's own retries of Throttling"
    assert rate < CAP, f"the cap's rate in force is still {rate}/s"
    late = [c for c in first_tries if t0 + 4 <= c["t"] < t0 + 8]
    assert len(late) <= CAP * 4 / 2, f"{len(late)} exchanges started in 4 s of throttling; the cap alone allows {CAP * 4}"

    bench.proxy.reset()
    for i in range(5):
        doc = wait_until(lambda: ask(i, bench)[2], 40, f"lim/p{i}'s credentials after the throttling", interval=0.5)
        assert_own_role(bench, i, doc)


@pytest.mark.parametrize("keys, named", [
    ({"max_calls_per_second": -1}, "sts.max_calls_per_second -1 must be 0 (no cap) or a positive number"),
    ({"max_calls_per_second": 5, "call_burst": 0}, "sts.call_burst must be at least 1"),
])
def test_a_bad_cap_is_refused_at_start_naming_the_key(tmp_path, keys, named):
    lines = ['listen = "198.18.0.1:8181"', "[sts]"] + [f"{k} = {v}" for k, v in keys.items()]
    path = os.path.join(tmp_path, "iamlinkd.toml")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    p = subprocess.run([IAMLINKD, "--check-config", "--config", path], capture_output=True, text=True, timeout=30)
    assert p.returncode != 0 and named in p.stderr, (p.returncode, p.stderr)

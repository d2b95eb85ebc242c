"""STS failing in every way it can: pods keep their cached credentials (never expired ones), a
role STS refuses gets a clear 503 and touches no other role, iamlinkd backs off instead of
hammering STS, slow STS delays nobody else, and everything recovers when STS does.

Real parts: namespaces and veths, ptp + host-local + the built iamlink plugin through libcni
(`cnirt`), the nftables interception, the built iamlinkd with its real AWS SDK STS client (its
retries and timeouts included); requests come from sockets opened inside the pods' namespaces.
Emulated: STS is moto behind a small fault proxy in the node (tests/harness/sts_fault_proxy.py)
that iamlinkd uses as `sts.endpoint`: it passes calls through, delays them, answers 500/503,
Throttling or AccessDenied with STS's error XML, resets connections or stops listening, counts
every AssumeRole, and can make moto's credentials say they expire sooner (so that refresh-ahead
and "never nearly expired" are reached in seconds rather than in an hour). Real STS cannot be
made to fail on command, and moto has no fault injection.
"""

import concurrent.futures
import datetime
import json
import re
import statistics
import time

import pytest

from harness import is_assumed_role, parse_time, role_arn, wait_until
from harness.netns_threads import NetnsThreads
from harness.rawhttp import request
from harness.sts_faults import StsFaultProxy

CREDS = "/latest/meta-data/iam/security-credentials/"
UNAVAILABLE = "iamlink: cannot assume the pod's role now"
STS_TIMEOUT = 3           # iamlinkd's [sts] timeout_seconds: the bound on one AssumeRole
SHORT_LIFETIME = 600      # the `short` role's credentials: always due for refresh (< 20 min left)
BRIEF_LIFETIME = 65       # the `brief` role's: usable (> 60 s left) for 5 s only
ROLES = [
    {"namespace": "team-a", "name": "web", "role": "web"},
    {"namespace": "team-a", "name": "batch", "role": "batch"},
    {"namespace": "short", "role": "short"},
    {"namespace": "brief", "role": "brief"},
    {"namespace": "denied", "role": "denied"},
    {"namespace": "cold", "role": "cold"},
    {"namespace": "slow", "role": "slowpoke"},
]


def now():
    return datetime.datetime.now(datetime.timezone.utc)


@pytest.fixture(scope="module")
def bench(make_module_bench):
    b = make_module_bench(pod_roles=ROLES, start_daemon=False)
    b.proxy = StsFaultProxy(b.node, b.moto)
    b.callback(b.proxy.stop)
    b.daemon.sts.update(endpoint=b.proxy.endpoint, timeout_seconds=STS_TIMEOUT)
    b.daemon.start()
    b.proxy.rewrite_expiry("short", SHORT_LIFETIME)
    b.proxy.rewrite_expiry("brief", BRIEF_LIFETIME)
    b.threads = {}
    b.callback(lambda: [t.close() for t in b.threads.values()])
    for ns, name in (("team-a", "web"), ("team-a", "batch"), ("short", "p")):
        pod = b.pods.add(ns, name)
        b.threads[pod.key] = NetnsThreads(pod.netns)
    return b


@pytest.fixture(autouse=True)
def sts_back_to_normal(bench):
    yield
    bench.proxy.reset()


def ask(threads, role, timeout=10):
    """GET the role's credentials from inside the pod: (Reply, parsed document or None)."""
    r = threads.call(request, "GET", CREDS + role, timeout=timeout)
    doc = json.loads(r.body) if r.status == 200 else None
    return r, doc


def assert_served_unexpired(bench, key, role, n):
    """n answers to the pod `key`, each 200 with credentials more than 60 s from expiry;
    returns the distinct AccessKeyIds with their credentials."""
    keys = {}
    for _ in range(n):
        r, doc = ask(bench.threads[key], role)
        assert r.status == 200, f"{key} while STS fails: {r}"
        left = (parse_time(doc["Expiration"]) - now()).total_seconds()
        assert left > 59, f"{key} got credentials {left:.0f}s from expiry: {doc['Expiration']}"
        keys[doc["AccessKeyId"]] = doc
    return keys


def assert_own_role(bench, doc, role, what):
    arn = bench.moto.caller_arn(doc)
    assert is_assumed_role(arn, role), f"{what}: credentials of {arn}, expected role {role}"


FAULTS = {
    "status-500": dict(mode="status", status=500),
    "status-503": dict(mode="status", status=503),
    "throttling": dict(mode="throttle"),
    "reset": dict(mode="close"),
    "refused": dict(mode="refuse"),
    "slower-than-timeout": dict(mode="slow", seconds=STS_TIMEOUT + 5),
}


@pytest.mark.parametrize("fault", FAULTS, ids=list(FAULTS))
def test_cached_credentials_outlive_an_sts_fault_and_new_pods_recover_after_it(bench, fault):
    before = {k: ask(bench.threads[k], role)[1] for k, role in (("team-a/web", "web"), ("short/p", "short"))}
    assert all(before.values()), before
    t_fault = time.monotonic()
    bench.proxy.fault(**FAULTS[fault])

    # Pods with cached credentials keep getting them, unexpired; `short`'s are due for refresh,
    # so every answer starts a refresh that fails: its STS calls are bounded by the backoff.
    web = assert_served_unexpired(bench, "team-a/web", "web", 20)
    assert set(web) == {before["team-a/web"]["AccessKeyId"]}, f"web's key changed while STS fails: {web}"
    short = assert_served_unexpired(bench, "short/p", "short", 20)
    if fault != "refused":  # a refused connection never reaches the proxy's count
        # A refresh started before the fault may still be in flight (it holds the key's fetch);
        # `short` keeps asking until one started under the fault reaches STS.
        def refresh_tried():
            short.update(assert_served_unexpired(bench, "short/p", "short", 1))
            return bench.proxy.calls(role="short", since=t_fault)

        wait_until(refresh_tried, 10, f"a refresh of short/p's due credentials to reach STS during {fault}",
                   interval=0.02)
    for doc in short.values():
        assert_own_role(bench, doc, "short", f"short/p during {fault}")
    short_calls = bench.proxy.calls(role="short", since=t_fault)
    assert len(short_calls) <= 10, f"{len(short_calls)} AssumeRole calls for 20 answers: no backoff"

    # A pod that has nothing cached gets a clear 503 (never anybody else's credentials).
    cold = bench.pods.add("cold", fault)
    with NetnsThreads(cold.netns) as t:
        r, _ = ask(t, "cold", timeout=STS_TIMEOUT + 10)
        assert r.status == 503 and UNAVAILABLE in r.text, f"new pod during {fault}: {r}"

        # STS is back: the new pod gets its own role, and `short` fresh credentials, both
        # within a bounded time (the backoff after a few failures is a few seconds).
        bench.proxy.reset()
        t_back = time.monotonic()
        doc = wait_until(lambda: ask(t, "cold")[1], 20, f"credentials for {cold} after {fault} ended")
        assert_own_role(bench, doc, "cold", f"{cold} after {fault}")
    fresh = wait_until(lambda: (lambda d: d if d and d["AccessKeyId"] not in short else None)(
        ask(bench.threads["short/p"], "short")[1]), 20, f"a refresh of short/p after {fault} ended")
    assert_own_role(bench, fresh, "short", f"short/p after {fault}")
    assert bench.proxy.calls(role="short", since=t_back), "no refresh reached STS after recovery"


def test_nearly_expired_credentials_are_never_served_while_sts_is_down(bench):
    brief = bench.pods.add("brief", "p")
    with NetnsThreads(brief.netns) as t:
        doc = wait_until(lambda: ask(t, "brief")[1], 10, f"first credentials of {brief}")
        assert_own_role(bench, doc, "brief", str(brief))
        bench.proxy.fault("status", status=503)
        # The cached credentials had 65 s left: they are served while more than 60 s remain,
        # then never again; the pod is told so with a 503 until STS is back.
        answers = []

        def refused_now():
            r, d = ask(t, "brief")
            answers.append((now(), r.status, d))
            return r.status == 503

        wait_until(refused_now, BRIEF_LIFETIME - 40, "the nearly expired credentials to stop being served",
                   interval=0.1)
        for _ in range(5):
            refused_now()
    served = [(at, d) for at, status, d in answers if status == 200]
    assert served, f"the cached credentials were never served once STS was down: {answers}"
    for at, d in served:
        left = (parse_time(d["Expiration"]) - at).total_seconds()
        assert left > 59, f"served {left:.1f}s before expiry: {d['Expiration']} at {at}"
    first_refusal = next(i for i, (_, status, _) in enumerate(answers) if status == 503)
    after = [status for _, status, _ in answers[first_refusal:]]
    assert set(after) == {503}, f"answers after the first refusal: {after}"


def test_access_denied_for_one_role_is_a_clear_503_and_spares_the_others(bench):
    bench.proxy.fault("deny", role="denied")
    pod = bench.pods.add("denied", "p1")
    with NetnsThreads(pod.netns) as t:
        r, _ = ask(t, "denied")
        assert r.status == 503 and UNAVAILABLE in r.text, r
        listing = t.call(request, "GET", CREDS)
        assert listing.status == 200 and listing.text.strip() == "denied", listing

    reason = re.compile(rf"cannot assume role .*pod=denied/p1 .*role={re.escape(role_arn('denied'))} "
                        rf".*AccessDenied")
    wait_until(lambda: any(reason.search(line) for line in bench.daemon.log_text().splitlines()), 5,
               "iamlinkd's log to give the reason with the pod and the role")

    for key, role in (("team-a/web", "web"), ("team-a/batch", "batch")):
        for doc in assert_served_unexpired(bench, key, role, 3).values():
            assert_own_role(bench, doc, role, f"{key} while another role is denied")
    other = bench.pods.add("cold", "while-denied")
    with NetnsThreads(other.netns) as t:
        doc = wait_until(lambda: ask(t, "cold")[1], 10, f"credentials for {other} while `denied` is refused")
        assert_own_role(bench, doc, "cold", str(other))


WINDOW = 8.0  # seconds a pod keeps asking for a role STS refuses


def test_after_a_failure_iamlinkd_backs_off_and_fails_fast_meanwhile(bench, bench_report):
    bench.proxy.fault("deny", role="denied")
    pod = bench.pods.add("denied", "p2")
    answers = []  # (monotonic start, status, seconds)

    def keep_asking():
        end = time.monotonic() + WINDOW
        while time.monotonic() < end:
            t0 = time.monotonic()
            r = request("GET", CREDS + "denied", timeout=STS_TIMEOUT + 5)
            answers.append((t0, r.status, time.monotonic() - t0))
            time.sleep(0.01)  # about 100 requests a second: under the pod's rate limit

    with NetnsThreads(pod.netns) as t:
        t.call(keep_asking)
    calls = [c["t"] for c in bench.proxy.calls(role="denied", session="denied.p2")]
    gaps = [b - a for a, b in zip(calls, calls[1:])]
    statuses = {s for _, s, _ in answers}
    fast = statistics.median(d for _, _, d in answers)
    bench_report(f"sts backoff: {len(answers)} requests in {WINDOW:.0f}s, {len(calls)} AssumeRole calls, "
                 f"gaps {[round(g, 2) for g in gaps]}, median answer {fast * 1000:.1f} ms")
    assert statuses == {503}, f"answers for a denied role: {statuses}"
    assert len(answers) >= 200, len(answers)
    assert 2 <= len(calls) <= 6, f"{len(calls)} AssumeRole calls in {WINDOW}s for {len(answers)} requests"
    assert fast < 0.05, f"median answer {fast:.3f}s: iamlinkd does not fail fast between attempts"
    # The n-th wait is 2^n s jittered down to half: 0.5-1 s, 1-2 s, 2-4 s (60 s at most: unit-tested).
    for n, gap in enumerate(gaps[:3]):
        low, high = 2 ** n / 2, 2 ** n
        assert low - 0.05 <= gap <= high + 0.5, f"wait #{n + 1} was {gap:.2f}s, expected {low}-{high}s: {gaps}"


def test_slow_sts_does_not_delay_other_pods_cached_answers(bench):
    delay = STS_TIMEOUT - 0.5
    bench.proxy.fault("slow", seconds=delay)
    pod = bench.pods.add("slow", "p1")
    with NetnsThreads(pod.netns) as t:
        t0 = time.monotonic()
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        try:
            slow = pool.submit(lambda: ask(t, "slowpoke", timeout=STS_TIMEOUT + 5))
            served = []
            while not slow.done():
                for key, role in (("team-a/web", "web"), ("team-a/batch", "batch")):
                    r, _ = ask(bench.threads[key], role)
                    served.append((key, r.status, r.elapsed))
                time.sleep(0.01)  # about 200 requests a second in all: under each pod's rate limit
            r, doc = slow.result()
        finally:
            pool.shutdown(wait=True)
        waited = time.monotonic() - t0
    assert r.status == 200, f"{pod} behind slow STS: {r}"
    assert_own_role(bench, doc, "slowpoke", str(pod))
    assert waited >= 1.0, f"{pod}'s answer took {waited:.2f}s: STS was not slow for it"
    assert len(served) >= 10, f"only {len(served)} answers to other pods in {waited:.1f}s"
    slowest = max(s[2] for s in served)
    assert {s[1] for s in served} == {200} and slowest < 0.5, \
        f"other pods while STS is slow: statuses {sorted({s[1] for s in served})}, slowest {slowest:.2f}s"

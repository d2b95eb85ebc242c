"""One pod flooding iamlinkd is held to its own limits ([limits]: requests per second, burst,
connections per pod) and does not slow other pods down: a fairness property, not a speed target.

Real parts: namespaces and veths, ptp + host-local + the built iamlink plugin through libcni
(`cnirt`), the nftables interception and the kernel's conntrack/NAT, the built iamlinkd with its
per-pod limits, and wrk (Debian's, a real HTTP load generator written in C) in the flooding pod.
The quiet pod's requests come from a socket opened inside its namespace by the test process,
paced under its own rate limit. Emulated: STS by moto, the node's metadata service by the fake
upstream. The machine has 2 cores shared by wrk, iamlinkd and the measuring client, so medians
of 400 requests are compared, each phase measured right after the other.
"""

import json
import os
import signal
import statistics
import subprocess
import time

import pytest

from harness import wait_until
from harness.netns_threads import NetnsThreads
from harness.rawhttp import request
from harness.util import BASE_PATH, IAMLINKD

CREDS = "/latest/meta-data/iam/security-credentials/"
WRK_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "harness", "wrk_status.lua")
LIMITS = {"requests_per_second": 500, "burst": 1000, "connections_per_pod": 64}  # the documented defaults
FLOOD_CONNECTIONS = 2 * LIMITS["connections_per_pod"]
SAMPLES = 400
PACE = 0.005           # seconds between the quiet pod's requests: ~200/s, under its own rate
FLOOD_SECONDS = 12     # wrk's own bound; the measurement must end before it does
ROLES = [{"namespace": "team-a", "role": "web"}, {"namespace": "team-b", "role": "batch"}]


def limits_supported(node_workdir):
    """Whether this iamlinkd accepts a [limits] table (the feature under test)."""
    path = os.path.join(node_workdir, "limits-check.toml")
    with open(path, "w") as f:
        f.write('listen = "198.18.0.1:8181"\n[limits]\n' + "".join(f"{k} = {v}\n" for k, v in LIMITS.items()))
    p = subprocess.run([IAMLINKD, "--config", path, "--check-config"], capture_output=True, text=True, timeout=30,
                       env={"PATH": BASE_PATH})
    return p.returncode == 0, (p.stdout + p.stderr).strip()


@pytest.fixture
def bench(make_bench, tmp_path):
    ok, out = limits_supported(str(tmp_path))
    if not ok:
        pytest.skip(f"iamlinkd does not accept [limits] yet (per-pod rate and connection limits): {out[-300:]}")
    if not os.access("/usr/bin/wrk", os.X_OK):
        pytest.fail("wrk is not installed: run scripts/setup", pytrace=False)
    b = make_bench(pod_roles=ROLES, daemon_settings={"limits": dict(LIMITS)})
    b.flooder = b.pods.add("team-a", "flooder")
    b.quiet = b.pods.add("team-b", "quiet")
    return b


def start_flood(bench, seconds=FLOOD_SECONDS, connections=FLOOD_CONNECTIONS):
    return bench.flooder.spawn(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "2s", "-s", WRK_SCRIPT,
                                "http://169.254.169.254" + CREDS + "web"])


def flood_result(bench, wrk, stop=False):
    """wrk's summary; `stop` ends the flood now (wrk reports what it did on SIGINT)."""
    if stop and wrk.poll() is None:
        wrk.send_signal(signal.SIGINT)
    out, err = wrk.communicate(timeout=FLOOD_SECONDS + 20)
    bench.node.forget(wrk)
    lines = [line for line in out.decode().splitlines() if line.startswith("{")]
    assert wrk.returncode == 0 and lines, f"wrk exited {wrk.returncode}: {out.decode()[-1000:]} {err.decode()[-1000:]}"
    return json.loads(lines[-1])


def quiet_latencies(n=SAMPLES):
    """n paced requests for the quiet pod's credentials (run inside its namespace)."""
    out = []
    for _ in range(n):
        r = request("GET", CREDS + "batch", timeout=5)
        out.append((r.status, r.elapsed, r.body))
        time.sleep(PACE)
    return out


def wait_for_flood(in_flooder):
    """The flood is under way once the flooding pod's own requests are refused: 429 (its bucket
    is empty) or closed at once (it has all the connections it may have)."""
    def limited():
        r = in_flooder.call(request, "GET", CREDS + "web", timeout=5)
        return r.status == 429 or (r.status is None and r.closed)

    wait_until(limited, 10, "the flooding pod to be rate limited")


def test_a_flooding_pod_is_limited_and_another_pods_median_latency_stays_within_2x(bench, bench_report):
    with NetnsThreads(bench.quiet.netns) as in_quiet, NetnsThreads(bench.flooder.netns) as in_flooder:
        before = in_quiet.call(quiet_latencies)
        wrk = start_flood(bench)
        try:
            wait_for_flood(in_flooder)
            during = in_quiet.call(quiet_latencies)
            still_flooding = wrk.poll() is None
        finally:
            flood = flood_result(bench, wrk, stop=True)
    keys = set()
    for status, _, body in before + during:
        assert status == 200, f"the quiet pod got {status}: {body[:200]!r}"
        keys.add(json.loads(body)["AccessKeyId"])
    assert len(keys) == 1, f"the quiet pod's key changed: {keys}"
    assert still_flooding, "wrk ended before the measurement did"

    statuses = {int(k): v for k, v in flood["statuses"].items()}
    closed = flood["errors"]["read"] + flood["errors"]["connect"] + flood["errors"]["write"]
    assert statuses.get(429, 0) > 0 or closed > 0, f"the flooding pod was neither rate limited nor cut: {flood}"
    allowed = statuses.get(200, 0)
    budget = LIMITS["burst"] + LIMITS["requests_per_second"] * flood["duration_us"] / 1e6
    assert allowed <= budget * 1.05 + 10, f"{allowed} answered requests, over the limits' {budget:.0f}: {flood}"

    base = statistics.median(e for _, e, _ in before)
    loaded = statistics.median(e for _, e, _ in during)
    bench_report(f"flood: wrk {FLOOD_CONNECTIONS} connections, {flood['requests']} requests "
                 f"({statuses}, {closed} closed) in {flood['duration_us'] / 1e6:.1f}s; quiet pod median "
                 f"{base * 1000:.2f} ms unloaded, {loaded * 1000:.2f} ms during the flood ({loaded / base:.1f}x)")
    assert loaded <= 2 * base, (f"another pod's median latency rose {loaded / base:.1f}x under one pod's flood "
                                f"({base * 1000:.2f} -> {loaded * 1000:.2f} ms, statuses {statuses})")


def test_connections_over_the_bound_are_closed_and_never_answered_as_nobody(bench, bench_report):
    wrk = start_flood(bench, seconds=3)
    flood = flood_result(bench, wrk)
    statuses = {int(k): v for k, v in flood["statuses"].items()}
    closed = flood["errors"]["read"] + flood["errors"]["connect"] + flood["errors"]["write"]
    assert closed > 0, f"{FLOOD_CONNECTIONS} connections, bound {LIMITS['connections_per_pod']}: none was closed: {flood}"
    assert set(statuses) <= {200, 404, 429}, f"the flooding pod got {statuses}"
    with NetnsThreads(bench.quiet.netns) as t:
        r = t.call(request, "GET", CREDS + "batch")
    assert r.status == 200, f"the quiet pod after the flood: {r}"
    anonymous = bench.daemon.log_text().count("reason=connection did not arrive through a pod interface")
    bench_report(f"flood over the connection bound: {statuses}, {closed} closed, {anonymous} answered as nobody")
    assert not statuses.get(404) and anonymous == 0, \
        f"{statuses.get(404)} of the flooding pod's requests were answered as nobody ({anonymous} in the log)"

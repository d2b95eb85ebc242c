"""A hostile pod holding thousands of idle connections to every listener of iamlinkd it can reach
does not stall the daemon: another pod still gets its credentials within 1 s, the daemon's open
descriptors stay under its limit, and everything answers again once the connections close.

Real parts: namespaces and veths, ptp + host-local + the built iamlink plugin through libcni
(`cnirt`), the nftables interception and the kernel's conntrack/NAT, the built iamlinkd started
under `prlimit` with a small descriptor limit (soft 1024, hard 4096: iamlinkd raises its soft
limit to the hard one at start), the hostile pod's sockets opened inside its namespace by the
test process (non-blocking, so that 5,000 connections a listener take a second, not a thread
each), and the quiet pod's IMDSv2 exchange done as an SDK does it (token, listing, credentials),
1 s bounding each step as botocore's timeout does. Emulated: STS by moto, the node's metadata
service by the fake upstream.
"""

import os
import re
import resource
import select
import socket
import threading
import time

import pytest

from harness import wait_until
from harness.imds_client import Client, creds
from harness.netns_threads import NetnsThreads

SOFT_LIMIT, HARD_LIMIT = 1024, 4096
IDLE_CONNECTIONS = 5000        # per listener, from the hostile pod
CONNECT_SECONDS = 15           # bound on opening them all (connects pending in a full backlog count)
QUIET_ASKS = 5                 # the quiet pod's IMDSv2 exchanges while the hostile pod holds its connections
ANSWER_WITHIN = 1.0            # seconds, each whole exchange (botocore: 1 s timeout, 1 attempt)
ROLES = [{"namespace": "team-a", "role": "web"}, {"namespace": "team-b", "role": "batch"}]


@pytest.fixture
def bench(make_bench):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = 3 * IDLE_CONNECTIONS + 1000
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"the test process may open {hard} descriptors, it needs {needed}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    b = make_bench(pod_roles=ROLES, start_daemon=False)
    b.callback(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))
    b.daemon.wrapper = ["prlimit", f"--nofile={SOFT_LIMIT}:{HARD_LIMIT}"]
    b.daemon.start()
    b.hostile = b.pods.add("team-a", "hostile")
    b.quiet = b.pods.add("team-b", "quiet")
    host, port = b.daemon.settings["metrics_listen"].rsplit(":", 1)
    # Every listener a pod reaches: the metadata and credentials addresses (DNATed to the pod
    # listener) and the metrics port on the node's address.
    b.targets = {"metadata": ("169.254.169.254", 80), "credentials": ("169.254.170.23", 80),
                 "metrics": (host, int(port))}
    return b


def open_idle(addr, n, deadline):
    """n connections to addr that never send a byte, opened without blocking; returns the sockets
    and how many completed their handshake before `deadline` (the others wait in the backlog)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.setblocking(False)
            s.connect_ex(addr)
        pending = {s.fileno(): s for s in socks}
        poller = select.poll()
        for fd in pending:
            poller.register(fd, select.POLLOUT)
        connected = 0
        while pending and time.monotonic() < deadline:
            for fd, _ in poller.poll(100):
                poller.unregister(fd)
                if pending.pop(fd).getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    connected += 1
        return socks, connected
    except BaseException:
        close_all(socks)
        raise


def close_all(socks):
    for s in socks:
        s.close()


def open_files(pid):
    """(descriptors open, the soft limit) of process `pid`."""
    with open(f"/proc/{pid}/limits") as f:
        limit = int(re.search(r"^Max open files\s+(\d+)", f.read(), re.M).group(1))
    return len(os.listdir(f"/proc/{pid}/fd")), limit


class FdSampler(threading.Thread):
    """Samples the daemon's open descriptors every 20 ms until stopped: the peak and its limit."""

    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.peak, self.limit, self.samples = pid, 0, None, 0
        self.done = threading.Event()

    def run(self):
        while not self.done.wait(0.02):
            n, self.limit = open_files(self.pid)
            self.peak, self.samples = max(self.peak, n), self.samples + 1

    def stop(self):
        self.done.set()
        self.join(5)


def ask_credentials():
    """One IMDSv2 exchange as an SDK makes it; (result, seconds)."""
    t0 = time.monotonic()
    result = creds(Client("169.254.169.254", 80, None, ANSWER_WITHIN), False, 21600)
    return result, time.monotonic() - t0


def kubelet_probe(bench):
    """/healthz asked from the node itself, as a kubelet's liveness probe: its status, or the error."""
    try:
        return bench.daemon.metrics_get("/healthz")[0]
    except OSError as e:
        return f"{type(e).__name__}: {e}"


def test_idle_connections_to_every_listener_leave_another_pod_its_credentials_within_1s(bench, bench_report):
    held = {}
    sampler = FdSampler(bench.daemon.proc.pid)
    sampler.start()
    try:
        with NetnsThreads(bench.hostile.netns) as in_hostile, NetnsThreads(bench.quiet.netns) as in_quiet:
            deadline = time.monotonic() + CONNECT_SECONDS
            connected = {}
            for name, addr in bench.targets.items():
                held[name], connected[name] = in_hostile.call(open_idle, addr, IDLE_CONNECTIONS, deadline)
            asks = []
            for _ in range(QUIET_ASKS):
                asks.append(in_quiet.call(ask_credentials))
            probe = kubelet_probe(bench)
            peak_held = sampler.peak
    finally:
        for socks in held.values():
            close_all(socks)
        sampler.stop()
    bench_report(f"descriptor exhaustion: {IDLE_CONNECTIONS} idle connections to each of {sorted(bench.targets)} "
                 f"({connected} handshakes completed); the daemon's descriptors peaked at {peak_held} of "
                 f"{sampler.limit}; the quiet pod's answers took "
                 + ", ".join(f"{s * 1000:.0f} ms" for _, s in asks))
    for result, seconds in asks:
        assert result.get("ok") and result["role"] == "batch", \
            f"while a hostile pod held idle connections, another pod got no credentials: {result}"
        assert seconds <= ANSWER_WITHIN, f"another pod's credentials took {seconds:.2f} s"
    assert probe == 200, f"the node's liveness probe got {probe} while a pod held the metrics listener's connections"
    assert sampler.samples > 0 and peak_held < sampler.limit, \
        f"the daemon's open descriptors reached {peak_held} of its limit {sampler.limit}"
    assert sampler.limit == HARD_LIMIT, f"iamlinkd did not raise its soft descriptor limit: {sampler.limit}"

    # The caps closed the hostile pod's connections at once, counted them, and said so rarely.
    _, text = bench.daemon.metrics_get("/metrics")
    refused = {m.group(1): float(m.group(2)) for m in
               re.finditer(r'^iamlink_connections_refused_total\{listener="([^"]+)"\} (\S+)$', text, re.M)}
    assert refused.get("metrics", 0) > 0, f"no refused metrics connection counted: {refused}"
    log = bench.daemon.log_text()
    assert "Too many open files" not in log, "iamlinkd ran out of descriptors"
    cap_lines = [line for line in log.splitlines() if "connection cap" in line]
    assert 0 < len(cap_lines) <= 20, f"{len(cap_lines)} log lines about the connection caps"

    # Everything answers again: probes, the quiet pod, and the hostile pod its own role.
    wait_until(lambda: bench.daemon.metrics_get("/readyz")[0] == 200, 10, "/readyz 200 after the connections closed")
    with NetnsThreads(bench.quiet.netns) as in_quiet, NetnsThreads(bench.hostile.netns) as in_hostile:
        quiet, _ = in_quiet.call(ask_credentials)
        hostile, _ = in_hostile.call(ask_credentials)
    assert quiet.get("ok") and quiet["role"] == "batch", f"the quiet pod after the connections closed: {quiet}"
    assert hostile.get("ok") and hostile["role"] == "web", f"the hostile pod after its connections closed: {hostile}"

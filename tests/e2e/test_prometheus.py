"""A real Prometheus scrapes iamlinkd, and what it sees matches what happened on the node.

Real parts: Debian's `prometheus` server running inside the bench's node namespace with a scrape
config of ours (iamlinkd's `metrics_listen` every second), its HTTP API queried with PromQL; the
bench as everywhere else (iamlinkd, pods through the CNI chain, the AWS CLI in the pods).
Emulated: STS by moto, as in every end-to-end suite.

Order matters in one place: Prometheus scrapes before any pod exists, so that the STS calls made
by prefetch and the AWS CLI land between two scrapes and `rate()` over them is defined.
"""

import socket
import time

import pytest

from conftest import STANDARD_PODS, add_standard_pods
from harness import is_assumed_role
from harness.prometheus import Prometheus, finite
from harness.util import wait_until

METRICS_LISTEN = "198.18.0.1:9101"
ROLE_PODS = [f"{ns}/{name}" for ns, name, role in STANDARD_PODS if role]
NO_ROLE_POD = "team-c/norole"


@pytest.fixture(scope="module")
def bench(make_module_bench):
    b = make_module_bench(daemon_settings={"metrics_listen": METRICS_LISTEN})
    b.started = time.time()
    b.prometheus = Prometheus(b.node, [METRICS_LISTEN])
    b.callback(b.prometheus.stop)
    b.prometheus.wait_targets_up(timeout=30)
    b.before = {q: b.prometheus.value(q) or 0.0 for q in (
        'iamlink_answers_total{outcome="credentials served"}',
        'iamlink_answers_total{outcome="no role"}',
    )}
    b.by_key = add_standard_pods(b)
    b.cli = {key: b.by_key[key].caller_arn() for key in ROLE_PODS + [NO_ROLE_POD]}
    return b


def metrics_get(bench, path):
    """(status, body) of GET path on iamlinkd's metrics port, from inside the node."""
    return bench.daemon.metrics_get(path, timeout=5)


def test_the_aws_cli_got_each_pods_role_and_nothing_for_the_pod_without_one(bench):
    for key in ROLE_PODS:
        rc, out, err = bench.cli[key]
        assert rc == 0, f"aws sts get-caller-identity in {key}: {err}"
        assert is_assumed_role(out, bench.by_key[key].role), f"{key}: {out}"
    rc, out, err = bench.cli[NO_ROLE_POD]
    assert rc != 0 and "Unable to locate credentials" in err, (rc, out, err)


def test_prometheus_scrapes_iamlinkd(bench):
    assert bench.prometheus.value(f'up{{job="iamlinkd",instance="{METRICS_LISTEN}"}}') == 1.0


def test_last_refresh_success_is_recent(bench):
    # The last successful AssumeRole happened while this bench lived (prefetch of its pods).
    age = bench.prometheus.wait_value("time() - iamlink_last_refresh_success_timestamp_seconds", finite,
                                      timeout=15)
    assert -2 <= age <= time.time() - bench.started + 2, f"last refresh success {age:.1f}s ago"


def test_credentials_served_answers_increased(bench):
    q = 'iamlink_answers_total{outcome="credentials served"}'
    before = bench.before[q]
    after = bench.prometheus.wait_value(q, lambda v: v is not None and v >= before + len(ROLE_PODS), timeout=15)
    assert after >= before + len(ROLE_PODS)


def test_the_pod_without_a_role_is_counted(bench):
    q = 'iamlink_answers_total{outcome="no role"}'
    before = bench.before[q]
    bench.prometheus.wait_value(q, lambda v: v is not None and v > before, timeout=15)


def test_sts_calls_succeeded(bench):
    ok = bench.prometheus.wait_value('iamlink_sts_calls_total{result="ok"}', lambda v: v is not None and v >= 1,
                                     timeout=15)
    assert ok >= 1
    errors = bench.prometheus.value('iamlink_sts_calls_total{result="error"}')
    assert not errors, f"{errors} STS calls failed against moto"


def test_sts_latency_p99_is_a_number(bench):
    q = "histogram_quantile(0.99, rate(iamlink_sts_call_seconds_bucket[1m]))"
    p99 = bench.prometheus.wait_value(q, finite, timeout=20)
    assert 0 < p99 <= 30, f"p99 AssumeRole latency {p99}s"


def test_store_records_equal_the_pods_of_the_bench(bench):
    pods = len(bench.pods.live)
    assert pods == len(STANDARD_PODS)
    bench.prometheus.wait_value("iamlink_store_records", lambda v: v == pods, timeout=15,
                                what=f"iamlink_store_records == {pods}")


def test_interception_entries_equal_the_pods_of_the_bench(bench):
    pods = len(bench.pods.live)
    # iamlinkd counts the map's entries with its periodic refresh (every 30 s), hence the wait.
    bench.prometheus.wait_value("iamlink_interception_entries", lambda v: v == pods, timeout=75,
                                what=f"iamlink_interception_entries == {pods}")


def test_healthz_and_readyz_answer_ok(bench):
    assert metrics_get(bench, "/healthz") == (200, "ok\n")
    assert metrics_get(bench, "/readyz") == (200, "ready\n")
    status, body = metrics_get(bench, "/metrics")
    assert status == 200 and "iamlink_store_records" in body, body[:500]


def test_iamlinkd_stops_at_start_naming_the_probes_address_when_another_process_holds_it(make_bench):
    """The DaemonSet's liveness and readiness probes use metrics_listen: a daemon that cannot bind
    it exits at once saying why, before touching the node, instead of being killed by kubelet a
    probe period later with no reason given."""
    bench = make_bench(start_daemon=False)

    def occupy():
        s = socket.socket()
        s.bind(("198.18.0.1", 9101))
        s.listen()
        return s

    holder = bench.node.call(occupy)
    try:
        bench.daemon.start(wait=False)
        wait_until(lambda: bench.daemon.proc.poll() is not None, 10, "iamlinkd exiting")
        assert bench.daemon.proc.returncode == 1, bench.daemon.log_tail()
        log = bench.daemon.log_text()
        assert "cannot listen for metrics and health checks on 198.18.0.1:9101" in log, log[-2000:]
        assert "Address already in use" in log and "probes" in log, log[-2000:]
        table = bench.node.exec(["nft", "list", "table", "inet", "iamlink"], check=False)
        assert table.returncode != 0, "iamlinkd stopped before installing the rule set"
    finally:
        holder.close()

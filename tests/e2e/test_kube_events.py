"""A pod refused its role gets a Kubernetes Event saying why (issue 24 item 7), so that
`kubectl describe pod` shows it, as kiam did: a Warning `IamlinkRoleRefused` regarding the pod
(its UID), with the same short reason as the pod's answer, once per (pod, refusal) with a series
count for the repeats, sent in the background at a bounded rate and never at the cost of the
pod's answer.

Real parts: network namespaces, the CNI chain with `iamlink`, nftables, `iamlinkd` (kube's event
recorder, events.k8s.io/v1), the unmodified AWS CLI in the pods, moto as STS behind the fault
proxy (tests/harness/sts_fault_proxy.py) that makes STS refuse a role. Emulated: the Kubernetes
API (tests/harness/kube_api.py), which checks Events as kube-apiserver's validation does.
"""

import re

import pytest

from harness import role_arn
from harness.sts_faults import StsFaultProxy
from harness.util import wait_until
from test_kube_roles import ensure_namespace, kube_pod, listing, wait_for_role

CREDS = "/latest/meta-data/iam/security-credentials/"
REASON = "IamlinkRoleRefused"
ROLES = ["web", "admin", "denied", "throttled"]


@pytest.fixture(scope="module")
def bench(make_module_bench):
    b = make_module_bench(pod_roles=[], kubernetes={}, start_daemon=False)
    for role in ROLES:
        b.moto.create_role(role)
    b.proxy = StsFaultProxy(b.node, b.moto)
    b.callback(b.proxy.stop)
    b.daemon.sts.update(endpoint=b.proxy.endpoint, timeout_seconds=3)
    # Legacy mode (the node's AssumeRole for annotated roles) everywhere but `no-legacy`.
    b.daemon.roles_extra = {"legacy_assume_role": False, "legacy_namespaces": ["locked", "team-sts"]}
    b.daemon.start()
    ensure_namespace(b, "locked", {"iam.amazonaws.com/permitted": "web"})
    return b


def events_of(bench, pod):
    """The Events in the pod's namespace that regard this pod (its UID)."""
    return [e for e in bench.kube.events(pod.namespace) if (e.get("regarding") or {}).get("uid") == pod.uid]


def wait_for_event(bench, pod, what=lambda e: True, timeout=10):
    """The pod's one Event once it satisfies `what` (polled, bounded: Events are sent in the background)."""
    def seen():
        found = events_of(bench, pod)
        return found[0] if len(found) == 1 and what(found[0]) else None
    try:
        return wait_until(seen, timeout, f"an Event on {pod}", interval=0.2)
    except Exception:
        raise AssertionError(f"{pod}: Events {events_of(bench, pod)}; iamlinkd:\n"
                             f"{bench.daemon.log_text()[-3000:]}") from None


def refused_pod(bench, name):
    """A pod in `locked` asking for `admin`, which the namespace does not permit; its 403 body."""
    pod = kube_pod(bench, "locked", name, {"iam.amazonaws.com/role": "admin"})
    # Until the view binds the pod it is pending (503), which is no refusal; exactly one 403 here.
    wait_until(lambda: listing(pod)[0] == 403, 15, f"{pod} refused by policy", interval=0.1)
    return pod


def series_count(event):
    return (event.get("series") or {}).get("count", 1)


def barrier(bench, name):
    """Events go out in order from one queue: once a later refusal's Event is in, an earlier
    answer that was going to make one has made it."""
    wait_for_event(bench, refused_pod(bench, name))


def api_errors(bench):
    """iamlink_kube_events_total{outcome="api error"}: Events the API server did not take."""
    text = bench.daemon.metrics_get("/metrics", timeout=5)[1]
    m = re.search(r'^iamlink_kube_events_total\{outcome="api error"\} (\S+)$', text, re.M)
    return 0 if m is None else float(m.group(1))


def test_a_pod_the_namespace_policy_refuses_gets_nothing_and_a_warning_event_on_it_says_why(bench):
    pod = refused_pod(bench, "greedy")
    rc, out, err = pod.caller_arn()
    assert rc != 0 and "admin" not in out, (out, err)
    status, body = listing(pod)
    assert status == 403 and "iam.amazonaws.com/permitted" in body, body

    event = wait_for_event(bench, pod)
    assert event["type"] == "Warning" and event["reason"] == REASON, event
    assert event["note"] == body.removeprefix("iamlink: ").strip(), "the Event says what the pod was told"
    assert event["regarding"]["kind"] == "Pod" and event["regarding"]["name"] == "greedy", event
    assert event["reportingController"] == "iamlink.io/iamlinkd", event
    assert event["reportingInstance"] == bench.node.name, event
    assert event["action"] == "DeniedByPolicy", event


def test_twenty_refusals_of_one_pod_are_one_event_counted_twenty_times(bench):
    pod = refused_pod(bench, "asks-twenty")
    wait_for_event(bench, pod)
    first = events_of(bench, pod)[0]
    for _ in range(19):  # the listing above was the first refusal
        assert listing(pod)[0] == 403
    event = wait_for_event(bench, pod, lambda e: series_count(e) == 20)
    assert event["metadata"]["name"] == first["metadata"]["name"], "the same Event, patched"
    assert len(events_of(bench, pod)) == 1


def test_sts_refusing_the_pods_role_is_an_event_naming_the_role_and_access_denied(bench):
    bench.proxy.fault("deny", role="denied")
    pod = kube_pod(bench, "team-sts", "p", {"iam.amazonaws.com/role": "denied"})
    wait_for_role(pod, "denied")
    answer = pod.imds("request", "GET", CREDS + "denied")
    assert answer["status"] == 503, answer
    event = wait_for_event(bench, pod)
    assert event["type"] == "Warning" and event["reason"] == REASON and event["action"] == "StsRefused", event
    # STS's own words on one line, not the SDK's dump of the response.
    assert event["note"].startswith(f"AssumeRole {role_arn('denied')}: AccessDenied: "), event["note"]
    assert "\n" not in event["note"] and "ErrorResponse" not in event["note"], event["note"]


def test_legacy_mode_off_for_the_namespace_is_an_event_saying_so(bench):
    pod = kube_pod(bench, "no-legacy", "kube2iam-0", {"iam.amazonaws.com/role": "web"})
    answer = {}

    def refused():
        answer.update(pod.imds("request", "GET", CREDS + "web"))
        return answer["status"] == 403
    wait_until(refused, 15, f"{pod} refused for legacy mode")
    event = wait_for_event(bench, pod)
    assert event["action"] == "TokenRefused", event
    assert event["note"] == answer["body"].removeprefix("iamlink: ").strip(), event["note"]
    assert "legacy mode" in event["note"] and "off for namespace no-legacy" in event["note"], event["note"]


def test_sts_throttling_is_not_the_pods_fault_and_makes_no_event(bench):
    bench.proxy.fault("throttle", role="throttled")
    pod = kube_pod(bench, "team-sts", "throttled", {"iam.amazonaws.com/role": "throttled"})
    wait_for_role(pod, "throttled")
    assert pod.imds("request", "GET", CREDS + "throttled")["status"] == 503
    barrier(bench, "after-throttled")
    assert events_of(bench, pod) == []


def test_a_served_pod_gets_no_event(bench):
    pod = kube_pod(bench, "locked", "served", {"iam.amazonaws.com/role": "web"})
    wait_for_role(pod, "web")
    rc, out, err = pod.caller_arn()
    assert rc == 0 and "assumed-role/web/" in out, (out, err)
    barrier(bench, "after-served")
    assert events_of(bench, pod) == []


def test_with_the_api_server_down_the_pod_is_answered_the_same_and_the_dropped_event_is_logged(bench):
    pod = refused_pod(bench, "api-down")
    wait_for_event(bench, pod)
    before = listing(pod)
    bench.kube.stop()
    try:
        assert listing(pod) == before, "the answer does not depend on the API server"
        dropped = re.compile(r"Kubernetes Event dropped.*pod=locked/api-down")
        wait_until(lambda: dropped.search(bench.daemon.log_text()), 10, "iamlinkd to log the dropped Event")
        assert api_errors(bench) >= 1
    finally:
        bench.kube.start()

"""The startup taint: iamlinkd removes `[kubernetes] startup_taint` from its own Node once it is
ready (rule set verified, listening, store and API view read), and no other taint, and not before.

Real parts: iamlinkd (the release build) in the test node's namespace with its nftables table.
Emulated: the Kubernetes API (tests/harness/kube_api_server.py: a Node object with the startup
taint among others; merge patches conditioned on resourceVersion answer 409 on a stale one, as
the API server does), STS (moto). The kubelet that registers the node with the taint, and the
scheduler that keeps ordinary pods off it meanwhile, are not part of the test.
"""

from harness import wait_until
from harness.daemonset import ruleset

STARTUP_TAINT = "iamlink.io/agent-not-ready"  # the default of [kubernetes] startup_taint
OTHERS = [{"key": "dedicated", "value": "gpu", "effect": "NoSchedule"},
          {"key": "node.cilium.io/agent-not-ready", "value": "true", "effect": "NoExecute"}]


def taints(bench):
    return bench.kube.get("nodes", None, bench.node.name)["spec"].get("taints") or []


def test_iamlinkd_removes_only_its_startup_taint_once_ready_and_not_before(make_bench):
    bench = make_bench(pod_roles=[], kubernetes={}, start_daemon=False)
    ours = {"key": STARTUP_TAINT, "value": "true", "effect": "NoExecute"}
    bench.kube.api("POST", "/api/v1/nodes", {
        "apiVersion": "v1", "kind": "Node", "metadata": {"name": bench.node.name},
        "spec": {"taints": [OTHERS[0], ours, OTHERS[1]]}})
    # Not ready until the API view is synced: namespaces cannot be listed yet.
    bench.kube.forbid("namespaces")
    bench.daemon.start()  # returns once it listens: the rule set was installed before that
    assert "table inet iamlink" in ruleset(bench.node)
    wait_until(lambda: bench.daemon.metrics_get("/readyz")[0] == 503, 10, "iamlinkd to say it is not ready")
    assert ours in taints(bench), "the startup taint was removed before iamlinkd was ready"

    bench.kube.forbid()
    wait_until(lambda: bench.daemon.metrics_get("/readyz")[0] == 200, 15, "iamlinkd ready")
    wait_until(lambda: ours not in taints(bench), 10, "the startup taint to be removed")
    assert taints(bench) == OTHERS, "another taint was changed"
    assert "removed the startup taint" in bench.daemon.log_text()


def test_iamlinkd_without_a_startup_taint_on_its_node_changes_nothing(make_bench):
    bench = make_bench(pod_roles=[], kubernetes={}, start_daemon=False)
    bench.kube.api("POST", "/api/v1/nodes", {"apiVersion": "v1", "kind": "Node",
                                             "metadata": {"name": bench.node.name}, "spec": {"taints": OTHERS}})
    before = bench.kube.get("nodes", None, bench.node.name)["metadata"]["resourceVersion"]
    bench.daemon.start()
    wait_until(lambda: "the node has no startup taint to remove" in bench.daemon.log_text(), 15,
               "iamlinkd to look at its node")
    node = bench.kube.get("nodes", None, bench.node.name)
    assert node["metadata"]["resourceVersion"] == before and node["spec"]["taints"] == OTHERS

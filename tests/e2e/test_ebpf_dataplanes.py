"""Under an eBPF dataplane, a pod gets its own role or nothing, never the node's (issue 22).

Stand-ins for the dataplanes (tests/bpf/*.c, built by clang here, attached by tcx with a loader
of the tests' own, tests/harness/tcx.py) do to a pod's packets what each one's program does:
Calico's FIB lookup and `bpf_redirect_neigh`, back to the stack on failure; Cilium's FIB lookup,
dropped on failure; Cilium's single-device `bpf_redirect_neigh` to the uplink with no lookup,
which skips netfilter and the ip rules alike. With `"ebpfGuard": true` iamlink's ADD puts its
guard (`iamlink_guard`) first at the host interface's tcx ingress, ahead of anything attached
then or later, so a metadata packet is dropped before a dataplane sees it.

Real parts: namespaces and veths, ptp + host-local + the built iamlink plugin through libcni, tcx
on this kernel, the built iamlinkd; the node's metadata service is the fake upstream (node role),
reached only by being forwarded. Until the pod-side DNAT (issue 22 item 2) the guarded pod's
metadata requests get no answer at all: that is what these tests accept besides its own role.
"""

import json
import os

import pytest

from harness import PYTHON, IAMLINKD, wait_until
from harness import tcx
from harness.imds_client import CREDS_PATH
from harness.util import IMDS_CLIENT, stop_process
from test_fail_closed import metric

STANDINS = {"calico": tcx.CALICO, "cilium-fib": tcx.CILIUM_FIB, "cilium-skip-fib": tcx.CILIUM_SKIP_FIB}
GUARD = "iamlink_guard"


@pytest.fixture(scope="module")
def bench(make_module_bench):
    b = make_module_bench(pods_options={"netconf": {"ebpfGuard": True}})
    uplink = int(b.node.exec(["cat", "/sys/class/net/imds0/ifindex"]).stdout)
    # The bench's node addresses (198.18.0.0/24: iamlinkd, moto) are what "addressed to the node" means.
    b.objects = {k: tcx.build(s, b.node.workdir, NATIVE_IFINDEX=uplink, NODE_NET="0xc6120000", NODE_PREFIX=24)
                 for k, s in STANDINS.items()}
    return b


def programs(bench, ifname, hook="ingress"):
    """The names of the programs at the interface's tcx hook, in the order they run."""
    return json.loads(bench.node.exec([PYTHON, tcx.__file__, "list", ifname, hook]).stdout)


def attach(bench, standin, ifname, where):
    bench.node.exec([PYTHON, tcx.__file__, "attach", bench.objects[standin], ifname, where])


def detach(bench, ifname, name):
    return int(bench.node.exec([PYTHON, tcx.__file__, "detach", ifname, name]).stdout)


def ask_for_10s(bench, pod):
    """The pod asks for credentials every 50 ms for 10 s (one new connection each); returns the
    loop's summary and the node-role answers the fake upstream served meanwhile."""
    served_before = len(bench.upstream.credential_requests())
    client = pod.spawn([PYTHON, IMDS_CLIENT, "loop", "--seconds", "10", "--timeout", "1", "--interval", "0.05"])
    try:
        out, err = client.communicate(timeout=30)
    finally:
        stop_process(client, timeout=5)
        bench.node.forget(client)
    summary = json.loads(out)
    node_role = bench.upstream.credential_requests()[served_before:]
    return summary, node_role


def wrong_answers(bench, pod, summary):
    """Answers with credentials that are not the pod's own role (listed or by moto's word)."""
    wrong = []
    for akid, entry in summary["keys"].items():
        wrong += [f"listed {r!r} x{n}" for r, n in entry["roles"].items() if r != pod.role]
        if bench.upstream.leaked(json.dumps(entry)):
            wrong.append(f"key {akid} is the node role's")
    return wrong


def new_pod(bench, name):
    pod = bench.pods.add("team-a", name)
    pod.role = name
    return pod


def assert_own_role_or_nothing(bench, pod, what, recorded=True):
    """No node-role or other answers; and, while the pod is recorded, its own role."""
    summary, node_role = ask_for_10s(bench, pod)
    wrong = wrong_answers(bench, pod, summary)
    assert not node_role and not wrong, (
        f"{what}: {len(node_role)} node-role answers served by the node's metadata service, other answers: "
        f"{wrong}; loop summary: {json.dumps(summary)[:600]}")
    if not recorded:
        return summary
    # And its own role: the pod-side DNAT addresses its metadata traffic to the node, which the
    # dataplane hands to the node's stack, past the guard (it drops only metadata addresses).
    own = sum(entry["roles"].get(pod.role, 0) for entry in summary["keys"].values())
    failed = sum(summary["errors"].values()) + sum(summary["statuses"].values()) + summary["no_credentials"]
    assert own >= 100 and failed <= own // 10, f"{what}: {own} own-role answers, {failed} failures: {json.dumps(summary)[:600]}"
    return summary


@pytest.fixture
def pod(bench):
    p = new_pod(bench, "web")
    yield p
    if not p.deleted:
        bench.pods.delete(p)


@pytest.mark.parametrize("standin", STANDINS)
def test_a_dataplane_attached_after_add_never_gets_the_pod_the_node_role(bench, pod, standin):
    attach(bench, standin, pod.host_ifname, "tail")
    assert_own_role_or_nothing(bench, pod, f"{standin} attached after ADD")
    assert programs(bench, pod.host_ifname) == [GUARD, STANDINS[standin][1]]


@pytest.mark.parametrize("standin", STANDINS)
def test_a_dataplane_that_insists_on_being_first_never_gets_the_pod_the_node_role(bench, pod, standin):
    attach(bench, standin, pod.host_ifname, "head")
    assert_own_role_or_nothing(bench, pod, f"{standin} attached at the head after ADD")


@pytest.mark.parametrize("standin", STANDINS)
def test_a_dataplane_attached_before_add_is_put_behind_the_guard(bench, standin):
    plugins = bench.pods.conflist["plugins"]
    saved_plugins, saved_bins = list(plugins), bench.pods.bin_dirs
    plugins.insert(len(plugins) - 1, {"type": "tcx-standin", "object": bench.objects[standin]})
    bench.pods.bin_dirs += ":" + tcx.plugin_bin_dir(bench.node.workdir)
    bench.pods._write_conflist()
    try:
        pod = new_pod(bench, "web")
    finally:
        bench.pods.conflist["plugins"] = saved_plugins
        bench.pods.bin_dirs = saved_bins
        bench.pods._write_conflist()
    try:
        assert programs(bench, pod.host_ifname) == [GUARD, STANDINS[standin][1]]
        assert_own_role_or_nothing(bench, pod, f"{standin} attached before ADD")
    finally:
        bench.pods.delete(pod)


def test_deleting_the_interfaces_clsact_qdisc_leaves_the_guard(bench, pod):
    bench.node.exec(["tc", "qdisc", "add", "dev", pod.host_ifname, "clsact"])
    bench.node.exec(["tc", "qdisc", "del", "dev", pod.host_ifname, "clsact"])
    assert programs(bench, pod.host_ifname) == [GUARD]


def test_a_repeated_add_leaves_exactly_one_guard_first(bench, pod):
    attach(bench, "calico", pod.host_ifname, "head")
    p = bench.pods.add_iamlink_again(pod)
    assert p.returncode == 0, p.stdout + p.stderr
    assert programs(bench, pod.host_ifname) == [GUARD, tcx.CALICO[1]]
    p = bench.pods.add_iamlink_again(pod)
    assert p.returncode == 0, p.stdout + p.stderr
    assert programs(bench, pod.host_ifname) == [GUARD, tcx.CALICO[1]]


def test_del_leaves_the_guard_to_go_with_the_pods_interface(bench, pod):
    """The pod's veth goes with the pod (the primary plugin's DEL, or its namespace), and its
    guard with it: iamlink's DEL spares itself the detach's RCU wait, and the guard, which only
    drops metadata packets, stays until then."""
    p = bench.pods.del_iamlink_only(pod)
    assert p.returncode == 0, p.stdout + p.stderr
    assert programs(bench, pod.host_ifname) == [GUARD]
    host = pod.host_ifname
    bench.pods.delete(pod)
    assert bench.node.exec(["ip", "link", "show", host], check=False).returncode != 0, f"{host} outlived DEL"


def test_del_keeps_the_guard_while_a_dataplane_runs_behind_it_until_the_interface_goes(bench, pod):
    """Between iamlink's DEL and the primary plugin's the pod still has its interface: without
    the guard, the dataplane's program would forward its metadata traffic to the node's service."""
    attach(bench, "cilium-skip-fib", pod.host_ifname, "tail")
    p = bench.pods.del_iamlink_only(pod)
    assert p.returncode == 0, p.stdout + p.stderr
    assert programs(bench, pod.host_ifname) == [GUARD, tcx.CILIUM_SKIP_FIB[1]]
    assert_own_role_or_nothing(bench, pod, "after iamlink's DEL, before the interface is gone", recorded=False)
    host = pod.host_ifname
    bench.pods.delete(pod)
    assert bench.node.exec(["ip", "link", "show", host], check=False).returncode != 0, f"{host} outlived DEL"


def test_iamlinkd_restores_a_detached_guard_first_in_line(bench, pod):
    attach(bench, "cilium-skip-fib", pod.host_ifname, "tail")
    repairs = metric(bench, 'iamlink_interception_repairs_total{what="tcx"}')
    assert detach(bench, pod.host_ifname, GUARD) == 1
    wait_until(lambda: programs(bench, pod.host_ifname) == [GUARD, tcx.CILIUM_SKIP_FIB[1]], 5,
               "iamlinkd putting the guard back first")
    assert metric(bench, 'iamlink_interception_repairs_total{what="tcx"}') == repairs + 1
    assert_own_role_or_nothing(bench, pod, "after the guard was detached and restored")


def test_status_and_explain_list_what_is_attached_to_a_pods_interface(bench, pod):
    attach(bench, "cilium-skip-fib", pod.host_ifname, "tail")
    p = bench.node.exec([IAMLINKD, "--config", bench.daemon.config_path, "status", "--json"], check=False)
    doc = json.loads(p.stdout)
    entry = next(e for e in doc["interfaces"] if e["containerId"] == pod.cid)
    assert entry["attached"]["tcxIngress"] == [GUARD, tcx.CILIUM_SKIP_FIB[1]], entry
    assert entry["attached"]["guardFirst"] is True, entry
    text = bench.node.exec([IAMLINKD, "--config", bench.daemon.config_path, "status"], check=False).stdout
    assert f"tcx ingress {GUARD}, {tcx.CILIUM_SKIP_FIB[1]} (guard first)" in text, text
    p = bench.node.exec([IAMLINKD, "--config", bench.daemon.config_path, "explain", pod.host_ifname], check=False)
    assert f"tcx ingress   {GUARD}, {tcx.CILIUM_SKIP_FIB[1]} (guard first)" in p.stdout, p.stdout

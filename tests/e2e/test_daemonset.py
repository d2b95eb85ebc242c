"""The DaemonSet's containers, as the chart renders them, run through containerd on a node: the
init containers set the node up and chain iamlink, iamlinkd with only NET_ADMIN and a read-only
root serves pods their own role, a rolling update gives no pod a wrong or the node's answer, deleting
only the pod leaves iamlink in place (pods refused, never the node's role), and uninstall-cni, or
deleting the DaemonSet then its pod, leaves the node as it was.

Real parts: the iamlink image of scripts/build-image (an OCI archive, imported with `ctr`), the
DaemonSet and ConfigMap of `helm template deploy/helm/iamlink` (the same DaemonSet as
deploy/kubernetes), translated into CRI calls by tests/harness/daemonset.py (which says what the
test overrides: host paths, STS endpoint, the API's kubeconfig, iamlinkd's AWS keys); containerd
1.6 and runc with its CRI plugin in the node's network namespace (tests/harness/containerd.py);
the node's conflist of ptp + host-local, which install-cni chains iamlink into; pod sandboxes made
through CRI with the unmodified AWS CLI and a stdlib IMDSv2 client in them. Emulated: STS (moto),
the Kubernetes API, the node's metadata service (serving a node role, so a leak would show).
"""

import collections
import json
import os
import time
import tomllib
import uuid

import pytest

from harness import PYTHON, is_assumed_role, role_of_arn, wait_until
from harness.daemonset import (NAMESPACE, DaemonSetRunner, loaded_cni_plugins, plain_chain_node, quantity,
                               render_chart, ruleset, same_as_manifest)
from harness.imds_client import CREDS_PATH
from harness.util import IMDS_CLIENT, stop_process

ROLE = "iam.amazonaws.com/role"
ROLES = ["web", "batch"]
ASK_INTERVAL = 0.05  # seconds between one pod's requests during the rolling update
AFTER_READY = 5.0    # seconds after the new iamlinkd is ready in which a stale IMDSv2 token may get 401
ANSWERS_EACH = 20    # answers each pod has from the old iamlinkd before the update, and from the new one after


@pytest.fixture(scope="module")
def node(make_module_bench):
    n = plain_chain_node(make_module_bench, ROLES)
    bench = n.bench
    with open(n.conflist_path, "r+") as f:  # as `jq .` writes it: two-space indent, a final newline
        text = json.dumps(json.load(f), indent=2) + "\n"
        f.seek(0)
        f.write(text)
    n.before = node_state(n)
    # The DaemonSet object, as `kubectl apply`/`helm install` leave it in the API: its pods' controller
    # reference names it (DaemonSetRunner registers each pod with it), and iamlinkd watches it.
    bench.kube.create_namespace(NAMESPACE)
    n.ds_path = f"/apis/apps/v1/namespaces/{NAMESPACE}/daemonsets"
    bench.kube.api("POST", n.ds_path, {"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": n.ds["metadata"],
                                       "spec": n.ds["spec"]})
    t0 = time.monotonic()
    n.ctd.start()
    n.runner = DaemonSetRunner(bench, n.ctd, n.ds, n.configmap)
    n.startup = time.monotonic() - t0
    n.pod = None
    return n


def node_state(n):
    """What uninstall-cni must give back: the conflist's bytes, the CNI bin dir, the nftables rule
    set and the routing-policy rules of the node's network namespace."""
    with open(n.conflist_path, "rb") as f:
        conflist = f.read()
    rules = [n.bench.node.exec(["ip", family, "rule", "show"]).stdout for family in ("-4", "-6")]
    return {"conflist": conflist, "bin dir": sorted(os.listdir(n.ctd.bin_dir)), "rule set": ruleset(n.bench.node),
            "ip rules": rules}


def sandbox(n, name, role=None, in_api=False):
    """A pod sandbox through CRI (its network by containerd's CNI chain), the role as a runtime
    annotation (in_api=False) or as the pod's annotation in the API."""
    uid = str(uuid.uuid4())
    annotations = {ROLE: role} if role else {}
    if in_api:
        if n.bench.kube.get("namespaces", None, "team-api") is None:
            n.bench.kube.create_namespace("team-api")
        n.bench.kube.create_pod("team-api", name, node=n.bench.node.name, uid=uid, annotations=annotations)
        s = n.ctd.run_sandbox("team-api", name, uid, annotations={})
    else:
        s = n.ctd.run_sandbox("team-rt", name, uid, annotations)
    s.role = role
    return s


def listing(s):
    r = s.imds("request", "GET", CREDS_PATH, "--timeout", 3)
    return r.get("status"), r.get("body", "").strip()


def assert_cli_role(n, s, role):
    """The AWS CLI (botocore's IMDS provider) in the sandbox: the pod's role, or no credentials."""
    rc, out, err = s.caller_arn()
    assert not n.bench.upstream.leaked(out + err), f"{s}: the node's credentials: {out!r} {err!r}"
    if role:
        assert rc == 0 and is_assumed_role(out, role), f"{s}: expected assumed-role/{role}: {rc} {out!r} {err!r}"
    else:
        assert rc != 0 and "Unable to locate credentials" in err, f"{s}: expected no credentials: {out!r} {err!r}"


def test_daemonset_sets_up_the_node_chains_iamlink_and_serves_pods_their_own_role(node, bench_report):
    n = node
    assert same_as_manifest(n.ds), "the chart's DaemonSet runs other containers than deploy/kubernetes/daemonset.yaml"
    t0 = time.monotonic()
    n.pod = n.runner.run_pod("iamlinkd-1")
    started = time.monotonic() - t0
    n.bench.extra_logs.append(("iamlinkd container", os.path.join(n.pod.log_dir, "iamlinkd.log")))

    # node-setup: tcp_fwmark_accept, and the listen address on a local interface.
    assert n.bench.node.exec(["cat", "/proc/sys/net/ipv4/tcp_fwmark_accept"]).stdout.strip() == "1"
    listen = tomllib.loads(n.runner.config_text)["listen"].rsplit(":", 1)[0]
    addrs = json.loads(n.bench.node.exec(["ip", "-j", "addr", "show"]).stdout)
    on = [a["ifname"] for a in addrs for i in a.get("addr_info", []) if i.get("local") == listen]
    assert len(on) == 1 and on[0] in ("iamlink0", "lo"), f"{listen} on {on}"

    # install-cni: the static plugin in the bin dir, iamlink last in the node's conflist.
    with open(n.conflist_path) as f:
        chain = json.load(f)["plugins"]
    assert [p["type"] for p in chain] == ["ptp", "iamlink"], chain
    assert chain[-1]["daemonAddress"].startswith(listen + ":"), chain[-1]
    assert "iamlink" in os.listdir(n.ctd.bin_dir)
    wait_until(lambda: loaded_cni_plugins(n.ctd.cri)[-1:] == ["iamlink"], 10, "containerd to load the new conflist")

    # iamlinkd runs with exactly what the manifest grants: uid 0, CAP_NET_ADMIN alone, read-only root.
    _, info = n.ctd.cri.container_status(n.pod.containers["iamlinkd"])
    spec = info["runtimeSpec"]
    assert spec["root"].get("readonly") is True
    assert spec["process"]["user"]["uid"] == 0 and spec["process"].get("noNewPrivileges") is True
    caps = spec["process"]["capabilities"]
    assert {k: sorted(v) for k, v in caps.items() if v} == {k: ["CAP_NET_ADMIN"] for k in ("bounding", "effective",
                                                                                            "permitted")}, caps
    limits = n.runner.spec.container("iamlinkd")["resources"]["limits"]
    assert spec["linux"]["resources"]["memory"]["limit"] == quantity(limits["memory"]), spec["linux"]["resources"]
    port, path = n.runner.spec.probe_target(n.runner.spec.container("iamlinkd"), "livenessProbe")
    assert n.runner.http_get(port, path)[0] == 200

    web = sandbox(n, "web", "web")                    # role from the runtime annotation
    batch = sandbox(n, "batch", "batch", in_api=True)  # role from the pod's annotation in the API
    plain = sandbox(n, "plain", in_api=True)           # no role (in the API: iamlinkd waits for unknown pods)
    try:
        for s in (web, batch):
            wait_until(lambda: listing(s) == (200, s.role), 15, f"{s} to list {s.role}", interval=0.1)
            assert_cli_role(n, s, s.role)
        wait_until(lambda: listing(plain)[0] == 404, 15, f"{plain} to be told it has no role", interval=0.1)
        assert_cli_role(n, plain, None)
    finally:
        for s in (web, batch, plain):
            n.ctd.stop_and_remove(s)
    bench_report(f"daemonset: containerd + image import {n.startup:.1f}s, pod (2 init containers + iamlinkd "
                 f"ready) {started:.1f}s, listen address on {on[0]}, 3 sandboxes")


def test_rolling_update_gives_no_pod_a_wrong_or_node_answer(node, bench_report):
    n = node
    assert n.pod is not None, "the DaemonSet's pod did not start (first test)"
    pods = [sandbox(n, "web-2", "web"), sandbox(n, "batch-2", "batch", in_api=True), sandbox(n, "plain-2", in_api=True)]
    clients = {}
    try:
        for s in pods:
            want = (200, s.role) if s.role else (404, "iamlink: this pod has no role")
            wait_until(lambda: listing(s) == want, 15, f"{s} to be answered", interval=0.1)
        for s in pods:
            clients[s.name] = s.spawn([PYTHON, IMDS_CLIENT, "loop", "--seconds", "60", "--timeout", "2",
                                       "--interval", str(ASK_INTERVAL), "--timeline"])
        old = n.pod
        answered = lambda p: all(answers_in_log(p, s) >= ANSWERS_EACH for s in pods)  # noqa: E731
        wait_until(lambda: answered(old), 15, "every client to be answered by the old iamlinkd")
        stopping = time.monotonic()
        n.runner.delete_pod(old)          # maxSurge 0: the old pod is gone before the new one starts
        gone = time.monotonic()
        n.pod = n.runner.run_pod("iamlinkd-2")
        n.bench.extra_logs.append(("new iamlinkd container", os.path.join(n.pod.log_dir, "iamlinkd.log")))
        ready = time.monotonic()
        wait_until(lambda: answered(n.pod), 15, "every client to be answered by the new iamlinkd")
    finally:
        summaries = {}
        for name, client in clients.items():
            stop_process(client, timeout=10)
            out, err = client.communicate(timeout=10)
            n.bench.node.forget(client)
            summaries[name] = (out.decode("utf-8", "replace"), err.decode("utf-8", "replace"))
        for s in pods:
            n.ctd.stop_and_remove(s)

    wrong, node_role, keys, refusals, answers = [], [], {}, collections.Counter(), 0
    for s in pods:
        out, err = summaries[s.name]
        if n.bench.upstream.leaked(out):
            node_role.append(s.name)
        summary = json.loads(out)
        answers += summary["answers"]
        for akid, entry in summary["keys"].items():
            for listed, count in entry["roles"].items():
                if listed != s.role:
                    wrong.append(f"{s.name}: listed {listed!r} x{count}")
            keys.setdefault(akid, (s, entry["creds"]))
        for first, last, outcome, count in summary["timeline"]:
            if outcome in ("ok", "no-credentials"):
                continue
            refusals[outcome] += count
            if not (stopping <= first and last <= ready + AFTER_READY):
                wrong.append(f"{s.name}: {outcome} x{count} outside the switch ({first - stopping:.2f}s)")
        resumed = [f for f, _, o, _ in summary["timeline"] if o in ("ok", "no-credentials") and f >= gone]
        assert resumed, f"{s.name}: no answer from the new iamlinkd: {summary['timeline']}"
    for akid, (s, creds) in keys.items():
        arn = n.bench.moto.caller_arn(creds)
        if role_of_arn(arn) != s.role:
            wrong.append(f"{s.name}: key {akid} belongs to {arn}")
    bench_report(f"daemonset rolling update: {answers} answers checked from {len(pods)} pods every "
                 f"{ASK_INTERVAL * 1000:.0f} ms, {len(wrong)} wrong, {len(node_role)} node-role, refusals during "
                 f"the switch {sum(refusals.values())} {dict(refusals)}, old pod deletion to new one ready "
                 f"{ready - stopping:.1f}s (deletion {gone - stopping:.1f}s)")
    assert not node_role, f"the node's credentials reached {node_role}"
    assert not wrong, f"wrong answers: {wrong[:20]}"


def answers_in_log(pod, s):
    """Answers (credentials or no role) to sandbox `s` that iamlinkd's container logged (its audit
    lines go to stderr, i.e. the container's log)."""
    text = pod.log("iamlinkd", lines=100000)
    return sum(f'"pod":"{s.namespace}/{s.name}"' in line and ('"credentials served"' in line or '"no role"' in line)
               for line in text.splitlines())


def test_deleting_only_the_pod_keeps_iamlink_on_the_node_and_its_pods_refused_until_the_next_pod(node):
    """A rolling update's first half: the DaemonSet stays, its pod goes. Everything iamlink put on the
    node stays, so a pod is refused (never the node's role) until the next iamlinkd serves it again."""
    n = node
    assert n.pod is not None, "the DaemonSet's pod did not start (first test)"
    web = sandbox(n, "web-3", "web")
    try:
        wait_until(lambda: listing(web) == (200, "web"), 15, f"{web} to list web", interval=0.1)
        installed = node_state(n)
        old = n.pod
        n.runner.delete_pod(old)
        n.pod = None
        assert "pods stay intercepted" in old.log("iamlinkd", lines=50)
        after = node_state(n)
        for what in installed:
            assert after[what] == installed[what], f"{what} changed when only the pod was deleted:\n{after[what]}"
        r = web.imds("request", "GET", CREDS_PATH, "--timeout", 3)
        assert not n.bench.upstream.leaked(json.dumps(r)), f"the node's credentials with iamlinkd gone: {r}"
        assert r.get("error") == "refused", f"expected connection refused with iamlinkd gone: {r}"
        n.pod = n.runner.run_pod("iamlinkd-3")
        wait_until(lambda: listing(web) == (200, "web"), 15, f"{web} to list web from the next iamlinkd", interval=0.1)
    finally:
        n.ctd.stop_and_remove(web)


def test_uninstall_cni_leaves_the_node_as_before_the_install(node):
    n = node
    assert n.pod is not None, "the DaemonSet's pod did not start (first test)"
    n.runner.delete_pod(n.pod)  # kubectl delete: the daemons go first ([cni] manage would put the entry back)
    n.pod = None
    install = n.runner.spec.container("install-cni")
    command = install["command"][:install["command"].index("install-cni")] + ["uninstall-cni"]
    # uninstall-cni also removes the rule set and routing-policy rules (NET_ADMIN) under the store's
    # lock (/run/iamlink): the daemon container's securityContext and mounts, not install-cni's.
    log = n.runner.run_one_off("uninstall-cni", "iamlinkd", command)
    after = node_state(n)
    for what in n.before:
        assert after[what] == n.before[what], f"{what} differs after uninstall-cni:\n{after[what]}\n" \
                                              f"before:\n{n.before[what]}\nuninstall-cni said: {log}"


def test_deleting_the_daemonset_then_its_pod_leaves_the_node_as_before_the_install(node):
    """`helm uninstall` or `kubectl delete -k`: the DaemonSet object goes, then its pods. Each
    iamlinkd, stopping, sees its DaemonSet gone and takes iamlink off its node: no per-node cleanup
    pod is needed."""
    n = node
    if n.pod is None:  # the previous test ran uninstall-cni: install again
        n.pod = n.runner.run_pod("iamlinkd-4")
    pod = n.pod
    assert node_state(n)["rule set"] != n.before["rule set"], "iamlink is installed"
    n.bench.kube.api("DELETE", f"{n.ds_path}/{n.ds['metadata']['name']}")
    wait_until(lambda: "DaemonSet is being removed" in pod.log("iamlinkd", lines=50), 10,
               "iamlinkd to see its DaemonSet deleted")
    # The uninstall goes on removing the rest (helm deletes RBAC and the service account right after the
    # DaemonSet): by the time the pod stops iamlinkd may read neither its pod nor its DaemonSet.
    n.bench.kube.forbid("daemonsets", "pods")
    try:
        n.runner.delete_pod(pod)  # what the garbage collector, then the kubelet, do next
    finally:
        n.bench.kube.forbid()
    n.pod = None
    assert "taking iamlink off the node" in pod.log("iamlinkd", lines=50)
    after = node_state(n)
    for what in n.before:
        assert after[what] == n.before[what], f"{what} differs after the DaemonSet and its pod were deleted:\n" \
                                              f"{after[what]}\nbefore:\n{n.before[what]}\niamlinkd said:\n" \
                                              f"{pod.log('iamlinkd', lines=15)}"


def test_a_pod_spec_key_the_translation_does_not_know_fails_the_test():
    """A manifest change the CRI translation cannot run fails, naming the key: no silent gap."""
    from harness.containerd import cri_api
    from harness.daemonset import PodSpec, Untranslated

    pb, _ = cri_api()
    ds, configmap = render_chart()
    PodSpec(ds, configmap, pb)  # the chart as it is translates
    changes = {
        "hostPID": lambda spec: spec.update(hostPID=True),
        "a capability-like key": lambda spec: spec["containers"][0]["securityContext"].update(procMount="Unmasked"),
        "a new volume kind": lambda spec: spec["volumes"].append({"name": "x", "secret": {"secretName": "x"}}),
        "an env from a secret": lambda spec: spec["containers"][0]["env"].append(
            {"name": "X", "valueFrom": {"secretKeyRef": {"name": "x", "key": "y"}}}),
    }
    for what, change in changes.items():
        changed = json.loads(json.dumps(ds))
        change(changed["spec"]["template"]["spec"])
        try:
            PodSpec(changed, configmap, pb)
        except Untranslated:
            continue
        raise AssertionError(f"{what}: translated as if the test knew what it means")

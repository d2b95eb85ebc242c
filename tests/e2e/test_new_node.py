"""A new node: pods whose network came through the primary CNI's chain alone (before install-cni
chained iamlink) get no answer with the node's role from the end of iamlink's first init container
(node-setup, whose first command installs the interception table) on, through install-cni and
iamlinkd's start; and a layout change in a rolling update fails pod creation (code 102) only
between node-setup's end and install-cni's.

Real parts: the iamlink image (scripts/build-image; `IAMLINK_IMAGE_ARCHIVE` names a branch's own),
the DaemonSet and ConfigMap of `helm template deploy/helm/iamlink` translated into CRI calls
(tests/harness/daemonset.py), containerd 1.6 and runc in the node's network namespace, the node's
plain conflist (ptp + host-local: the primary CNI, iamlink not chained) through which the pods'
sandboxes get their network, and a stdlib IMDSv2 client in the pod asking every 50 ms.
Emulated: the node's metadata service (tests/harness/upstream.py, serving a *node role* so that a
leak shows), STS (moto), the Kubernetes API; the primary CNI writing its conflist (the test writes
it); the gap between that conflist and install-cni chaining iamlink into it, which on a node lasts
as long as the kubelet takes to start install-cni and here is widened by pausing install-cni
(`ctr tasks pause`, the cgroup freezer) until the pod exists, so that the pod is created through
the plain chain on every run.

The boundary: a pod that asks before anything of iamlink runs on the node (before its DaemonSet
pod is scheduled) cannot be protected by iamlink's containers; that window is the startup taint's
(`[kubernetes] startup_taint`: nodes registered with it run no ordinary pod until iamlinkd is
ready). The first test shows that window exists (node-role answers before node-setup's end, which
the bench's no-leak invariant is told to expect) and asserts only that it is there; from the
DaemonSet pod's creation to node-setup's end (sandbox, container start: about 0.2-0.8 s here) the
pod still gets the node's role: nothing of iamlink has run yet.
"""

import json
import os
import re
import select
import threading
import time
import tomllib
import uuid

import pytest

from harness import PYTHON, wait_until
from harness.daemonset import DaemonSetRunner, loaded_cni_plugins, plain_chain_node, ruleset
from harness.upstream import NODE_ROLE
from harness.util import IMDS_CLIENT, run, stop_process

ROLE = "iam.amazonaws.com/role"
POD_ROLE = "web"
ASK_INTERVAL = 0.05      # seconds between the pod's requests
ANSWERS_AFTER_READY = 5  # outcomes after iamlinkd is ready before the client stops
NODE_ROLE_ANSWER = f"ok:{NODE_ROLE}"


@pytest.fixture(scope="module")
def node(make_module_bench):
    n = plain_chain_node(make_module_bench, [POD_ROLE])
    bench = n.bench
    # A primary CNI gives pods a default route (aws-vpc-cni, Calico): the metadata address is
    # reached through the node without iamlink's route.
    with open(n.conflist_path) as f:
        conflist = json.load(f)
    conflist["plugins"][0]["ipam"]["routes"].append({"dst": "0.0.0.0/0"})
    n.plain_conflist = json.dumps(conflist, indent=2) + "\n"
    n.ctd.start()
    n.runner = DaemonSetRunner(bench, n.ctd, n.ds, n.configmap)
    n.pod = None
    return n


def plain_node(n):
    """The node as before iamlink: no DaemonSet pod, iamlink not chained, no table."""
    if n.pod is not None:
        n.runner.delete_pod(n.pod)
        n.pod = None
        install = n.runner.spec.container("install-cni")
        command = install["command"][:install["command"].index("install-cni")] + ["uninstall-cni"]
        n.runner.run_one_off("uninstall-cni", "iamlinkd", command)
    with open(n.conflist_path, "w") as f:
        f.write(n.plain_conflist)
    assert "iamlink" not in ruleset(n.bench.node), "the node has an iamlink table before the test"
    wait_until(lambda: loaded_cni_plugins(n.ctd.cri)[-1:] == ["ptp"], 10, "containerd to load the plain conflist")


def sandbox(n, name):
    """A pod sandbox with a role (runtime annotation), its network by containerd's current chain."""
    return n.ctd.run_sandbox("team-rt", name, str(uuid.uuid4()), {ROLE: POD_ROLE})


def records_of(n, s):
    """The store's records of sandbox `s` (none: its network came through the plain chain)."""
    d = os.path.join(n.bench.store_dir, "records")
    return [f for f in os.listdir(d) if f.startswith(s.id)] if os.path.isdir(d) else []


def ask(s):
    """The pod's client: IMDSv2 every ASK_INTERVAL, each answer's listed role in its timeline.
    Returns once it has its first outcome (whatever it is: the client says so on stderr)."""
    client = s.spawn([PYTHON, IMDS_CLIENT, "loop", "--seconds", "60", "--timeout", "1", "--say-first",
                      "--interval", str(ASK_INTERVAL), "--timeline", "--timeline-roles"])
    readable, _, _ = select.select([client.stderr], [], [], 10)
    line = client.stderr.readline() if readable else b""
    assert line == b"first outcome\n", f"{s}: the client did not ask: {line!r} (exit {client.poll()})"
    return client


def stop(n, client):
    """The client's summary, after it ran ANSWERS_AFTER_READY intervals more (a measured span)."""
    time.sleep(ASK_INTERVAL * (ANSWERS_AFTER_READY + 5))
    stop_process(client, timeout=10)
    out, err = client.communicate(timeout=10)
    n.bench.node.forget(client)
    assert out.strip(), f"the pod's client printed nothing: {err.decode('utf-8', 'replace')}"
    return json.loads(out)


def abandon(n, client):
    """A client whose summary is not wanted (the test failed before): stopped, forgotten."""
    if client is not None:
        stop_process(client, timeout=10)
        n.bench.node.forget(client)


def monotonic_of(wall_ns):
    """A CRI timestamp (wall clock, ns) on time.monotonic()'s clock, as the client's timeline."""
    return wall_ns / 1e9 - (time.time() - time.monotonic())


def judged(summary, since):
    """(node-role runs ending after `since`, other roles listed, outcome counts after `since`)."""
    node_role, other_role, counts = [], [], {}
    for first, last, outcome, count in summary["timeline"]:
        if last < since:
            continue
        counts[outcome] = counts.get(outcome, 0) + count
        if outcome == NODE_ROLE_ANSWER:
            node_role.append((round(first - since, 3), round(last - since, 3), count))
        elif outcome.startswith("ok:") and outcome != f"ok:{POD_ROLE}":
            other_role.append((outcome, count))
    return node_role, other_role, counts


def asked_until(summary):
    return max(last for _, last, _, _ in summary["timeline"])


def node_role_served_to(n, s, since):
    """The node's metadata service's own log: credential requests of `s` it answered after `since`."""
    return [r for r in n.bench.upstream.credential_requests() if r["client"] == s.ip and r["t"] >= since]


def test_a_pod_of_the_plain_chain_gets_no_node_role_answer_once_node_setup_ran(node, bench_report):
    """A pod created through the primary CNI's chain, asking every 50 ms from before iamlink's pod
    starts: from the end of its first init container (node-setup) on, through install-cni and
    iamlinkd's start, not one answer carries the node's role."""
    n = node
    plain_node(n)
    s = sandbox(n, "early")
    client = None
    try:
        assert records_of(n, s) == [], "the pod's network came through iamlink: the test needs the plain chain"
        client = ask(s)
        started = time.monotonic()
        n.pod = n.runner.run_pod("iamlinkd-new-node")
        n.bench.extra_logs.append(("iamlinkd container", os.path.join(n.pod.log_dir, "iamlinkd.log")))
        ready = time.monotonic()
        summary = stop(n, client)
        client = None
    finally:
        abandon(n, client)
        n.ctd.stop_and_remove(s)
    status, _ = n.ctd.cri.container_status(n.pod.containers["node-setup"])
    setup_done = monotonic_of(status.finished_at)
    # Before node-setup ran nothing of iamlink is on the node: the startup taint's window.
    n.bench.upstream.expect_before(s.ip, setup_done)
    before = [(round(first - setup_done, 3), c) for first, _, o, c in summary["timeline"]
              if first < setup_done and o == NODE_ROLE_ANSWER]
    node_role, other_role, counts = judged(summary, setup_done)
    served = node_role_served_to(n, s, setup_done)
    bench_report(f"new node, plain-chain pod: node-role answers before node-setup ended (the startup taint's "
                 f"window: iamlink's pod created {setup_done - started:.2f}s before its end): {before}; from node-setup's "
                 f"end: {counts}, node-role runs (s after its end: first, last, count) {node_role}; node-setup's "
                 f"end to iamlinkd ready {ready - setup_done:.1f}s")
    assert before, "the pod never reached the node's metadata service before iamlink: the emulation is off"
    assert asked_until(summary) >= ready + ANSWERS_AFTER_READY * ASK_INTERVAL, f"too few outcomes after ready: {summary}"
    assert not other_role, f"another role listed: {other_role}"
    assert not node_role and not served, (
        f"the node's role answered after node-setup ended (seconds since: first, last, count): {node_role}; "
        f"the node's metadata service served {len(served)} credential requests of the pod since; outcomes since "
        f"node-setup ended: {counts}")


def test_install_cni_waits_for_the_primary_cni_and_a_pod_created_meanwhile_gets_no_node_role(node, bench_report):
    """iamlink's pod on a node whose CNI conf dir is still empty: install-cni waits (no exit, no
    CrashLoopBackOff); the primary CNI's conflist appears and a pod is created through it before
    install-cni chained iamlink: that pod gets not one node-role answer, then or after."""
    n = node
    plain_node(n)
    os.remove(n.conflist_path)
    outcome = {}

    def start_pod():
        try:
            outcome["pod"] = n.runner.run_pod("iamlinkd-waits")
        except BaseException as e:  # noqa: B036 (reported by the test's thread)
            outcome["error"] = e
        outcome["ready"] = time.monotonic()

    starter = threading.Thread(target=start_pod, name="run_pod", daemon=True)
    starter.start()

    def waiting():
        if "error" in outcome:
            raise AssertionError(f"iamlink's pod did not wait for the primary CNI: {outcome['error']}")
        pods = [p for p in n.runner.pods if p.name == "iamlinkd-waits"]
        return pods and "install-cni" in pods[0].containers and "waiting" in pods[0].log("install-cni")

    wait_until(waiting, 20, "install-cni to wait for the primary CNI's config")
    (pod,) = [p for p in n.runner.pods if p.name == "iamlinkd-waits"]
    install_cni = pod.containers["install-cni"]
    ctr = ["ctr", "-a", n.ctd.socket, "-n", "k8s.io", "tasks"]
    s = client = None
    run(ctr + ["pause", install_cni])  # the gap between the primary CNI's conflist and the chaining
    try:
        with open(n.conflist_path + ".tmp", "w") as f:  # as a CNI writes it: whole, then renamed
            f.write(n.plain_conflist)
        os.rename(n.conflist_path + ".tmp", n.conflist_path)
        wait_until(lambda: loaded_cni_plugins(n.ctd.cri)[-1:] == ["ptp"], 10, "containerd to load the primary CNI's conflist")
        s = sandbox(n, "meanwhile")
        assert records_of(n, s) == [], "the pod's network came through iamlink: the test needs the plain chain"
        client = ask(s)
        resumed = time.monotonic()
    finally:
        run(ctr + ["resume", install_cni])
        starter.join(60)
    try:
        assert "pod" in outcome, f"iamlink's pod did not become ready: {outcome.get('error')}"
        n.pod = outcome["pod"]
        summary = stop(n, client)
        client = None
    finally:
        abandon(n, client)
        if s is not None:
            n.ctd.stop_and_remove(s)
    with open(n.conflist_path) as f:
        assert [p["type"] for p in json.load(f)["plugins"]] == ["ptp", "iamlink"], "install-cni did not chain iamlink"
    node_role, other_role, counts = judged(summary, 0)
    bench_report(f"new node, empty CNI conf dir: install-cni waited; pod created through the plain chain asked "
                 f"from {resumed - summary['timeline'][0][0]:.2f}s before install-cni resumed to "
                 f"{outcome['ready'] - resumed:.1f}s after (iamlinkd ready): {counts}")
    assert summary["timeline"][0][0] < resumed, "the pod did not ask before install-cni chained iamlink"
    assert asked_until(summary) >= outcome["ready"] + ANSWERS_AFTER_READY * ASK_INTERVAL, f"too few outcomes: {summary}"
    assert not other_role, f"another role listed: {other_role}"
    served = node_role_served_to(n, s, 0)
    assert not node_role and not served, (f"the node's role answered (seconds: first, last, count): {node_role}; the "
                                          f"node's metadata service served {len(served)}; outcomes: {counts}")


OLD_MASK, NEW_MASK = "0x307f", "0x207f"  # a layout change: another mark_mask in the ConfigMap


def test_a_layout_change_in_a_rolling_update_refuses_pod_creation_only_until_install_cni_chained(node, bench_report):
    """The upgrade (README "Upgrading"): the ConfigMap's mark_mask changes, the DaemonSet's pod is
    replaced; sandboxes are created back to back all along. node-setup rebuilds the table at the
    new layout first, so ADD (the plugin reading the old conflist's markMask) fails with code 102
    from then (install-table, node-setup's first command) until install-cni rewrote the conflist;
    never before node-setup, never after
    install-cni, and no pod is created at the old layout into the new table."""
    n = node
    plain_node(n)
    config = os.path.join(n.runner.config_dir, "iamlinkd.toml")
    with open(config) as f:
        old_text = f.read()
    assert tomllib.loads(old_text)["mark_mask"] == int(OLD_MASK, 16)
    new_text = re.sub(r"(?m)^mark_mask = .*$", f"mark_mask = {NEW_MASK}", old_text)
    assert tomllib.loads(new_text)["mark_mask"] == int(NEW_MASK, 16)
    n.pod = n.runner.run_pod("iamlinkd-old")
    made, stop_making = [], threading.Event()

    def make_sandboxes():
        i = 0
        while not stop_making.is_set() and i < 200:
            i += 1
            t0 = time.monotonic()
            try:
                s = sandbox(n, f"upgrade-{i}")
                made.append((t0, time.monotonic(), "ok", s))
            except Exception as e:  # the CRI error: the plugin's CNI error, as a kubelet sees it
                made.append((t0, time.monotonic(), str(e), None))

    maker = threading.Thread(target=make_sandboxes, name="sandboxes", daemon=True)
    try:
        with open(config, "w") as f:
            f.write(new_text)
        maker.start()
        wait_until(lambda: len(made) >= 3, 15, "sandboxes created under the old iamlinkd")
        deleting = time.monotonic()
        n.runner.delete_pod(n.pod)
        n.pod = n.runner.run_pod("iamlinkd-new")
        ready = time.monotonic()
        wait_until(lambda: sum(1 for t0, _, r, _ in made if t0 > ready and r == "ok") >= 3, 15,
                   "sandboxes created under the new iamlinkd")
    finally:
        stop_making.set()
        maker.join(30)
        with open(config, "w") as f:
            f.write(old_text)
        for _, _, _, s in made:
            if s is not None:
                n.ctd.stop_and_remove(s)
    end = {}
    for name in ("node-setup", "install-cni"):
        status, _ = n.ctd.cri.container_status(n.pod.containers[name])
        end[name] = monotonic_of(status.finished_at)
        if name == "node-setup":
            # install-table is node-setup's first command: the new layout (and 102) from then on.
            setup_start = monotonic_of(status.started_at)
    failed = [(round(t0 - end["node-setup"], 3), round(t1 - end["node-setup"], 3), r) for t0, t1, r, _ in made
              if r != "ok"]
    bench_report(f"upgrade ({OLD_MASK} → {NEW_MASK}): {len(made)} sandboxes created back to back from "
                 f"{deleting - made[0][0]:.1f}s before the old pod's deletion; {len(failed)} failed; node-setup's end "
                 f"to install-cni's end {end['install-cni'] - end['node-setup']:.2f}s (the 102 window), deletion to "
                 f"iamlinkd ready {ready - deleting:.1f}s; failures (s after node-setup's end: start, end): "
                 f"{[(a, b) for a, b, _ in failed]}")
    for a, b, why in failed:
        assert "102" in why or "layout" in why, f"a sandbox failed otherwise than on the layout: {why}"
        assert b >= setup_start - end["node-setup"] and a <= end["install-cni"] - end["node-setup"], \
            f"a sandbox failed outside node-setup's start..install-cni's end ({a}s..{b}s): {why}"


def test_install_table_leaves_a_table_that_is_already_right_untouched(node):
    """node-setup's install-table on a node whose table is already right (a restarted pod, a
    rollout without a layout change): not one nf_tables object is replaced, running pods keep
    their entries."""
    n = node
    plain_node(n)
    n.pod = n.runner.run_pod("iamlinkd-table")
    s = n.ctd.run_sandbox("team-rt", "kept", str(uuid.uuid4()), {ROLE: POD_ROLE})  # through iamlink now
    try:
        assert records_of(n, s), "the pod has no record: iamlink is not chained"
        listing = ["nft", "-a", "list", "table", "inet", "iamlink"]  # with handles: a rebuild renumbers them
        before = n.bench.node.exec(listing).stdout
        log = n.runner.run_one_off("install-table", "node-setup",
                                   ["/usr/local/bin/iamlinkd", "--config", "/etc/iamlink/iamlinkd.toml", "install-table"])
        assert n.bench.node.exec(listing).stdout == before, f"install-table changed the table: {log}"
        assert "already in place: not touched" in log, log
    finally:
        n.ctd.stop_and_remove(s)

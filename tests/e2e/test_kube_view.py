"""iamlinkd's view of the Kubernetes API (node-server/src/role/kube_view.rs) against an API server that
comes and goes.

Real parts: the daemon's `kube_view` module (kube 5 reflectors, field selector, backoff) built into
the `kube_view_probe` example, run in the node namespace, which prints the view as JSON lines.
Emulated: the Kubernetes API server (tests/harness/kube_api.py: kmock's KubernetesEmulator plus
our resourceVersions, selectors, resumable watches and 410 Gone), on 198.18.0.5:6443 in the node.

Every wait is on a line the probe prints, with a deadline; none is a sleep.
"""

import json
import os
import queue
import subprocess
import threading
import time

import pytest

from harness import Node, REPO
from harness.kube_api import KubeApi, POD_ROLE, SA_ROLE

PROBE = os.path.join(REPO, "target", "release", "examples", "kube_view_probe")
NODE = "node-1"
OTHER_NODE = "node-2"
# kube's default backoff starts at 0.8 s and doubles (jittered) while the server is down, and a
# relist after 410 Gone waits one more backoff step: catching up after an outage takes seconds.
CATCH_UP = 30


@pytest.fixture(scope="module")
def probe_binary():
    if not os.access(PROBE, os.X_OK):
        subprocess.run(["cargo", "build", "--release", "-p", "iamlinkd", "--example", "kube_view_probe"],
                       cwd=REPO, check=True, timeout=900)
    return PROBE


class Probe:
    """kube_view_probe in the node: the latest view, pod changes and log lines, read by threads."""

    def __init__(self, node, kube, binary, seconds=120):
        self.stderr_lines = []
        self.pod_changes = []
        self.view = None
        self._lines = queue.Queue()
        self.proc = node.spawn([binary, kube.kubeconfig_path, NODE, str(seconds)],
                               env={"PATH": "/usr/bin:/bin", "IAMLINKD_LOG": "info"},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.node = node
        for stream, sink in ((self.proc.stdout, self._lines.put), (self.proc.stderr, self._log)):
            threading.Thread(target=self._read, args=(stream, sink), daemon=True).start()

    def _log(self, line):
        self.stderr_lines.append(line)
        self._lines.put(None)  # wakes waiters on log lines

    @staticmethod
    def _read(stream, sink):
        for raw in stream:
            sink(raw.decode("utf-8", "replace").rstrip("\n"))

    def _drain(self, timeout):
        """Takes the next output line (None for a log line); False when the deadline passed."""
        try:
            line = self._lines.get(timeout=max(timeout, 0))
        except queue.Empty:
            return False
        if line:
            msg = json.loads(line)
            if "view" in msg:
                self.view = msg["view"]
            elif "pod_change" in msg:
                self.pod_changes.append(msg["pod_change"])
        return True

    def wait(self, predicate, what, timeout=10):
        """Reads output until predicate(self) holds; fails after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not predicate(self):
            if self.proc.poll() is not None and self._lines.empty():
                pytest.fail(f"probe exited {self.proc.returncode} waiting for {what}:\n" + self.logs())
            if not self._drain(deadline - time.monotonic()) and time.monotonic() >= deadline:
                pytest.fail(f"no {what} within {timeout}s; last view {json.dumps(self.view)}\n" + self.logs())
        return self.view

    def logs(self):
        return "\n".join(self.stderr_lines[-30:])

    def logged(self, message, **fields):
        """Log lines (tracing JSON) whose message contains `message` and whose fields match."""
        out = []
        for line in self.stderr_lines:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            f = entry.get("fields", {})
            if message in f.get("message", "") and all(f.get(k) == v for k, v in fields.items()):
                out.append(entry)
        return out

    # -- view accessors ------------------------------------------------------------------------
    def pod(self, ns, name):
        return next((p for p in (self.view or {}).get("pods", []) if (p["namespace"], p["name"]) == (ns, name)), None)

    def namespace(self, name):
        return next((n for n in (self.view or {}).get("namespaces", []) if n["name"] == name), None)

    def service_account(self, ns, name):
        return next((s for s in (self.view or {}).get("serviceAccounts", [])
                     if (s["namespace"], s["name"]) == (ns, name)), None)

    def synced(self):
        s = (self.view or {}).get("synced", {})
        return bool(s) and all(s.values())

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self.node.forget(self.proc)


@pytest.fixture
def cluster(probe_binary):
    """(kube, start_probe): a node with the emulated API; the probe starts when the test says."""
    with Node() as node:
        kube = KubeApi(node)
        probes = []

        def start_probe():
            p = Probe(node, kube, probe_binary)
            probes.append(p)
            return p

        try:
            yield kube, start_probe
        finally:
            for p in probes:
                p.stop()


def seed(kube):
    kube.create_namespace("team-a", annotations={"iam.amazonaws.com/permitted": "web-.*"})
    kube.create_namespace("team-b")
    kube.create_service_account("team-a", "builder", annotations={SA_ROLE: "arn:aws:iam::123456789012:role/builder"})
    web = kube.create_pod("team-a", "web", NODE, annotations={POD_ROLE: "web"})
    other = kube.create_pod("team-a", "elsewhere", OTHER_NODE, annotations={POD_ROLE: "web"})
    return web, other


def test_view_holds_this_nodes_pods_and_every_namespace_and_service_account(cluster):
    kube, start_probe = cluster
    web, _ = seed(kube)
    probe = start_probe()
    probe.wait(lambda p: p.synced(), "an initial list of pods, namespaces and service accounts")

    assert [(p["namespace"], p["name"]) for p in probe.view["pods"]] == [("team-a", "web")], \
        "pods of another node are not in the view (field selector spec.nodeName)"
    pod = probe.pod("team-a", "web")
    assert pod["uid"] == web["metadata"]["uid"] and pod["node"] == NODE
    assert pod["annotations"] == {POD_ROLE: "web"}
    assert probe.namespace("team-a")["annotations"] == {"iam.amazonaws.com/permitted": "web-.*"}
    assert probe.namespace("team-b") is not None
    assert probe.service_account("team-a", "builder")["annotations"] == {SA_ROLE: "arn:aws:iam::123456789012:role/builder"}
    probe.wait(lambda p: any(c["name"] == "web" for c in p.pod_changes), "a pod change for prefetch")
    assert {(c["namespace"], c["name"], c["uid"]) for c in probe.pod_changes} == {("team-a", "web", web["metadata"]["uid"])}

    pod_requests = [r for r in kube.requests() if r["path"] == "/api/v1/pods"]
    assert pod_requests and all(r["query"].get("fieldSelector") == f"spec.nodeName={NODE}" for r in pod_requests), \
        pod_requests


def test_annotation_patches_and_deletions_reach_the_view(cluster):
    kube, start_probe = cluster
    seed(kube)
    probe = start_probe()
    probe.wait(lambda p: p.synced() and p.pod("team-a", "web"), "the initial view")

    kube.annotate("pods", "team-a", "web", {POD_ROLE: "web-v2"})
    probe.wait(lambda p: p.pod("team-a", "web")["annotations"].get(POD_ROLE) == "web-v2", "the pod's new role annotation")
    kube.annotate("namespaces", None, "team-b", {"iam.amazonaws.com/permitted": ".*"})
    probe.wait(lambda p: p.namespace("team-b")["annotations"] == {"iam.amazonaws.com/permitted": ".*"},
               "the namespace's new annotation")
    kube.annotate("serviceaccounts", "team-a", "builder", {SA_ROLE: None})
    probe.wait(lambda p: p.service_account("team-a", "builder")["annotations"] == {}, "the removed SA annotation")

    kube.delete("pods", "team-a", "web")
    probe.wait(lambda p: p.pod("team-a", "web") is None, "the deleted pod leaving the view")
    kube.delete("namespaces", None, "team-b")
    probe.wait(lambda p: p.namespace("team-b") is None, "the deleted namespace leaving the view")

    # A change on another node, then one on ours: once ours is seen, the other was not.
    kube.create_pod("team-a", "later-elsewhere", OTHER_NODE)
    kube.create_pod("team-a", "later", NODE)
    probe.wait(lambda p: p.pod("team-a", "later"), "a pod created on this node")
    assert probe.pod("team-a", "later-elsewhere") is None


def test_the_last_view_is_kept_while_the_api_is_down_and_a_relist_catches_up(cluster):
    kube, start_probe = cluster
    seed(kube)
    probe = start_probe()
    probe.wait(lambda p: p.synced() and p.pod("team-a", "web"), "the initial view")
    before = probe.view

    kube.stop()
    probe.wait(lambda p: len(p.logged("keeping the last view")) == 3,
               "one warning per watched resource once the API is down")
    # Changes the node could not see: taken by "another API server" (the emulator's state file).
    kube.create_pod("team-a", "born-in-outage", NODE, annotations={POD_ROLE: "web"})
    kube.delete("pods", "team-a", "web")
    kube.annotate("namespaces", None, "team-a", {"iam.amazonaws.com/permitted": "none"})
    # Nothing drained yet may have changed the view: the store keeps its last good state.
    while probe._drain(0):
        pass
    assert probe.view == before
    assert probe.pod("team-a", "web") is not None, "the last good view stays while the API is down"
    assert len(probe.logged("keeping the last view")) == 3, "one warning per outage, not one per retry"

    lists_before = sum(1 for r in kube.requests() if r["action"] == "LIST")
    kube.start()
    probe.wait(lambda p: p.pod("team-a", "born-in-outage") and p.pod("team-a", "web") is None
               and p.namespace("team-a")["annotations"] == {"iam.amazonaws.com/permitted": "none"},
               "the changes made during the outage", timeout=CATCH_UP)
    assert probe.synced()
    assert sum(1 for r in kube.requests() if r["action"] == "LIST") > lists_before, \
        "the watch could not resume across the restart (410 Gone): kube relisted"
    assert probe.logged("resource version expired; relisting")
    probe.wait(lambda p: p.logged("recovered", resource="pods"), "the recovery log line")


def test_a_restart_loses_no_pod_created_right_after_it(cluster):
    kube, start_probe = cluster
    seed(kube)
    probe = start_probe()
    probe.wait(lambda p: p.synced() and p.pod("team-a", "web"), "the initial view")

    kube.restart()
    kube.create_pod("team-a", "after-restart", NODE)
    probe.wait(lambda p: p.pod("team-a", "after-restart"), "the pod created after the restart", timeout=CATCH_UP)
    assert probe.pod("team-a", "web") is not None


def test_broken_watches_resume_from_their_resource_version_without_a_relist(cluster):
    kube, start_probe = cluster
    seed(kube)
    probe = start_probe()
    probe.wait(lambda p: p.synced() and p.pod("team-a", "web"), "the initial view")
    lists_before = sum(1 for r in kube.requests() if r["action"] == "LIST")

    assert kube.break_watches() == 3
    kube.create_pod("team-a", "during-rewatch", NODE)
    kube.annotate("pods", "team-a", "web", {POD_ROLE: "web-v3"})
    probe.wait(lambda p: p.pod("team-a", "during-rewatch")
               and p.pod("team-a", "web")["annotations"][POD_ROLE] == "web-v3", "changes made across the re-watch")
    assert sum(1 for r in kube.requests() if r["action"] == "LIST") == lists_before, \
        "a clean end of the watch is resumed from the last resourceVersion, not relisted"
    assert not probe.logged("keeping the last view"), "an ended watch is not an outage"

"""containerd's CRI plugin drives the chain: pods made the way a kubelet makes them get their own
role or nothing, and leave nothing behind.

Real parts: containerd 1.6 and runc (Debian) with the CRI plugin, in the node's network namespace
and a private mount namespace (tests/harness/containerd.py), driven over its socket by a CRI
runtime.v1 client (RunPodSandbox with the pod's metadata and annotations, PodSandboxStatus,
StopPodSandbox, RemovePodSandbox); its libcni running ptp + host-local → the built iamlink plugin
(the conflist entry declares `io.kubernetes.cri.pod-annotations`, so containerd passes the pod's
annotations); pause containers of a locally built busybox image; the built iamlinkd with its
Kubernetes view; the unmodified AWS CLI and a stdlib IMDSv2 client inside the sandboxes' network
namespaces. Emulated: STS by moto, the Kubernetes API server (tests/harness/kube_api.py), the
node's metadata service by the fake upstream (serving a node role, so a leak would show).

A tap in front of the plugin notes every call containerd makes, so the tests also check that the
call sequence is containerd's: ADD; DEL with the netns and libcni's cached prevResult at
StopPodSandbox; DEL with no netns and no prevResult at RemovePodSandbox.
"""

import collections
import concurrent.futures
import json
import os
import signal
import time
import uuid

import grpc
import pytest

from harness import IAMLINKD, PYTHON, is_assumed_role, role_arn, role_of_arn, wait_until
from harness.containerd import Containerd, missing_prerequisites
from harness.imds_client import CREDS_PATH
from harness.util import IMDS_CLIENT, json_lines

ROLE = "iam.amazonaws.com/role"
IRSA = "eks.amazonaws.com/role-arn"
ROLES = ["web", "batch", "irsa", "r0", "r1", "r2", "r3", "r4"]
PARALLEL_SANDBOXES = 50
PARALLEL_ROLES = ["r0", "r1", "r2", "r3", "r4", None]  # sandbox i has PARALLEL_ROLES[i % 6]
ANSWERS_PER_SANDBOX = 4


@pytest.fixture(scope="module")
def bench(make_module_bench):
    missing = missing_prerequisites()
    if missing:
        pytest.fail("not installed or built: " + ", ".join(missing) + " (run scripts/setup)", pytrace=False)
    bench = make_module_bench(pod_roles=[], kubernetes={})
    for role in ROLES:
        bench.moto.create_role(role)
    bench.containerd = Containerd(bench.node, bench.pods)
    bench.callback(bench.containerd.close)
    bench.extra_logs += [("containerd", bench.containerd.log_path),
                         ("CNI calls (command, sandbox, netns, prevResult)", bench.containerd.calls_log)]
    bench.containerd.start()
    return bench


# -- what a node operator looks at --------------------------------------------------------------

def nft_table(bench):
    p = bench.node.exec(["nft", "-j", "list", "table", "inet", "iamlink"], check=False)
    return json.loads(p.stdout)["nftables"] if p.returncode == 0 else []


def map_elements(bench):
    for item in nft_table(bench):
        if item.get("map", {}).get("name") == "pods":
            return {e[0]: e[1]["jump"]["target"] for e in item["map"].get("elem", [])}
    return {}


def slot_chains(bench):
    names = (i["chain"]["name"] for i in nft_table(bench) if "chain" in i)
    return sorted(n for n in names if n.startswith("slot-"))


def listdir(path):
    try:
        return sorted(os.listdir(path))
    except FileNotFoundError:
        return []


def node_state(bench):
    """Everything of pods a node keeps: iamlink's records and slots, its map elements and slot
    chains, the node's veths, containerd's netns mounts, the sandboxes' cgroups, libcni's result
    cache, host-local's allocations."""
    ctd = bench.containerd
    veths = json.loads(bench.node.exec(["ip", "-j", "link", "show", "type", "veth"]).stdout or "[]")
    ipam = os.path.join(bench.pods.dir, "ipam", bench.pods.conflist["name"])
    return {
        "records": listdir(os.path.join(bench.store_dir, "records")),
        "slots": listdir(os.path.join(bench.store_dir, "slots")),
        "map elements": sorted(map_elements(bench)),
        "slot chains": slot_chains(bench),
        "veths": sorted(v["ifname"] for v in veths),
        "netns mounts": sorted(ctd.netns_mounts()),
        "cgroups": sorted(ctd.sandbox_cgroups()),
        "CNI result cache": listdir(ctd.cni_results),
        "IP allocations": [f for f in listdir(ipam) if f[0].isdigit()],
    }


def iamlinkd_cli(bench, *args):
    """`iamlinkd <args> --json` as an operator runs it on the node; (exit code, JSON or None, stderr)."""
    p = bench.containerd.node_exec([IAMLINKD, "--config", bench.daemon.config_path, *args, "--json"])
    return p.returncode, (json.loads(p.stdout) if p.stdout.strip() else None), p.stderr


def assert_status_healthy(bench, records):
    rc, doc, err = iamlinkd_cli(bench, "status")
    assert rc == 0 and doc, f"iamlinkd status: rc {rc} {err}"
    assert (doc["records"], doc["interceptionEntries"]) == (records, records), doc
    assert (doc["recordsWithoutEntry"], doc["entriesWithoutRecord"], doc["hostInterfaceGone"],
            doc["podRoutesMissing"], doc["problems"]) == (0, 0, 0, 0, []), doc


def record_of(bench, sandbox):
    path = os.path.join(bench.store_dir, "records", f"{sandbox.id}.eth0.json")
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def assert_containerd_call_sequence(bench, sandbox):
    """ADD with netns and prevResult; StopPodSandbox's DEL with both; RemovePodSandbox's without."""
    calls = [(c, bool(ns), prev) for c, _, ns, prev in bench.containerd.calls(sandbox.id)]
    assert calls == [("ADD", True, True), ("DEL", True, True), ("DEL", False, False)], \
        f"{sandbox}: plugin calls (command, netns given, prevResult given): {calls}"


# -- pods and their clients ---------------------------------------------------------------------

def ensure_namespace(bench, name):
    if bench.kube.get("namespaces", None, name) is None:
        bench.kube.create_namespace(name)


def pod(bench, namespace, name, annotations=None, in_api=True, service_account="default", attempt=0, uid=None,
        sysctls=None):
    """A pod as a kubelet makes it: (optionally) its object in the API, bound to this node, then
    RunPodSandbox with its metadata and annotations."""
    uid = uid or str(uuid.uuid4())
    if in_api:
        ensure_namespace(bench, namespace)
        bench.kube.create_pod(namespace, name, node=bench.node.name, service_account=service_account, uid=uid,
                              annotations=annotations)
    return bench.containerd.run_sandbox(namespace, name, uid, annotations or {}, attempt=attempt, sysctls=sysctls)


def listing(sandbox, timeout=3):
    r = sandbox.imds("request", "GET", CREDS_PATH, "--timeout", timeout)
    return r.get("status"), r.get("body", "").strip()


def wait_for_listing(sandbox, expected, timeout=15):
    """Bounded: the view of the API catches up asynchronously."""
    wait_until(lambda: listing(sandbox) == expected, timeout, f"{sandbox} listing {expected}: last {listing(sandbox)}",
               interval=0.1)


def assert_cli_role(bench, sandbox, role):
    """The unmodified AWS CLI in the sandbox: `sts get-caller-identity` is the role, or (None) no
    credentials at all, never the node's."""
    rc, out, err = sandbox.caller_arn()
    assert not bench.upstream.leaked(out + err), f"{sandbox}: the node's credentials: {out!r} {err!r}"
    if role:
        assert rc == 0 and is_assumed_role(out, role), f"{sandbox}: expected assumed-role/{role}: {rc} {out!r} {err!r}"
    else:
        assert rc != 0 and "Unable to locate credentials" in err, f"{sandbox}: expected no credentials: {out!r} {err!r}"


def audit_sources(bench, sandbox):
    return {a.get("source") for a in bench.daemon.audit_lines()
            if a.get("pod") == sandbox.key and a.get("uid") == sandbox.uid and a.get("outcome") == "credentials served"}


# -- the cases ----------------------------------------------------------------------------------

def test_roles_from_the_runtime_annotation_the_api_and_none(bench):
    before = node_state(bench)
    kube = bench.kube
    ensure_namespace(bench, "team-sa")
    kube.create_service_account("team-sa", "builder", {IRSA: role_arn("irsa")})
    # containerd passes the annotation at ADD: a role before the API's view has the pod.
    runtime = pod(bench, "team-rt", "web", {ROLE: "web"}, in_api=False)
    # The pod's annotation in the API, and the same annotation from the runtime (a kubelet passes them all).
    annotated = pod(bench, "team-api", "batch", {ROLE: "batch"})
    # The service account's role: only the API knows it.
    irsa = pod(bench, "team-sa", "build", service_account="builder")
    nothing = pod(bench, "team-none", "plain")
    for sandbox, role in [(runtime, "web"), (annotated, "batch"), (irsa, "irsa")]:
        wait_for_listing(sandbox, (200, role))
        assert_cli_role(bench, sandbox, role)
    wait_for_listing(nothing, (404, "iamlink: this pod has no role"))
    assert_cli_role(bench, nothing, None)

    assert audit_sources(bench, runtime) == {"runtime pod annotation"}, bench.daemon.audit_lines()[-5:]
    sources = audit_sources(bench, annotated)
    assert sources and sources <= {"pod annotation", "runtime pod annotation"}, sources
    assert audit_sources(bench, irsa) == {"service account annotation"}, bench.daemon.audit_lines()[-5:]
    for sandbox in (runtime, annotated, irsa, nothing):
        record = record_of(bench, sandbox)
        assert record and record["pod"] == {"namespace": sandbox.namespace, "name": sandbox.name, "uid": sandbox.uid}
        assert record["netns"] == sandbox.netns_path and record["hostInterface"]["name"] == sandbox.host_ifname
    assert record_of(bench, runtime)["runtimeAnnotations"] == {ROLE: "web"}
    rc, doc, err = iamlinkd_cli(bench, "explain", irsa.key)
    assert rc == 0, f"iamlinkd explain {irsa.key}: rc {rc} {doc} {err}"
    (report,) = doc["pods"]
    assert report["problems"] == [] and report["record"]["containerId"] == irsa.id, report
    assert report["daemon"]["role"] == role_arn("irsa"), report
    assert_status_healthy(bench, len(before["records"]) + 4)

    for sandbox in (runtime, annotated, irsa, nothing):
        bench.containerd.stop_and_remove(sandbox)
        assert_containerd_call_sequence(bench, sandbox)
    assert node_state(bench) == before
    rc, _, err = iamlinkd_cli(bench, "explain", irsa.key)
    assert rc == 2 and f"nothing matches {irsa.key}" in err, (rc, err)


def test_stop_and_remove_leave_no_record_no_map_element_no_slot_chain(bench):
    before = node_state(bench)
    web = pod(bench, "team-life", "web", {ROLE: "web"}, in_api=False)
    wait_for_listing(web, (200, "web"))
    slot = record_of(bench, web)["slot"]
    during = node_state(bench)
    assert f"{web.id}.eth0.json" in during["records"] and str(slot) in during["slots"], during
    assert map_elements(bench).get(web.host_ifname) == f"slot-{slot}", map_elements(bench)
    assert f"slot-{slot}" in during["slot chains"], during

    bench.containerd.cri.stop_sandbox(web.id)
    assert [c[0] for c in bench.containerd.calls(web.id)] == ["ADD", "DEL"]
    stopped = node_state(bench)
    assert record_of(bench, web) is None and str(slot) not in stopped["slots"], stopped
    assert web.host_ifname not in stopped["map elements"] and f"slot-{slot}" not in stopped["slot chains"], stopped
    assert stopped["netns mounts"] == before["netns mounts"], "StopPodSandbox leaves the pod's netns mounted"

    bench.containerd.cri.remove_sandbox(web.id)
    web.deleted = True
    assert_containerd_call_sequence(bench, web)
    assert node_state(bench) == before
    removed = [e for e in json_lines(bench.pods.plugin_log) if e.get("fields", {}).get("container") == web.id
               and e["fields"].get("message") == "pod removed"]
    assert len(removed) == 1, f"the plugin's log says {web} was removed, once: {removed}"


def answer(sandbox):
    """(role listed, AccessKeyId, credentials) or (None, status) of one SDK-like exchange."""
    r = sandbox.imds("creds", "--timeout", "5")
    if r.get("ok"):
        return r["role"], r["creds"]["AccessKeyId"], r["creds"]
    return None, r.get("status") or r.get("error")


def assert_own_role(bench, sandbox, role, seen_keys):
    """One exchange: the sandbox's role (its key resolved by STS) or 404, never another role's key."""
    got = answer(sandbox)
    if role is None:
        assert got == (None, 404), f"{sandbox}: expected no role, got {got}"
        return
    listed, akid, creds = got
    assert listed == role, f"{sandbox}: listed {listed!r}, expected {role!r}"
    if akid not in seen_keys:
        seen_keys[akid] = role_of_arn(bench.moto.caller_arn(creds))
    assert seen_keys[akid] == role, f"{sandbox}: key {akid} is {seen_keys[akid]!r}'s"


def test_containerd_killed_and_restarted_with_sandboxes_live(bench):
    before = node_state(bench)
    ctd = bench.containerd
    sandboxes = [(pod(bench, "team-restart", "web", {ROLE: "web"}), "web"),
                 (pod(bench, "team-restart", "batch", {ROLE: "batch"}), "batch"),
                 (pod(bench, "team-restart", "none"), None)]
    keys = {}
    for sandbox, role in sandboxes:
        wait_for_listing(sandbox, (200, role) if role else (404, "iamlink: this pod has no role"))
    ctd.kill()
    # containerd is down; its shims and the pause processes are not, and the pods keep their network.
    assert all(os.path.exists(f"/proc/{s.pid}") for s, _ in sandboxes)
    for sandbox, role in sandboxes:
        assert_own_role(bench, sandbox, role, keys)
    ctd.start()
    states = {s.id: ctd.cri.sandbox_state(s.id) for s, _ in sandboxes}
    assert set(states.values()) == {"SANDBOX_READY"}, states
    for sandbox, role in sandboxes:
        assert_own_role(bench, sandbox, role, keys)
    assert_cli_role(bench, sandboxes[0][0], "web")
    # The restarted containerd still tears the pods down through the chain.
    for sandbox, _ in sandboxes:
        ctd.stop_and_remove(sandbox)
        assert_containerd_call_sequence(bench, sandbox)
    assert node_state(bench) == before


def test_a_sandbox_whose_pause_process_is_killed(bench):
    before = node_state(bench)
    ctd = bench.containerd
    uid = str(uuid.uuid4())
    web = pod(bench, "team-pause", "web", {ROLE: "web"}, uid=uid)
    neighbour = pod(bench, "team-pause", "batch", {ROLE: "batch"})
    wait_for_listing(web, (200, "web"))
    os.kill(web.pid, signal.SIGKILL)
    # What a user sees: the sandbox is NOTREADY (a kubelet then stops it and makes a new one)...
    wait_until(lambda: ctd.cri.sandbox_state(web.id) == "SANDBOX_NOTREADY", 15, f"{web} NOTREADY")
    # ...while its network namespace stays (containerd holds it until StopPodSandbox): what is still
    # in it, the pod's app containers, keeps the pod's own role, and nobody else's.
    keys = {}
    assert_own_role(bench, web, "web", keys)
    assert_own_role(bench, neighbour, "batch", keys)
    # The kubelet's reaction: stop and remove the dead sandbox, run the pod's next attempt.
    ctd.stop_and_remove(web)
    assert_containerd_call_sequence(bench, web)
    assert record_of(bench, web) is None and web.host_ifname not in map_elements(bench)
    again = bench.containerd.run_sandbox("team-pause", "web", uid, {ROLE: "web"}, attempt=1)
    wait_for_listing(again, (200, "web"))
    assert_own_role(bench, again, "web", keys)
    assert_own_role(bench, neighbour, "batch", keys)
    for sandbox in (again, neighbour):
        ctd.stop_and_remove(sandbox)
        assert_containerd_call_sequence(bench, sandbox)
    assert node_state(bench) == before


def test_a_sandbox_that_fails_after_its_network_is_set_up_leaves_nothing(bench):
    before = node_state(bench)
    ctd = bench.containerd
    calls_before = len(ctd.calls())
    neighbour = pod(bench, "team-fail", "batch", {ROLE: "batch"}, in_api=False)
    # runc refuses a sysctl the kernel does not have when it starts the pause container, which
    # containerd does after the network is set up: it then tears the network down (one DEL).
    with pytest.raises(grpc.RpcError) as failed:
        pod(bench, "team-fail", "broken", {ROLE: "web"}, in_api=False, sysctls={"net.ipv4.iamlink_no_such_sysctl": "1"})
    assert "iamlink_no_such_sysctl" in failed.value.details(), failed.value.details()
    calls = [(c, cid, bool(ns), prev) for c, cid, ns, prev in ctd.calls()[calls_before:] if cid != neighbour.id]
    assert [c[:1] + c[2:] for c in calls] == [("ADD", True, True), ("DEL", True, True)], calls
    assert calls[0][1] not in {s.id for s in ctd.cri.list_sandboxes()}
    wait_for_listing(neighbour, (200, "batch"))
    ctd.stop_and_remove(neighbour)
    assert node_state(bench) == before


def test_parallel_sandboxes_each_get_their_own_role_and_leave_nothing(bench, bench_report):
    before = node_state(bench)
    ctd = bench.containerd
    t0 = time.monotonic()
    specs = []
    for i in range(PARALLEL_SANDBOXES):
        role = PARALLEL_ROLES[i % len(PARALLEL_ROLES)]
        namespace = f"par-{role or 'none'}"
        uid = str(uuid.uuid4())
        annotations = {ROLE: role} if role else {}
        ensure_namespace(bench, namespace)
        bench.kube.create_pod(namespace, f"p{i}", node=bench.node.name, uid=uid, annotations=annotations)
        specs.append((namespace, f"p{i}", uid, annotations, role))

    def make(spec):
        namespace, name, uid, annotations, role = spec
        sandbox = ctd.run_sandbox(namespace, name, uid, annotations)
        sandbox.role = role
        return sandbox

    t1 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=PARALLEL_SANDBOXES) as pool:
        sandboxes = list(pool.map(make, specs))
    created = time.monotonic() - t1
    during = node_state(bench)
    assert len(set(s.ip for s in sandboxes)) == PARALLEL_SANDBOXES
    assert len(during["records"]) == len(before["records"]) + PARALLEL_SANDBOXES, during["records"]
    slots = {s.id: record_of(bench, s)["slot"] for s in sandboxes}
    assert len(set(slots.values())) == PARALLEL_SANDBOXES, slots
    elements = map_elements(bench)
    assert all(elements.get(s.host_ifname) == f"slot-{slots[s.id]}" for s in sandboxes), elements
    assert_status_healthy(bench, len(before["records"]) + PARALLEL_SANDBOXES)
    # The view has every pod (a role-less pod is 503 until then, never someone's role).
    for s in sandboxes:
        if s.role is None:
            wait_for_listing(s, (404, "iamlink: this pod has no role"))

    def ask(sandbox):
        p = sandbox.exec([PYTHON, IMDS_CLIENT, "loop", "--max-answers", str(ANSWERS_PER_SANDBOX), "--seconds", "30",
                          "--timeout", "5"], timeout=60)
        assert p.returncode == 0, f"{sandbox}: {p.stderr}"
        return sandbox, json.loads(p.stdout)

    t2 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        summaries = list(pool.map(ask, sandboxes))
    asked = time.monotonic() - t2

    answers = wrong = 0
    problems = []
    key_role = {}  # AccessKeyId -> role its holder should have
    for sandbox, s in summaries:
        answers += s["answers"]
        if s["errors"] or s["statuses"] or s["answers"] != ANSWERS_PER_SANDBOX:
            problems.append((sandbox.key, s["errors"], s["statuses"], s["answers"]))
        if sandbox.role is None:
            wrong += len(s["keys"])
            if s["keys"] or s["no_credentials"] != ANSWERS_PER_SANDBOX:
                problems.append((sandbox.key, "expected no role", s["keys"]))
            continue
        for akid, entry in s["keys"].items():
            for listed, n in entry["roles"].items():
                if listed != sandbox.role:
                    wrong += n
                    problems.append((sandbox.key, sandbox.role, f"listed {listed}", n))
            if key_role.setdefault(akid, sandbox.role) != sandbox.role:
                wrong += 1
                problems.append((sandbox.key, sandbox.role, f"key {akid} also {key_role[akid]}'s"))
            arn = bench.moto.caller_arn(entry["creds"])
            if role_of_arn(arn) != sandbox.role:
                wrong += sum(entry["roles"].values())
                problems.append((sandbox.key, sandbox.role, f"STS says key {akid} is {arn}"))

    t3 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=PARALLEL_SANDBOXES) as pool:
        list(pool.map(ctd.stop_and_remove, sandboxes))
    removed = time.monotonic() - t3
    sequences = collections.Counter(
        tuple((c, bool(ns), prev) for c, _, ns, prev in ctd.calls(s.id)) for s in sandboxes)
    after = node_state(bench)
    bench_report(f"containerd CRI: {PARALLEL_SANDBOXES} sandboxes in parallel, created in {created:.1f}s, "
                 f"{answers} answers checked in {asked:.1f}s ({len(key_role)} keys resolved by STS), {wrong} wrong, "
                 f"removed in {removed:.1f}s; whole case {time.monotonic() - t0:.1f}s")
    assert wrong == 0 and not problems, problems[:10]
    assert answers == PARALLEL_SANDBOXES * ANSWERS_PER_SANDBOX
    assert sequences == {(("ADD", True, True), ("DEL", True, True), ("DEL", False, False)): PARALLEL_SANDBOXES}, \
        sequences
    assert after == before, {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    assert_status_healthy(bench, len(before["records"]))

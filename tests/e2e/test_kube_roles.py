"""Roles from Kubernetes: pod and service-account annotations, associations, namespace policy, UID
binding, and the API server failing, with pods made through the real CNI chain.

Real parts: network namespaces, the reference ptp/host-local plugins chained with `iamlink` by
libcni (`cnirt`, which passes pod annotations as containerd does: the capability
`io.kubernetes.cri.pod-annotations`, delivered in `runtimeConfig`), nftables, `iamlinkd` with its
`kube` reflectors, the unmodified AWS CLI in the pods, moto as STS.
Emulated: the Kubernetes API server. There is none on these machines, so `tests/harness/kube_api.py`
runs kmock's KubernetesEmulator (with the gaps listed in ../shared/REFERENCE.md closed) in the node
namespace; it speaks kube-apiserver's JSON list/watch/get wire format, which is what `kube` reads.
"""

import json
import os
import re
import uuid

import pytest
import yaml

from harness import REPO, is_assumed_role, role_arn, wait_until

CREDS = "/latest/meta-data/iam/security-credentials/"
ROLES = ["web", "batch", "irsa", "assoc", "configured", "admin", "shop-web", "analytics-reporter"]


def make(make_bench, **kwargs):
    kwargs.setdefault("pod_roles", [{"namespace": "team-cfg", "role": "configured"}])
    kwargs.setdefault("associations", [{"namespace": "team-sa", "service_account": "builder", "role": "assoc"}])
    kwargs.setdefault("kubernetes", {})
    bench = make_bench(**kwargs)
    for role in ROLES:
        bench.moto.create_role(role)
    return bench


def kube_pod(bench, namespace, name, annotations=None, service_account="default", runtime=False, api=True,
             uid=None):
    """A pod in the API (bound to this node) and its network through the CNI chain, with one UID.
    runtime=True: the runtime also passes its annotations at ADD, as containerd does."""
    uid = uid or str(uuid.uuid4())
    if api:
        ensure_namespace(bench, namespace)
        bench.kube.create_pod(namespace, name, node=bench.node.name, service_account=service_account, uid=uid,
                              annotations=annotations)
    return bench.pods.add(namespace, name, uid=uid, annotations=(annotations or {}) if runtime else None)


def ensure_namespace(bench, name, annotations=None):
    if bench.kube.running and bench.kube.get("namespaces", None, name) is not None:
        if annotations:
            bench.kube.annotate("namespaces", None, name, annotations)
        return
    try:
        bench.kube.create_namespace(name, annotations=annotations)
    except AssertionError:  # created meanwhile (or offline): annotate instead
        if annotations:
            bench.kube.annotate("namespaces", None, name, annotations)


def listing(pod):
    """(status, body) of the role listing, as an SDK's first credentials request."""
    r = pod.imds("request", "GET", CREDS)
    return r.get("status"), r.get("body", "")


def wait_for_role(pod, role, timeout=15):
    """Polls (bounded) until the pod's listing names `role`: the view catches up asynchronously."""
    wait_until(lambda: listing(pod) == (200, role), timeout, f"{pod} listing role {role}: last {listing(pod)}",
               interval=0.1)


def assert_cli_role(pod, role):
    rc, out, err = pod.caller_arn()
    assert rc == 0, f"aws sts get-caller-identity in {pod} failed: {err}"
    assert is_assumed_role(out, role), f"{pod}: expected assumed-role/{role}/..., got {out!r}"


@pytest.fixture(scope="module")
def bench(make_module_bench):
    return make(make_module_bench)


# -- the README's manifests -----------------------------------------------------------------------

def readme_example(name):
    """The YAML documents of the README's code block that starts with `# iamlink-example: <name>`."""
    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    for block in re.findall(r"```yaml\n(.*?)```", text, re.S):
        if block.startswith(f"# iamlink-example: {name}\n"):
            return [d for d in yaml.safe_load_all(block) if d]
    raise AssertionError(f"README.md has no example {name!r}")


def apply_example(bench, docs, runtime):
    """Creates the example's objects in the API and the network of its pods; returns the pods."""
    pods = []
    for doc in docs:
        meta = doc["metadata"]
        annotations = meta.get("annotations") or {}
        if doc["kind"] == "Namespace":
            ensure_namespace(bench, meta["name"], annotations)
        elif doc["kind"] == "ServiceAccount":
            ensure_namespace(bench, meta["namespace"])
            bench.kube.create_service_account(meta["namespace"], meta["name"], annotations=annotations)
        elif doc["kind"] == "Pod":
            sa = doc["spec"].get("serviceAccountName", "default")
            pods.append(kube_pod(bench, meta["namespace"], meta["name"], annotations, sa, runtime=runtime))
        else:
            raise AssertionError(f"unexpected kind {doc['kind']}")
    return pods


def test_readme_kube2iam_manifest_works_unchanged(bench):
    [pod] = apply_example(bench, readme_example("kube2iam"), runtime=True)
    wait_for_role(pod, "shop-web")
    assert_cli_role(pod, "shop-web")


def test_readme_irsa_manifest_works_without_the_webhook(bench):
    docs = readme_example("irsa")
    sa = next(d for d in docs if d["kind"] == "ServiceAccount")
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"] == role_arn("analytics-reporter"), \
        "the README's role ARN must be the one the IAM setup (deploy/iam) gives"
    [pod] = apply_example(bench, docs, runtime=False)
    wait_for_role(pod, "analytics-reporter")
    assert_cli_role(pod, "analytics-reporter")


def test_only_this_nodes_pods_and_the_metadata_of_namespaces_and_service_accounts_are_read(bench):
    kube = bench.kube
    ensure_namespace(bench, "team-meta", {"iam.amazonaws.com/permitted": re.escape(role_arn("irsa"))})
    kube.create_service_account("team-meta", "reader", {"eks.amazonaws.com/role-arn": role_arn("irsa")})
    kube.create_pod("team-meta", "elsewhere", node="another-node", service_account="reader")
    pod = kube_pod(bench, "team-meta", "meta", None, "reader")
    # The policy and the role come from metadata-only objects: annotations are metadata.
    wait_for_role(pod, "irsa")
    assert_cli_role(pod, "irsa")
    # The emulator answers as kube-apiserver does: metadata, no spec or status.
    listed = kube.list("serviceaccounts", "team-meta", metadata_only=True)
    assert (listed["apiVersion"], listed["kind"]) == ("meta.k8s.io/v1", "PartialObjectMetadataList"), listed
    [item] = listed["items"]
    assert set(item) == {"apiVersion", "kind", "metadata"} and item["kind"] == "PartialObjectMetadata", item
    assert item["metadata"]["annotations"] == {"eks.amazonaws.com/role-arn": role_arn("irsa")}
    # What iamlinkd asked for: every read of namespaces and service accounts as metadata only,
    # every read of pods for this node only.
    reads = [r for r in kube.requests() if r["method"] == "GET" and r["path"] in
             ("/api/v1/pods", "/api/v1/namespaces", "/api/v1/serviceaccounts")]
    seen = {(r["path"], r["action"]) for r in reads}
    assert {(p, a) for p in ("/api/v1/pods", "/api/v1/namespaces", "/api/v1/serviceaccounts")
            for a in ("LIST", "WATCH")} <= seen, sorted(seen)
    whole = [r for r in reads if r["path"] != "/api/v1/pods"
             and r["as"] != {"LIST": "PartialObjectMetadataList", "WATCH": "PartialObjectMetadata"}[r["action"]]]
    assert not whole, f"namespaces or service accounts read as whole objects: {whole[:3]}"
    other_nodes = [r for r in reads if r["path"] == "/api/v1/pods"
                   and r["query"].get("fieldSelector") != f"spec.nodeName={bench.node.name}"]
    assert not other_nodes, f"pods read beyond this node: {other_nodes[:3]}"


# -- precedence -----------------------------------------------------------------------------------

def test_each_source_and_their_precedence(bench):
    kube = bench.kube
    ensure_namespace(bench, "team-sa")
    kube.create_service_account("team-sa", "irsa-sa", {"eks.amazonaws.com/role-arn": role_arn("irsa")})
    kube.create_service_account("team-sa", "builder")
    both = kube_pod(bench, "team-sa", "both", {"iam.amazonaws.com/role": "web"}, "irsa-sa")
    sa_only = kube_pod(bench, "team-sa", "sa-only", None, "irsa-sa")
    associated = kube_pod(bench, "team-sa", "associated", None, "builder")
    # The association would apply to "builder"; a pod annotation still outranks it.
    annotated_builder = kube_pod(bench, "team-sa", "annotated-builder", {"iam.amazonaws.com/role": "batch"}, "builder")
    configured = kube_pod(bench, "team-cfg", "configured")
    nothing = kube_pod(bench, "team-none", "nothing")
    for pod, role in [(both, "web"), (sa_only, "irsa"), (associated, "assoc"), (annotated_builder, "batch"),
                      (configured, "configured")]:
        wait_for_role(pod, role)
        assert_cli_role(pod, role)
    served = [a for a in bench.daemon.audit_lines()
              if a.get("pod") == "team-sa/sa-only" and a.get("outcome") == "credentials served"]
    assert served, f"no audit line for the credentials served: {bench.daemon.audit_lines()[-5:]}"
    assert served[-1]["role"] == role_arn("irsa") and served[-1]["source"] == "service account annotation", served[-1]
    assert served[-1]["uid"] == sa_only.uid and served[-1]["interface"] == sa_only.host_ifname, served[-1]
    wait_until(lambda: listing(nothing)[0] == 404, 15, f"{nothing} bound and found to have no role")
    rc, out, err = nothing.caller_arn()
    assert rc != 0 and "Unable to locate credentials" in err, (out, err)
    assert not bench.upstream.leaked(out + err)


def test_role_names_and_arns_and_external_id(bench):
    arn_pod = kube_pod(bench, "team-arn", "by-arn", {"iam.amazonaws.com/role": role_arn("batch")})
    wait_for_role(arn_pod, "batch")
    assert_cli_role(arn_pod, "batch")
    ext = kube_pod(bench, "team-arn", "with-external-id",
                   {"iam.amazonaws.com/role": "web", "iam.amazonaws.com/external-id": "ext-4711"})
    wait_for_role(ext, "web")
    assert_cli_role(ext, "web")
    # What is not a role or an external ID never reaches STS.
    for name, annotations in [("bad-role", {"iam.amazonaws.com/role": "../admin"}),
                              ("bad-id", {"iam.amazonaws.com/role": "web", "iam.amazonaws.com/external-id": "x"})]:
        pod = kube_pod(bench, "team-arn", name, annotations)
        wait_until(lambda: listing(pod)[0] == 403, 15, f"{pod} refused: {listing(pod)}")


def test_role_names_join_the_discovered_base_arn_when_none_is_configured(make_bench):
    bench = make(make_bench, pod_roles=[], associations=[])
    bench.daemon.roles_base = None
    bench.daemon.restart()
    pod = kube_pod(bench, "team-disc", "p", {"iam.amazonaws.com/role": "discovered"})
    # moto's caller identity is in account 123456789012: the name joins arn:aws:iam::123456789012:role/.
    wait_for_role(pod, "discovered")
    assert_cli_role(pod, "discovered")
    assert re.search(r"base_arn=arn:aws:iam::123456789012:role/$", bench.daemon.log_text(), re.M), \
        bench.daemon.log_tail()


# -- namespace policy -----------------------------------------------------------------------------

def test_namespace_policy_refuses_with_403_and_an_audit_line(bench):
    ensure_namespace(bench, "locked", {"iam.amazonaws.com/permitted": "web|batch"})
    allowed = kube_pod(bench, "locked", "allowed", {"iam.amazonaws.com/role": "web"})
    wait_for_role(allowed, "web")
    refused = kube_pod(bench, "locked", "greedy", {"iam.amazonaws.com/role": "admin"})
    wait_until(lambda: listing(refused)[0] == 403, 15, f"{refused} refused by policy: {listing(refused)}")
    status, body = listing(refused)
    assert "iam.amazonaws.com/permitted" in body, body
    rc, out, err = refused.caller_arn()
    assert rc != 0 and "admin" not in out, (out, err)
    assert not bench.upstream.leaked(out + err)
    lines = [a for a in bench.daemon.audit_lines()
             if a.get("pod") == "locked/greedy" and a.get("outcome") == "denied by policy"]
    assert lines, f"no audit line for the refusal: {bench.daemon.audit_lines()[-5:]}"
    line = lines[-1]
    assert line["uid"] == refused.uid and line["interface"] == refused.host_ifname, line
    assert line["role"] == "admin" and "web|batch" in line["reason"] and line["status"] == 403, line


def test_kube2iam_allowed_roles_list(bench):
    ensure_namespace(bench, "listed", {"iam.amazonaws.com/allowed-roles": '["batch", "' + role_arn("web") + '"]'})
    ok = kube_pod(bench, "listed", "ok", {"iam.amazonaws.com/role": "web"})
    no = kube_pod(bench, "listed", "no", {"iam.amazonaws.com/role": "admin"})
    wait_for_role(ok, "web")
    wait_until(lambda: listing(no)[0] == 403, 15, f"{no} refused: {listing(no)}")
    assert "allowed-roles" in listing(no)[1]


def test_require_namespace_permission_refuses_unannotated_namespaces(make_bench):
    bench = make(make_bench, kubernetes={"require_namespace_permission": True})
    pod = kube_pod(bench, "open", "p", {"iam.amazonaws.com/role": "web"})
    wait_until(lambda: listing(pod)[0] == 403, 15, f"{pod} refused: {listing(pod)}")
    bench.kube.annotate("namespaces", None, "open", {"iam.amazonaws.com/permitted": "web"})
    wait_for_role(pod, "web")


# -- binding by UID -------------------------------------------------------------------------------

def test_a_pod_object_with_another_uid_is_another_pod(bench):
    pod = kube_pod(bench, "team-uid", "reborn", {"iam.amazonaws.com/role": "web"}, api=False)
    ensure_namespace(bench, "team-uid")
    bench.kube.create_pod("team-uid", "reborn", node=bench.node.name, uid=str(uuid.uuid4()),
                          annotations={"iam.amazonaws.com/role": "admin"})
    # The view has an object by that name, but not this pod's: no credentials, never "admin".
    wait_until(lambda: listing(pod)[0] == 503 and "UID" in listing(pod)[1], 15,
               f"{pod} refused for the UID mismatch: {listing(pod)}")
    rc, out, err = pod.caller_arn()
    assert rc != 0 and "admin" not in out, out
    bench.kube.delete("pods", "team-uid", "reborn")
    bench.kube.create_pod("team-uid", "reborn", node=bench.node.name, uid=pod.uid,
                          annotations={"iam.amazonaws.com/role": "web"})
    wait_for_role(pod, "web")
    assert_cli_role(pod, "web")


# -- changes on running pods, watches that break ----------------------------------------------------

def test_annotation_change_applies_to_the_next_request(bench):
    pod = kube_pod(bench, "team-change", "mover", {"iam.amazonaws.com/role": "web"})
    wait_for_role(pod, "web")
    assert_cli_role(pod, "web")
    bench.kube.annotate("pods", "team-change", "mover", {"iam.amazonaws.com/role": "batch"})
    wait_for_role(pod, "batch")
    assert_cli_role(pod, "batch")
    old = pod.imds("request", "GET", CREDS + "web")
    assert old.get("status") == 404, f"the old role's credentials are still handed out: {old}"


def test_runtime_and_api_disagreeing_is_a_refusal(bench):
    pod = kube_pod(bench, "team-change", "edited", {"iam.amazonaws.com/role": "web"}, runtime=True)
    wait_for_role(pod, "web")
    bench.kube.annotate("pods", "team-change", "edited", {"iam.amazonaws.com/role": "admin"})
    wait_until(lambda: listing(pod)[0] == 403, 15, f"{pod} refused when sources disagree: {listing(pod)}")
    body = listing(pod)[1]
    assert '"web"' in body and '"admin"' in body, body


def test_watches_that_break_resume_and_relist(bench):
    pod = kube_pod(bench, "team-watch", "w", {"iam.amazonaws.com/role": "web"})
    wait_for_role(pod, "web")
    assert bench.kube.break_watches() >= 3, "pods, namespaces and service accounts are watched"
    bench.kube.annotate("pods", "team-watch", "w", {"iam.amazonaws.com/role": "batch"})
    wait_for_role(pod, "batch")
    # A compaction: resumed watches get 410 Gone, so the view must relist to see the next change.
    bench.kube.expire_history()
    bench.kube.annotate("pods", "team-watch", "w", {"iam.amazonaws.com/role": "web"})
    wait_for_role(pod, "web")


# -- the API server down --------------------------------------------------------------------------

def test_api_down_at_start_runtime_annotations_serve_and_the_rest_waits(make_bench):
    bench = make(make_bench, kube_api_up=False)
    # The emulator was never started: the runtime's annotation is the only source, and it suffices.
    assert not bench.kube.running
    with_runtime = kube_pod(bench, "team-down", "declared", {"iam.amazonaws.com/role": "web"}, runtime=True,
                            api=False)
    without = kube_pod(bench, "team-down", "quiet", api=False)
    wait_for_role(with_runtime, "web")
    assert_cli_role(with_runtime, "web")
    status, body = listing(without)
    assert status == 503 and "not listed" in body, (status, body)
    rc, out, err = without.caller_arn()
    assert rc != 0 and not bench.upstream.leaked(out + err), out
    bench.kube.start()
    ensure_namespace(bench, "team-down")
    bench.kube.create_pod("team-down", "quiet", node=bench.node.name, uid=without.uid,
                          annotations={"iam.amazonaws.com/role": "batch"})
    wait_for_role(without, "batch")
    assert_cli_role(without, "batch")


def test_api_down_midway_keeps_the_last_view_and_catches_up(make_bench):
    bench = make(make_bench)
    running = kube_pod(bench, "team-mid", "running", {"iam.amazonaws.com/role": "web"})
    wait_for_role(running, "web")
    bench.kube.stop()
    assert_cli_role(running, "web")
    # A pod scheduled while the API is unreachable from this node: its object exists, the view lacks it.
    late = kube_pod(bench, "team-mid", "late", {"iam.amazonaws.com/role": "batch"})
    assert listing(late)[0] == 503
    assert_cli_role(running, "web")
    bench.kube.start()
    # The watches retry with kube's backoff (up to 30 s between tries), which grew during the outage.
    wait_for_role(late, "batch", timeout=45)
    assert_cli_role(late, "batch")


# -- the daemon restarting while the API server is down or half-broken ------------------------------

METRICS = ("198.18.0.1", 9101)
IRSA_SA = {"eks.amazonaws.com/role-arn": role_arn("irsa")}


def metrics_get(bench, path):
    """(status, body) of GET path on iamlinkd's metrics port, from inside the node."""
    return bench.daemon.metrics_get(path, timeout=5)


def synced_gauge(bench, kind):
    """iamlink_kubernetes_synced{kind=...} as iamlinkd exports it, or None when absent."""
    m = re.search(r'^iamlink_kubernetes_synced\{kind="' + kind + r'"\} (\S+)$', metrics_get(bench, "/metrics")[1], re.M)
    return None if m is None else float(m.group(1))


def snapshot(bench):
    """The view iamlinkd keeps on the node for its next start, or None before it wrote one."""
    path = os.path.join(bench.store_dir, "kube-snapshot.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):
        return None


def assert_refused_cli(pod, *roles):
    rc, out, err = pod.caller_arn()
    assert rc != 0 and not any(f"assumed-role/{r}/" in out for r in roles), (out, err)


def test_restart_with_the_api_down_keeps_the_namespace_policy_and_never_guesses(make_bench):
    # The association (team-sa/builder → assoc) and the default role (configured) are the guesses
    # an IRSA pod of "builder" must never get while its service account is unknown.
    bench = make(make_bench, default_role="configured")
    ensure_namespace(bench, "locked", {"iam.amazonaws.com/permitted": "web"})
    ensure_namespace(bench, "team-sa")
    bench.kube.create_service_account("team-sa", "builder", IRSA_SA)
    greedy = kube_pod(bench, "locked", "greedy", {"iam.amazonaws.com/role": "admin"}, runtime=True)
    allowed = kube_pod(bench, "locked", "allowed", {"iam.amazonaws.com/role": "web"}, runtime=True)
    irsa = kube_pod(bench, "team-sa", "irsa", None, "builder")
    wait_until(lambda: listing(greedy)[0] == 403, 15, f"{greedy} refused by policy: {listing(greedy)}")
    wait_for_role(allowed, "web")
    wait_for_role(irsa, "irsa")
    # The view is kept on the node (debounced): wait until it holds what the restart will need.
    path = os.path.join(bench.store_dir, "kube-snapshot.json")
    wait_until(lambda: "locked" in json.dumps(snapshot(bench)) and "builder" in json.dumps(snapshot(bench)), 15,
               f"{path} holding namespace locked and service account team-sa/builder: {snapshot(bench)}")
    assert os.stat(path).st_mode & 0o777 == 0o600, oct(os.stat(path).st_mode)

    bench.kube.stop()
    bench.daemon.restart()
    # No list has come, yet the locked namespace's policy holds: the runtime's annotation is refused.
    status, body = listing(greedy)
    assert status == 403 and "iam.amazonaws.com/permitted" in body and "snapshot" in body, (status, body)
    assert_refused_cli(greedy, "admin")
    wait_for_role(allowed, "web")
    assert_cli_role(allowed, "web")
    # The IRSA pod's object is not in the view: 503, neither the association nor the default role.
    status, body = listing(irsa)
    assert status == 503, (status, body)
    assert_refused_cli(irsa, "assoc", "configured", "irsa")
    refusals = [a for a in bench.daemon.audit_lines() if a.get("pod") == "locked/greedy" and a.get("status") == 403]
    assert refusals and refusals[-1]["role"] == "admin", bench.daemon.audit_lines()[-5:]

    bench.kube.start()
    wait_for_role(irsa, "irsa")
    assert listing(greedy)[0] == 403


def test_service_accounts_that_never_list_hold_irsa_pods_at_503_until_they_do(make_bench):
    bench = make(make_bench, default_role="configured", start_daemon=False,
                 daemon_settings={"metrics_listen": "%s:%d" % METRICS})
    ensure_namespace(bench, "team-sa")
    bench.kube.create_service_account("team-sa", "builder", IRSA_SA)
    irsa = kube_pod(bench, "team-sa", "irsa", None, "builder")
    annotated = kube_pod(bench, "team-sa", "annotated", {"iam.amazonaws.com/role": "web"}, "builder")
    # The daemon's RBAC lacks service accounts; pods and namespaces list fine. First start: no snapshot.
    bench.kube.forbid("serviceaccounts")
    bench.daemon.start()
    wait_for_role(annotated, "web")  # the pod annotation outranks what the service account would say
    wait_until(lambda: listing(irsa)[0] == 503 and "service account" in listing(irsa)[1], 15,
               f"{irsa} waiting for its service account: {listing(irsa)}")
    assert_refused_cli(irsa, "assoc", "configured", "irsa")
    # Not ready, visible in a metric, and one warning for the whole outage however many retries.
    sa_reads = lambda: sum(1 for r in bench.kube.requests() if "serviceaccounts" in r["path"])  # noqa: E731
    wait_until(lambda: sa_reads() >= 3, 30, f"iamlinkd retrying the service-account list: {sa_reads()} reads")
    assert metrics_get(bench, "/readyz")[0] == 503
    wait_until(lambda: synced_gauge(bench, "pods") == 1, 5, "iamlink_kubernetes_synced{kind=\"pods\"} 1")
    assert synced_gauge(bench, "service_accounts") == 0
    warnings = [line for line in bench.daemon.log_text().splitlines()
                if "WARN" in line and "serviceaccounts" in line and "watch failed" in line]
    assert len(warnings) == 1, warnings

    bench.kube.forbid()
    wait_for_role(irsa, "irsa")
    assert_cli_role(irsa, "irsa")
    wait_until(lambda: synced_gauge(bench, "service_accounts") == 1, 5, "service accounts synced in the metric")
    wait_until(lambda: metrics_get(bench, "/readyz")[0] == 200, 5, "ready once every resource listed")
    wait_until(lambda: "builder" in json.dumps(snapshot(bench)), 15, f"snapshot with team-sa/builder: {snapshot(bench)}")

    # Restarted with service accounts forbidden again: the snapshot's builder answers; a service
    # account created since (not in the snapshot) still waits, never the default role.
    bench.daemon.stop()
    bench.kube.forbid("serviceaccounts")
    bench.kube.create_service_account("team-sa", "late", IRSA_SA)
    late = kube_pod(bench, "team-sa", "late", None, "late")
    bench.daemon.start()
    wait_for_role(irsa, "irsa")
    assert_cli_role(irsa, "irsa")
    wait_until(lambda: listing(late)[0] == 503, 15, f"{late} waiting for its service account: {listing(late)}")
    assert_refused_cli(late, "configured", "irsa")

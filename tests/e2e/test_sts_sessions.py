"""What an EKS operator expects of a pod's STS session (issue 24 items 1-4): cross-account role
chaining, session policies, session tags like EKS Pod Identity's, session names and source
identity.

Real parts: network namespaces, the CNI chain with `iamlink`, nftables, `iamlinkd`, the unmodified
AWS CLI in the pods, moto as STS; the Kubernetes API is emulated (tests/harness/kube_api.py).
What STS was asked is read from moto's own record of the requests it received (its recorder:
every parameter of every AssumeRole, and the access key that signed it). moto accepts session
policies, tags and source identity without enforcing them (moto 5.2 evaluates no session policy),
so their effect is shown by what STS received, which is what AWS enforces.
"""

import json
import os
import subprocess
import time

import pytest

from harness import role_arn
from harness.util import IAMLINKD, wait_until
from test_kube_roles import ensure_namespace, kube_pod, listing, wait_for_role

CREDS = "/latest/meta-data/iam/security-credentials/"
OTHER_ACCOUNT = "210987654321"
TARGET = f"arn:aws:iam::{OTHER_ACCOUNT}:role/reports-reader"
CLUSTER_ARN = "arn:aws:eks:us-east-1:123456789012:cluster/prod"
POLICY = {"Version": "2012-10-17",
          "Statement": [{"Effect": "Allow", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::reports/*"}]}
# As written by an operator (spaces, newlines); sent compact.
POLICY_TEXT = json.dumps(POLICY, indent=2)
POLICY_SENT = json.dumps(POLICY, separators=(",", ":"))
BUILT_IN = ["eks-cluster-arn", "eks-cluster-name", "kubernetes-namespace", "kubernetes-node",
            "kubernetes-pod-name", "kubernetes-pod-uid", "kubernetes-service-account"]
ROLES = ["chain-first", "scoped", "untagged", "tagged", "annotated"]


@pytest.fixture(scope="module")
def bench(make_module_bench):
    b = make_module_bench(
        pod_roles=[],
        kubernetes={},
        daemon_sts={"session_tags": True, "cluster_name": "prod", "cluster_arn": CLUSTER_ARN,
                    "source_identity": True, "duration_seconds": 7200},
        associations=[
            {"namespace": "xacct", "service_account": "reporter", "role": "chain-first", "target_role": TARGET,
             "external_id": "xacct-reporter", "session_policy": POLICY_TEXT},
            {"namespace": "scoped", "service_account": "app", "role": "scoped", "session_policy": POLICY_TEXT,
             "session_name": "{service_account}@{namespace}"},
            {"namespace": "untagged", "service_account": "app", "role": "untagged", "session_tags": False},
            {"namespace": "tagged", "service_account": "app", "role": "tagged"},
        ])
    for role in ROLES:
        b.moto.create_role(role)
    b.moto.start_recording()
    return b


def assume_role_calls(bench, session):
    """The AssumeRole requests moto received for RoleSessionName `session`, in order."""
    return [c for c in bench.moto.recorded("AssumeRole") if c.get("RoleSessionName") == session]


def last_session(bench, session, hops, what, timeout=15):
    """The last `hops` AssumeRole requests for `session` once they satisfy `what(calls)` (polled,
    bounded: the view may see a pod before its namespace's latest annotations, and a session made
    meanwhile is replaced by the one the pod's current facts make)."""
    def ready():
        calls = assume_role_calls(bench, session)[-hops:]
        return calls if len(calls) == hops and what(calls) else None
    try:
        return wait_until(ready, timeout, f"AssumeRole of session {session}", interval=0.2)
    except Exception:
        raise AssertionError(f"session {session}: moto received {assume_role_calls(bench, session)}") from None


def refused(pod, reason, timeout=15):
    """Polls (bounded: the view catches up asynchronously) until the pod's role listing is
    refused (403) for `reason`."""
    def seen():
        status, body = listing(pod)
        return status == 403 and reason in body
    try:
        wait_until(seen, timeout, f"{pod} refused", interval=0.1)
    except Exception:
        raise AssertionError(f"{pod}: expected 403 with {reason!r}, last answer {listing(pod)}") from None


def caller(pod):
    rc, out, err = pod.caller_arn()
    assert rc == 0, f"aws sts get-caller-identity in {pod} failed: {err}"
    return out


def service_account(bench, namespace, name):
    """The service account (and its namespace), made once for the module."""
    ensure_namespace(bench, namespace)
    if bench.kube.get("serviceaccounts", namespace, name) is None:
        bench.kube.create_service_account(namespace, name)


# -- 1. cross-account chaining ---------------------------------------------------------------------

def test_a_chained_association_gives_the_pod_the_target_roles_session_made_with_the_first_roles(bench):
    service_account(bench, "xacct", "reporter")
    pod = kube_pod(bench, "xacct", "report-0", service_account="reporter")
    wait_for_role(pod, "reports-reader")
    assert caller(pod) == f"arn:aws:sts::{OTHER_ACCOUNT}:assumed-role/reports-reader/xacct.report-0"

    first, target = last_session(bench, "xacct.report-0", 2, lambda c: c[1]["RoleArn"] == TARGET)
    assert first["RoleArn"] == role_arn("chain-first") and first["SignedBy"] == "testing", first
    assert target["RoleArn"] == TARGET
    assert target["SignedBy"] not in (None, "testing"), "the target is assumed with the first role's credentials"
    assert (first.get("ExternalId"), target.get("ExternalId")) == (None, "xacct-reporter")
    # STS caps a chained session at an hour: asked for 3600 although [sts] says 7200.
    assert target["DurationSeconds"] == "3600"
    answer = json.loads(pod.imds("request", "GET", CREDS + "reports-reader")["body"])
    left = time.mktime(time.strptime(answer["Expiration"], "%Y-%m-%dT%H:%M:%SZ")) - time.mktime(time.gmtime())
    assert left <= 3600 + 5, f"the pod's credentials last {left} s, longer than a chained session may"


TARGET_ANNOTATION = "iamlink.io/target-role"


def explain_text(bench, pod):
    """`iamlinkd explain` of the pod, as an operator reads it."""
    p = bench.node.exec([IAMLINKD, "--config", bench.daemon.config_path, "explain", pod.key], check=False,
                        timeout=30)
    assert p.returncode == 0, f"iamlinkd explain {pod.key}: rc {p.returncode} {p.stdout} {p.stderr}"
    return p.stdout


def test_a_pod_annotation_names_a_target_role_assumed_with_the_pods_own_roles_credentials(bench):
    pod = kube_pod(bench, "xacct-ann", "p", {"iam.amazonaws.com/role": "annotated", TARGET_ANNOTATION: TARGET},
                   runtime=True)
    wait_for_role(pod, "reports-reader")
    assert caller(pod) == f"arn:aws:sts::{OTHER_ACCOUNT}:assumed-role/reports-reader/xacct-ann.p"

    first, target = last_session(bench, "xacct-ann.p", 2, lambda c: c[1]["RoleArn"] == TARGET)
    assert first["RoleArn"] == role_arn("annotated") and first["SignedBy"] == "testing", first
    assert target["SignedBy"] not in (None, "testing"), "the target is assumed with the pod's role's credentials"
    assert target["DurationSeconds"] == "3600", "a chained session is capped at an hour"


def test_a_target_role_the_namespace_does_not_allow_is_refused_with_the_reason_and_sts_is_never_asked(bench):
    ensure_namespace(bench, "xacct-locked", {"iam.amazonaws.com/allowed-roles": '["annotated"]'})
    pod = kube_pod(bench, "xacct-locked", "p", {"iam.amazonaws.com/role": "annotated", TARGET_ANNOTATION: TARGET})
    reason = f"role {TARGET} is not in iam.amazonaws.com/allowed-roles"
    refused(pod, reason)
    assert reason in explain_text(bench, pod)
    assert assume_role_calls(bench, "xacct-locked.p") == [], "nothing was asked of STS for the refused pod"


def test_a_target_role_without_the_pods_own_role_or_that_is_no_role_arn_is_refused_with_the_reason(bench):
    alone = kube_pod(bench, "xacct-bad", "alone", {TARGET_ANNOTATION: TARGET})
    not_arn = kube_pod(bench, "xacct-bad", "not-arn",
                       {"iam.amazonaws.com/role": "annotated", TARGET_ANNOTATION: "arn:aws:iam::123:role/x"})
    refused(alone, "iamlink.io/target-role needs iam.amazonaws.com/role")
    refused(not_arn, "iamlink.io/target-role: ")
    assert assume_role_calls(bench, "xacct-bad.alone") == assume_role_calls(bench, "xacct-bad.not-arn") == []


# -- 2. session policy -----------------------------------------------------------------------------

def test_the_session_policy_is_sent_compact_on_every_assume_role_of_the_chain(bench):
    service_account(bench, "xacct", "reporter")
    pod = kube_pod(bench, "xacct", "report-1", service_account="reporter")
    wait_for_role(pod, "reports-reader")
    calls = last_session(bench, "xacct.report-1", 2, lambda c: c[1]["RoleArn"] == TARGET)
    assert [c["RoleArn"] for c in calls] == [role_arn("chain-first"), TARGET]
    assert [c.get("Policy") for c in calls] == [POLICY_SENT, POLICY_SENT]


def test_a_namespace_session_policy_applies_and_a_bad_one_refuses_only_its_pods(bench):
    ns_policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Deny", "Action": "*", "Resource": "*"}]}
    ensure_namespace(bench, "ns-policy", {"iamlink.io/session-policy": json.dumps(ns_policy)})
    ensure_namespace(bench, "ns-badpolicy", {"iamlink.io/session-policy": "{not json"})
    good = kube_pod(bench, "ns-policy", "p", {"iam.amazonaws.com/role": "annotated"})
    bad = kube_pod(bench, "ns-badpolicy", "p", {"iam.amazonaws.com/role": "annotated"})
    wait_for_role(good, "annotated")
    [call] = last_session(bench, "ns-policy.p", 1, lambda c: "Policy" in c[0])
    assert json.loads(call["Policy"]) == ns_policy
    refused(bad, "the namespace's iamlink.io/session-policy is not JSON")
    assert assume_role_calls(bench, "ns-badpolicy.p") == [], "nothing was asked of STS for the refused pod"


# -- 3. session tags -------------------------------------------------------------------------------

def tagged_namespace(bench):
    service_account(bench, "tagged", "app")
    bench.kube.annotate("namespaces", None, "tagged", {"iamlink.io/allowed-session-tags": '["team"]'})


def test_sessions_carry_eks_pod_identitys_tags_transitively_and_the_pods_own_tags_its_namespace_allows(bench):
    tagged_namespace(bench)
    pod = kube_pod(bench, "tagged", "web-0", {"iamlink.io/session-tags": '{"team": "payments"}'}, "app")
    wait_for_role(pod, "tagged")
    [call] = last_session(bench, "tagged.web-0", 1, lambda c: "team" in c[0]["Tags"])
    assert call["Tags"] == {
        "eks-cluster-arn": CLUSTER_ARN, "eks-cluster-name": "prod", "kubernetes-namespace": "tagged",
        "kubernetes-service-account": "app", "kubernetes-pod-name": "web-0", "kubernetes-pod-uid": pod.uid,
        "kubernetes-node": bench.node.name, "team": "payments",
    }
    assert call["TransitiveTagKeys"] == BUILT_IN, "built-in tags carry through chains, the pod's own do not"


def test_a_pod_tag_its_namespace_does_not_allow_or_that_overrides_a_built_in_one_is_refused_with_the_reason(bench):
    cases = [
        ("over", '{"kubernetes-namespace": "kube-system"}', "is one iamlinkd sets itself"),
        ("notallowed", '{"owner": "x"}', "not in the namespace's iamlink.io/allowed-session-tags"),
        ("grammar", '{"team": "a;b"}', "must be 0-256 characters"),
    ]
    tagged_namespace(bench)
    for name, tags, reason in cases:
        pod = kube_pod(bench, "tagged", name, {"iamlink.io/session-tags": tags}, "app")
        refused(pod, reason)
        assert assume_role_calls(bench, f"tagged.{name}") == []


def test_an_association_can_turn_session_tags_off(bench):
    service_account(bench, "untagged", "app")
    pod = kube_pod(bench, "untagged", "p", service_account="app")
    wait_for_role(pod, "untagged")
    [call] = last_session(bench, "untagged.p", 1, lambda c: True)
    assert call["Tags"] == {} and call["TransitiveTagKeys"] == []


# -- 4. session names and source identity ----------------------------------------------------------

def test_an_association_names_sessions_by_its_template_and_sessions_carry_the_source_identity(bench):
    service_account(bench, "scoped", "app")
    pod = kube_pod(bench, "scoped", "worker-7", service_account="app")
    wait_for_role(pod, "scoped")
    assert caller(pod) == "arn:aws:sts::123456789012:assumed-role/scoped/app@scoped"
    [call] = last_session(bench, "app@scoped", 1, lambda c: True)
    assert call["SourceIdentity"] == "scoped.app"


def test_a_session_name_past_64_characters_keeps_a_readable_prefix_and_a_hash(bench):
    tagged_namespace(bench)
    name = "reporting-" + "x" * 60
    pod = kube_pod(bench, "tagged", name, None, "app")
    wait_for_role(pod, "tagged")
    session = caller(pod).rsplit("/", 1)[1]
    assert len(session) == 64 and session.startswith(f"tagged.{name}"[:55] + "-"), session
    [call] = last_session(bench, session, 1, lambda c: True)
    assert call["Tags"]["kubernetes-pod-name"] == name, "the tag keeps the whole name"


def test_the_first_hop_of_a_chain_carries_the_source_identity_and_the_tags(bench):
    service_account(bench, "xacct", "reporter")
    pod = kube_pod(bench, "xacct", "report-2", service_account="reporter")
    wait_for_role(pod, "reports-reader")
    first, target = last_session(bench, "xacct.report-2", 2, lambda c: c[1]["RoleArn"] == TARGET)
    assert first["SourceIdentity"] == "xacct.reporter" and "SourceIdentity" not in target
    assert first["Tags"]["kubernetes-service-account"] == "reporter" and target["Tags"] == {}


# -- bad configuration -----------------------------------------------------------------------------

@pytest.mark.parametrize("association, named", [
    ({"target_role": "reports-reader"}, "roles.association[0].target_role \"reports-reader\" is not an IAM role ARN"),
    ({"session_policy": "{not json"}, "roles.association[0].session_policy is not JSON"),
    ({"session_policy": json.dumps({"a": "x" * 2100})}, "over STS's 2048"),
    ({"session_name": "{namespace}/{pod}"}, "roles.association[0].session_name"),
])
def test_bad_session_configuration_is_refused_at_start_naming_the_key(tmp_path, association, named):
    entry = {"namespace": "a", "service_account": "s", "role": "r", **association}
    lines = ['listen = "198.18.0.1:8181"', "[roles]", 'base_arn = "arn:aws:iam::123456789012:role/"',
             "[[roles.association]]"] + [f"{k} = {json.dumps(v)}" for k, v in entry.items()]
    path = os.path.join(tmp_path, "iamlinkd.toml")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    p = subprocess.run([IAMLINKD, "--check-config", "--config", path], capture_output=True, text=True, timeout=30)
    assert p.returncode != 0 and named in p.stderr, (p.returncode, p.stderr)

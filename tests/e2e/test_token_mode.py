"""Token mode: the node holds no role, and pods get their own role from their own
service-account token (IRSA: AssumeRoleWithWebIdentity), or nothing.

Real parts: network namespaces, the ptp/host-local/iamlink chain, nftables, iamlinkd with its
kube reflectors, the unmodified AWS CLI in the pods. Emulated: the Kubernetes API server, kubelet's
projected token files (a tmpfs laid out as kubelet's atomic writer lays it out), the OIDC issuer
(RS256, kube-apiserver's claims) and STS's checks (tests/harness/sts_web_identity_shim.py in front
of moto). moto enforces IAM on every request, and iamlinkd's principal has no policy: any
AssumeRole it tried with its own identity would be denied. Legacy mode is off.
"""

import json
import re
import time
import uuid

import pytest

from harness import is_assumed_role, role_arn, wait_until
from harness.token_bench import TokenBench

CREDS = "/latest/meta-data/iam/security-credentials/"
ROLES = {"irsa-app": ("team-t", "app"), "irsa-other": ("team-t", "other")}


@pytest.fixture(scope="module")
def tb(make_module_bench):
    bench = make_module_bench(start_daemon=False, kubernetes={}, pod_roles=[])
    return TokenBench(bench, ROLES, roles_extra={"legacy_assume_role": False})


def cli_arn(pod):
    rc, out, err = pod.caller_arn()
    return out if rc == 0 else f"(aws exited {rc}: {err[-300:]})"


def credentials(pod, role):
    """(status, body) of the pod's credentials request for `role`, as an SDK's second request."""
    r = pod.imds("request", "GET", CREDS + role)
    return r.get("status"), r.get("body", "")


def explain(tb, pod):
    p = tb.node.exec([tb.bench.daemon.binary, "--config", tb.bench.daemon.config_path, "explain", pod.key],
                     check=False, timeout=30)
    return p.stdout + p.stderr


def forwarded(tb, role):
    return [c for c in tb.shim_calls() if c["role"] == role_arn(role) and c["outcome"] == "forwarded"]


def test_an_irsa_pod_gets_its_role_through_the_cli_while_the_node_may_assume_no_role(tb):
    pod = tb.irsa_pod("team-t", "app-0", "app", "irsa-app")
    arn = cli_arn(pod)
    assert is_assumed_role(arn, "irsa-app"), f"expected assumed-role/irsa-app/..., got {arn}"
    assert forwarded(tb, "irsa-app"), "the role came through AssumeRoleWithWebIdentity"
    assert "token mode" in explain(tb, pod)


def test_explain_names_the_mode_as_a_field_of_its_own(tb):
    pod = tb.irsa_pod("team-t", "app-8", "app", "irsa-app")
    assert credentials(pod, "irsa-app")[0] == 200
    p = tb.node.exec([tb.bench.daemon.binary, "--config", tb.bench.daemon.config_path, "explain", pod.key, "--json"],
                     check=False, timeout=30)
    report = json.loads(p.stdout)
    assert report["pods"][0]["daemon"]["mode"] == "token IRSA", p.stdout
    assert re.search(r"^\s*mode\s+token IRSA$", explain(tb, pod), re.M), explain(tb, pod)


def test_another_pods_token_under_this_pods_uid_is_refused_never_exchanged(tb):
    victim = tb.irsa_pod("team-t", "other-0", "other", "irsa-other", token=False)
    thief = tb.irsa_pod("team-t", "app-1", "app", "irsa-app")
    # The victim's token (its own service account, role and UID) lies where the thief's should.
    tb.kubelet.write(thief.uid, tb.issuer.token(victim, "other", node=tb.node.name))
    calls = len(tb.shim_calls())
    status, body = credentials(thief, "irsa-app")
    assert status == 403 and "belongs to pod team-t/other-0" in body, (status, body)
    assert len(tb.shim_calls()) == calls, "a foreign token must never reach STS"
    assert "belongs to pod team-t/other-0" in explain(tb, thief)


def test_an_expired_token_is_refused_with_the_reason(tb):
    pod = tb.irsa_pod("team-t", "app-2", "app", "irsa-app", token=False)
    tb.kubelet.write(pod.uid, tb.issuer.token(pod, "app", node=tb.node.name, now=time.time() - 7200))
    status, body = credentials(pod, "irsa-app")
    assert status == 403 and "expired" in body, (status, body)
    assert "(aws exited" in cli_arn(pod)


def test_a_token_of_the_wrong_audience_is_refused(tb):
    pod = tb.irsa_pod("team-t", "app-3", "app", "irsa-app", token=False)
    tb.kubelet.write(pod.uid, tb.issuer.token(pod, "app", audience="vault", node=tb.node.name))
    status, body = credentials(pod, "irsa-app")
    assert status == 403 and "audience" in body, (status, body)


def test_a_missing_token_file_answers_503_so_sdks_retry_never_the_nodes_role(tb):
    """kubelet may be about to write it: SDKs retry a 5xx, and give up on a 403."""
    pod = tb.irsa_pod("team-t", "app-4", "app", "irsa-app")
    tb.kubelet.remove(pod.uid)
    status, body = credentials(pod, "irsa-app")
    assert status == 503 and "cannot read the pod's token" in body, (status, body)
    assert "(aws exited" in cli_arn(pod)


def test_a_rotated_token_is_read_and_exchanged_on_the_next_fetch(tb):
    pod = tb.irsa_pod("team-t", "app-5", "app", "irsa-app", token=False)
    first = tb.issuer.token(pod, "app", node=tb.node.name, jti="first-token")
    tb.kubelet.write(pod.uid, first)
    assert credentials(pod, "irsa-app")[0] == 200
    assert [c["jti"] for c in forwarded(tb, "irsa-app")][-1] == "first-token"
    tb.kubelet.write(pod.uid, tb.issuer.token(pod, "app", node=tb.node.name, jti="second-token"))  # ..data swapped
    status, body = credentials(pod, "irsa-app")
    assert status == 200, (status, body)
    assert [c["jti"] for c in forwarded(tb, "irsa-app")][-1] == "second-token"
    # And an expired token after rotation refuses at once, whatever is cached for the old one.
    tb.kubelet.write(pod.uid, tb.issuer.token(pod, "app", node=tb.node.name, now=time.time() - 7200))
    assert credentials(pod, "irsa-app")[0] == 403


def test_a_pod_recreated_under_the_same_name_never_gets_the_deleted_pods_credentials(tb):
    old = tb.irsa_pod("team-t", "app-6", "app", "irsa-app")
    assert credentials(old, "irsa-app")[0] == 200
    tb.bench.pods.delete(old)
    tb.bench.kube.delete("pods", "team-t", "app-6")
    # The old pod's token is still on disk (kubelet cleans up later); the new pod has none yet.
    new = tb.irsa_pod("team-t", "app-6", "app", "irsa-app", token=False)

    def refused():
        status, body = credentials(new, "irsa-app")
        return status == 503 and "cannot read the pod's token" in body

    wait_until(refused, 15, "the recreated pod refused until its own token is written")
    tb.kubelet.write(new.uid, tb.issuer.token(new, "app", node=tb.node.name))
    assert credentials(new, "irsa-app")[0] == 200


def test_legacy_mode_off_refuses_an_annotation_only_pod_and_explain_says_why(tb):
    kube = tb.bench.kube
    kube.create_namespace("team-l")
    uid = str(uuid.uuid4())
    kube.create_pod("team-l", "kube2iam-0", node=tb.node.name, uid=uid,
                    annotations={"iam.amazonaws.com/role": "irsa-app"})
    pod = tb.bench.pods.add("team-l", "kube2iam-0", uid=uid)

    def refused():
        status, body = credentials(pod, "irsa-app")
        return status == 403 and "legacy mode" in body

    wait_until(refused, 15, "the annotation-only pod refused for legacy mode")
    out = explain(tb, pod)
    assert "legacy mode" in out and "off for namespace team-l" in out, out
    assert "(aws exited" in cli_arn(pod)


def test_the_shim_is_strict_a_forged_token_is_rejected_by_sts(tb):
    """The signature is STS's check, not iamlinkd's: a well-formed token signed by another key
    passes iamlinkd's claim checks and is rejected by STS (here the shim)."""
    pod = tb.irsa_pod("team-t", "app-7", "app", "irsa-app", token=False)
    tb.kubelet.write(pod.uid, tb.issuer.token(pod, "app", node=tb.node.name, forged=True))
    status, _ = credentials(pod, "irsa-app")
    assert status == 503
    assert tb.shim_calls()[-1]["outcome"] == "InvalidIdentityToken", json.dumps(tb.shim_calls()[-1])

"""Token mode, EKS Pod Identity: a pod whose spec projects a token of audience
pods.eks.amazonaws.com gets its association's role from that token through EKS Auth
AssumeRoleForPodIdentity, or nothing; the node holds no role.

Real parts: network namespaces, the ptp/host-local/iamlink chain, nftables (both the metadata and
the credentials address), iamlinkd with its kube reflectors, the unmodified AWS CLI and botocore in
the pods. Emulated: the Kubernetes API server, kubelet's projected token files, the OIDC issuer,
and EKS Auth (tests/harness/eks_auth_server.py: the real route and wire format, SigV4 for
`eks-auth` checked against its allow-list, the token verified against the issuer's JWKS,
associations from a table, credentials from moto). moto enforces IAM on every request, and
iamlinkd's principal has no policy: no sts:AssumeRole, only the fake EKS Auth's allow-list of
eks-auth:AssumeRoleForPodIdentity. Legacy mode is off.
"""

import json
import time

import boto3
import botocore.exceptions
import pytest

from harness import is_assumed_role, wait_until
from harness.oidc import IRSA_AUDIENCE, IRSA_VOLUME, projected_volume
from harness.token_bench import CLUSTER, TokenBench
from harness.moto import BASE_ARN
from harness.util import PYTHON

CREDS = "/latest/meta-data/iam/security-credentials/"
CONTAINER_URI = "http://169.254.170.23/v1/credentials"
PI_ROLES = ["pi-app", "pi-other"]

BOTO_PROBE = """
import json, boto3
session = boto3.session.Session()
creds = session.get_credentials()
sts = session.client("sts", endpoint_url="http://198.18.0.2:5000", region_name="us-east-1")
print(json.dumps({"method": creds.method, "arn": sts.get_caller_identity()["Arn"]}))
"""


@pytest.fixture(scope="module")
def tb(make_module_bench):
    bench = make_module_bench(start_daemon=False, kubernetes={}, pod_roles=[])
    tb = TokenBench(bench, {"irsa-app": ("team-p", "both")}, roles_extra={"legacy_assume_role": False},
                    pod_identity_roles=PI_ROLES)
    tb.associate("team-p", "app", "pi-app")
    tb.associate("team-p", "other", "pi-other")
    tb.associate("team-p", "both", "pi-other")
    return tb


def cli_arn(pod):
    rc, out, err = pod.caller_arn()
    return out if rc == 0 else f"(aws exited {rc}: {err[-300:]})"


def get(pod, path):
    r = pod.imds("request", "GET", path)
    return r.get("status"), r.get("body", "")


def explain(tb, pod, json_output=False):
    argv = [tb.bench.daemon.binary, "--config", tb.bench.daemon.config_path, "explain", pod.key]
    p = tb.node.exec(argv + (["--json"] if json_output else []), check=False, timeout=30)
    return p.stdout + p.stderr


def issued(tb, pod):
    return [c for c in tb.eks_calls() if c.get("pod") == pod.name and c["outcome"] == "issued"]


def test_a_pod_identity_pod_gets_its_associations_role_through_the_cli_while_the_node_may_assume_no_role(tb):
    pod = tb.pod_identity_pod("team-p", "app-0", "app")
    arn = cli_arn(pod)
    assert is_assumed_role(arn, "pi-app"), f"expected assumed-role/pi-app/..., got {arn}"
    calls = issued(tb, pod)
    assert calls and calls[-1]["cluster"] == CLUSTER, tb.eks_calls()[-3:]
    assert calls[-1]["caller"] == tb.node_keys["AccessKeyId"], "signed by iamlinkd's own principal"
    assert get(pod, CREDS) == (200, "pi-app"), "the role listed is the one EKS named"
    out = explain(tb, pod)
    assert "token Pod Identity" in out and "pi-app" in out, out


def test_botocore_gets_the_role_from_the_credentials_address_as_pod_identity_sdks_do(tb):
    pod = tb.pod_identity_pod("team-p", "app-1", "app")
    env = {"AWS_CONTAINER_CREDENTIALS_FULL_URI": CONTAINER_URI,
           "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE": tb.pod_identity_token_file(pod)}
    p = pod.exec([PYTHON, "-c", BOTO_PROBE], env=env)
    assert p.returncode == 0, p.stderr[-600:]
    got = json.loads(p.stdout)
    assert got["method"] == "container-role", got
    assert is_assumed_role(got["arn"], "pi-app"), got


def test_another_pods_token_under_this_pods_uid_is_refused_never_exchanged(tb):
    victim = tb.pod_identity_pod("team-p", "other-0", "other", token=False)
    thief = tb.pod_identity_pod("team-p", "app-2", "app", token=False)
    tb.write_pod_identity_token(thief, tb.pod_identity_token(victim))
    calls = len(tb.eks_calls())
    status, body = get(thief, CREDS)
    assert status == 403 and "belongs to pod team-p/other-0" in body, (status, body)
    assert len(tb.eks_calls()) == calls, "a foreign token must never reach EKS Auth"
    assert "(aws exited" in cli_arn(thief)
    out = explain(tb, thief)
    assert "belongs to pod team-p/other-0" in out and "refused" in out, out


def test_an_expired_token_is_refused_with_the_reason(tb):
    pod = tb.pod_identity_pod("team-p", "app-3", "app", token=False)
    tb.write_pod_identity_token(pod, tb.pod_identity_token(pod, now=time.time() - 7200))
    status, body = get(pod, CREDS)
    assert status == 403 and "expired" in body, (status, body)
    assert not issued(tb, pod)


def test_a_service_account_without_an_association_is_refused_and_explain_says_why(tb):
    pod = tb.pod_identity_pod("team-p", "lonely-0", "lonely")
    status, _ = get(pod, CREDS + "pi-app")
    assert status == 503, status
    assert tb.eks_calls()[-1]["outcome"] == "ResourceNotFoundException", tb.eks_calls()[-1]
    assert "(aws exited" in cli_arn(pod)
    out = explain(tb, pod)
    assert "ResourceNotFoundException" in out and "no Pod Identity association" in out, out


def test_a_rotated_token_is_read_and_exchanged_on_the_next_fetch(tb):
    pod = tb.pod_identity_pod("team-p", "app-4", "app", token=False)
    tb.write_pod_identity_token(pod, tb.pod_identity_token(pod, jti="first-pi-token"))
    assert get(pod, CREDS + "pi-app")[0] == 200
    assert issued(tb, pod)[-1]["jti"] == "first-pi-token"
    tb.write_pod_identity_token(pod, tb.pod_identity_token(pod, jti="second-pi-token"))  # ..data swapped
    status, body = get(pod, CREDS + "pi-app")
    assert status == 200, (status, body)
    assert issued(tb, pod)[-1]["jti"] == "second-pi-token"


def test_a_missing_token_file_answers_503_so_sdks_retry_while_kubelet_writes_it(tb):
    pod = tb.pod_identity_pod("team-p", "app-5", "app", token=False)
    status, body = get(pod, CREDS)
    assert status == 503 and "cannot read the pod's token" in body, (status, body)
    tb.write_pod_identity_token(pod, tb.pod_identity_token(pod))
    assert get(pod, CREDS) == (200, "pi-app")


def test_a_pod_recreated_under_the_same_name_never_gets_the_deleted_pods_credentials(tb):
    old = tb.pod_identity_pod("team-p", "app-7", "app")
    assert get(old, CREDS) == (200, "pi-app")
    tb.bench.pods.delete(old)
    tb.bench.kube.delete("pods", "team-p", "app-7")
    # The old pod's token is still on disk (kubelet cleans up later); the new pod has none yet.
    new = tb.pod_identity_pod("team-p", "app-7", "app", token=False)

    def refused():
        status, body = get(new, CREDS)
        return status == 503 and "cannot read the pod's token" in body

    wait_until(refused, 15, "the recreated pod refused until its own token is written")
    tb.write_pod_identity_token(new, tb.pod_identity_token(new))
    assert get(new, CREDS) == (200, "pi-app")


def test_irsa_wins_over_pod_identity_when_the_pod_projects_both_tokens(tb):
    """The SDKs' chain reads AWS_WEB_IDENTITY_TOKEN_FILE before AWS_CONTAINER_CREDENTIALS_FULL_URI."""
    # The service account has an association (pi-other) and an IRSA role (irsa-app).
    tb.bench.kube.create_service_account("team-p", "both", annotations={"eks.amazonaws.com/role-arn": BASE_ARN + "irsa-app"})
    pod = tb.pod_identity_pod("team-p", "both-0", "both", extra_volumes=[projected_volume(IRSA_VOLUME, IRSA_AUDIENCE)])
    tb.kubelet.write(pod.uid, tb.issuer.token(pod, "both", IRSA_AUDIENCE, node=tb.node.name), volume=IRSA_VOLUME)
    assert get(pod, CREDS) == (200, "irsa-app")
    assert is_assumed_role(cli_arn(pod), "irsa-app")
    assert not issued(tb, pod), "the Pod Identity token was not exchanged"
    assert "token IRSA" in explain(tb, pod)


def test_without_a_cluster_name_a_pod_identity_pod_is_refused_with_the_reason(tb):
    daemon = tb.bench.daemon
    daemon.stop()
    del daemon.sts["cluster_name"]
    try:
        daemon.start()
        pod = tb.pod_identity_pod("team-p", "app-6", "app")
        calls = len(tb.eks_calls())

        def refused():
            status, body = get(pod, CREDS)
            return status == 403 and "sts.cluster_name is unset" in body

        wait_until(refused, 15, "the Pod Identity pod refused for the unset cluster name")
        assert len(tb.eks_calls()) == calls
        report = json.loads(explain(tb, pod, json_output=True))
        assert report["pods"][0]["daemon"]["mode"] == "refused", report
    finally:
        daemon.stop()
        daemon.sts["cluster_name"] = CLUSTER
        daemon.start()


def test_the_fake_eks_auth_speaks_the_sdks_wire_format_and_is_strict(tb):
    """botocore's own eks-auth client parses its answers and errors; it refuses a caller off its
    allow-list (even one moto would let assume the role) and a token of another issuer's key."""
    pod = tb.pod_identity_pod("team-p", "app-9", "app", token=False)
    token = tb.pod_identity_token(pod)

    def exchange(keys, token):
        client = boto3.client("eks-auth", endpoint_url=f"http://{tb.HOST}:{tb.EKS_PORT}", region_name="us-east-1",
                              aws_access_key_id=keys["AccessKeyId"], aws_secret_access_key=keys["SecretAccessKey"])
        try:
            out = client.assume_role_for_pod_identity(clusterName=CLUSTER, token=token)
            return out["assumedRoleUser"]["arn"], out["credentials"]["expiration"]
        except botocore.exceptions.ClientError as e:
            return e.response["Error"]["Code"], e.response["ResponseMetadata"]["HTTPStatusCode"]

    arn, expiration = tb.node.call(exchange, tb.node_keys, token)
    assert is_assumed_role(arn, "pi-app") and expiration.timestamp() > time.time(), (arn, expiration)
    assert tb.node.call(exchange, tb.eks_config["gateway"], token) == ("AccessDeniedException", 400)
    forged = tb.issuer.token(pod, "app", "pods.eks.amazonaws.com", node=tb.node.name, forged=True)
    assert tb.node.call(exchange, tb.node_keys, forged) == ("InvalidTokenException", 400)

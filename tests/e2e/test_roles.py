"""Each pod gets its own role through the metadata address, and nothing else.

Real parts: network namespaces and veths (the node and one namespace per pod), the reference `ptp`
and `host-local` plugins chained with the built `iamlink` plugin through libcni (`cnirt`), the
nftables interception, the built `iamlinkd`, the unmodified AWS CLI and curl in the pods.
Emulated: STS and IAM by moto_server (no AWS account here; moto issues real-looking session
credentials and answers get-caller-identity for them), and the node's own metadata service by a
small HTTP server on 169.254.169.254 serving a node role with moto credentials, so that any leak of
the node's identity shows up as its ARN.
"""

import json

import pytest

from conftest import STANDARD_PODS, add_standard_pods
from harness import NODE_ROLE, credential_document_problems, is_assumed_role

CREDS = "/latest/meta-data/iam/security-credentials/"
ROLE_PODS = [f"{ns}/{name}" for ns, name, role in STANDARD_PODS if role]


@pytest.fixture(scope="module")
def bench(make_module_bench):
    b = make_module_bench()
    b.by_key = add_standard_pods(b)
    return b


@pytest.fixture
def pod(bench, request):
    return bench.by_key[request.param]


def token(pod, ttl=21600):
    r = pod.imds("request", "PUT", "/latest/api/token", "-H", f"X-aws-ec2-metadata-token-ttl-seconds: {ttl}")
    assert r.get("status") == 200, f"token PUT in {pod}: {r}"
    return r["body"]


@pytest.mark.parametrize("pod", ROLE_PODS, indirect=True)
def test_aws_cli_in_a_pod_gets_the_pods_own_role(pod):
    rc, out, err = pod.caller_arn()
    assert rc == 0, f"aws sts get-caller-identity in {pod} failed: {err}"
    assert is_assumed_role(out, pod.role), f"{pod} expected assumed-role/{pod.role}/..., got {out!r}"


def test_pod_without_role_gets_no_credentials_and_never_the_node_role(bench):
    pod = bench.by_key["team-c/norole"]
    rc, out, err = pod.caller_arn()
    assert rc != 0, f"a pod with no role got an identity: {out!r}"
    assert "Unable to locate credentials" in err, err
    assert not bench.upstream.leaked(out + err)
    listing = pod.imds("request", "GET", CREDS)
    assert listing.get("status") == 404, listing
    assert not bench.upstream.leaked(json.dumps(listing))


@pytest.mark.parametrize("pod", ROLE_PODS, indirect=True)
def test_imdsv1_get_returns_the_pods_own_credentials_document(bench, pod):
    r = pod.imds("creds", "--v1")
    assert r["ok"], f"IMDSv1 credentials in {pod}: {r}"
    assert r["role"] == pod.role
    doc = r["creds"]
    assert credential_document_problems(doc) == [], doc
    arn = bench.moto.caller_arn(doc)
    assert is_assumed_role(arn, pod.role), f"{pod}'s IMDSv1 credentials belong to {arn}"


def test_curl_without_token_reads_the_role_and_its_credentials(bench):
    pod = bench.by_key["team-a/web"]
    listing = pod.exec(["curl", "-sS", "--max-time", "5", "http://169.254.169.254" + CREDS])
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.strip() == "web"
    doc = pod.exec(["curl", "-sS", "--max-time", "5", "http://169.254.169.254" + CREDS + "web"])
    assert doc.returncode == 0, doc.stderr
    creds = json.loads(doc.stdout)
    assert credential_document_problems(creds) == []
    assert is_assumed_role(bench.moto.caller_arn(creds), "web")


def test_token_put_answers_with_the_ttl_header(bench):
    r = bench.by_key["team-a/web"].imds("request", "PUT", "/latest/api/token",
                                         "-H", "X-aws-ec2-metadata-token-ttl-seconds: 300")
    assert r["status"] == 200 and r["body"], r
    headers = {k.lower(): v for k, v in r["headers"].items()}
    assert headers.get("x-aws-ec2-metadata-token-ttl-seconds") == "300", r["headers"]


@pytest.mark.parametrize("ttl", ["0", "21601", "-1", "abc", None])
def test_token_put_with_invalid_ttl_is_400(bench, ttl):
    headers = [] if ttl is None else ["-H", f"X-aws-ec2-metadata-token-ttl-seconds: {ttl}"]
    r = bench.by_key["team-a/web"].imds("request", "PUT", "/latest/api/token", *headers)
    assert r.get("status") == 400, f"ttl {ttl!r}: {r}"


def test_token_put_with_x_forwarded_for_is_403(bench):
    r = bench.by_key["team-a/web"].imds("request", "PUT", "/latest/api/token",
                                         "-H", "X-aws-ec2-metadata-token-ttl-seconds: 300",
                                         "-H", "X-Forwarded-For: 198.18.64.99")
    assert r.get("status") == 403, r


def test_token_of_one_pod_is_401_in_another(bench):
    web, batch = bench.by_key["team-a/web"], bench.by_key["team-a/batch"]
    t = token(web)
    own = web.imds("request", "GET", CREDS, "-H", f"X-aws-ec2-metadata-token: {t}")
    assert own.get("status") == 200 and own["body"].strip() == "web", own
    for path in (CREDS, CREDS + "web", CREDS + "batch"):
        r = batch.imds("request", "GET", path, "-H", f"X-aws-ec2-metadata-token: {t}")
        assert r.get("status") == 401, f"{path} with web's token from batch: {r}"


def test_invalid_token_is_401(bench):
    r = bench.by_key["team-a/web"].imds("request", "GET", CREDS, "-H", "X-aws-ec2-metadata-token: forged")
    assert r.get("status") == 401, r


@pytest.mark.parametrize("path", [
    "/latest/user-data",
    CREDS + NODE_ROLE,
    CREDS + "batch",  # another pod's role
    "/latest/meta-data/instance-id",
    "/latest/meta-data/placement/region/../../iam/security-credentials/" + NODE_ROLE,
])
@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_paths_outside_the_allow_list_are_404(bench, path, v2):
    pod = bench.by_key["team-a/web"]
    headers = ["-H", f"X-aws-ec2-metadata-token: {token(pod)}"] if v2 else []
    r = pod.imds("request", "GET", path, *headers)
    assert r.get("status") == 404, f"{path}: {r}"
    assert not bench.upstream.leaked(r.get("body", "")), r
    assert "node-secret-user-data" not in r.get("body", "")


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_allow_listed_path_is_proxied_from_the_real_metadata_service(bench, v2):
    pod = bench.by_key["team-a/batch"]
    headers = ["-H", f"X-aws-ec2-metadata-token: {token(pod)}"] if v2 else []
    r = pod.imds("request", "GET", "/latest/meta-data/placement/region", *headers)
    assert r.get("status") == 200 and r["body"].strip() == "us-east-1", r
    doc = pod.imds("request", "GET", "/latest/dynamic/instance-identity/document", *headers)
    assert doc.get("status") == 200, doc
    assert json.loads(doc["body"])["instanceId"] == "i-0fakeiamlinknode", doc
    # The harness asked for the region once at start (readiness); iamlinkd must have asked too
    # (at least once: it may cache).
    asked = [q for q in bench.upstream.requests() if q["path"] == "/latest/meta-data/placement/region"]
    assert len(asked) >= 2, asked


def test_with_imdsv1_disabled_a_get_without_token_is_401(bench):
    pod = bench.by_key["team-a/web"]
    bench.daemon.reconfigure(settings={"imdsv1": False})
    try:
        r = pod.imds("request", "GET", CREDS)
        assert r.get("status") == 401, r
        v2 = pod.imds("creds")
        assert v2["ok"] and v2["role"] == "web", v2
    finally:
        bench.daemon.reconfigure(settings={"imdsv1": True})
    assert pod.imds("request", "GET", CREDS).get("status") == 200

"""A second SDK family, and both credential endpoints: the AWS SDK for JavaScript v3 through
instance metadata and through the container-credentials endpoint (EKS Pod Identity's), and
botocore's container provider, each get the asking pod's own role.

Real parts: namespaces and veths, ptp + host-local + the built iamlink plugin through libcni
(`cnirt`), the nftables interception of both 169.254.169.254 and 169.254.170.23, the built
iamlinkd, and unmodified SDKs in the pods: @aws-sdk/client-sts and @aws-sdk/credential-providers
(pinned, installed from npm into .build/node by scripts/setup) on the system's Node.js, and
boto3/botocore from PyPI. Emulated: STS by moto (the SDKs call GetCallerIdentity on it at
http://198.18.0.2:5000 with the credentials they resolved), the node's metadata service by the
fake upstream.
"""

import datetime
import json
import os
import shutil

import pytest

from conftest import add_standard_pods
from harness import ACCOUNT, is_assumed_role, parse_time
from harness.netns_threads import NetnsThreads
from harness.rawhttp import request
from harness.util import PYTHON, REPO

NODE_MODULES = os.path.join(REPO, ".build", "node", "node_modules")
SDK_PROBE = os.path.join(REPO, "tests", "harness", "sdk_probe.js")
CONTAINER_URI = "http://169.254.170.23/v1/credentials"
# What a pod spec sets for the container-credentials endpoint (README): the URI and a token,
# inline or in a file. iamlinkd checks only that one is sent: a GET-only request forgery in the
# pod cannot add the header, which is what the token stands for.
CONTAINER_TOKEN = "iamlink-pod-token"
CONTAINER_ENV = {"AWS_CONTAINER_CREDENTIALS_FULL_URI": CONTAINER_URI, "AWS_CONTAINER_AUTHORIZATION_TOKEN": CONTAINER_TOKEN}
ROLE_PODS = ["team-a/web", "team-b/api"]

BOTO_PROBE = """
import json, boto3
session = boto3.session.Session()
creds = session.get_credentials()
sts = session.client("sts", endpoint_url="http://198.18.0.2:5000", region_name="us-east-1")
print(json.dumps({"method": creds.method, "accessKeyId": creds.access_key,
                  "arn": sts.get_caller_identity()["Arn"]}))
"""


@pytest.fixture(scope="module")
def bench(make_module_bench):
    node = shutil.which("node")
    missing = [p for p in (os.path.join(NODE_MODULES, "@aws-sdk", "client-sts"),
                           os.path.join(NODE_MODULES, "@aws-sdk", "credential-providers")) if not os.path.isdir(p)]
    if node is None or missing:
        pytest.fail(f"the AWS SDK for JavaScript v3 is not installed ({node or 'no node'}, missing {missing}): "
                    f"run scripts/setup", pytrace=False)
    b = make_module_bench()
    b.by_key = add_standard_pods(b)
    b.node_js = node
    b.token_file = os.path.join(b.node.workdir, "container-token")
    with open(b.token_file, "w") as f:
        f.write(CONTAINER_TOKEN)  # as a projected token file: no newline (the JS SDK sends it as read)
    return b


def token_file_env(bench):
    return {"AWS_CONTAINER_CREDENTIALS_FULL_URI": CONTAINER_URI, "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE": bench.token_file}


def js(bench, pod, provider, env=None, timeout=60):
    p = pod.exec([bench.node_js, SDK_PROBE, provider], env=dict({"NODE_PATH": NODE_MODULES}, **(env or {})),
                 timeout=timeout)
    try:
        return json.loads(p.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise AssertionError(f"sdk_probe.js {provider} in {pod}: exit {p.returncode}, stdout {p.stdout!r}, "
                             f"stderr {p.stderr[-2000:]!r}")


JS_PROVIDERS = {
    "default-chain-via-instance-metadata": ("default", {}),
    "fromInstanceMetadata": ("imds", {}),
    "fromHttp-container-endpoint": ("http", CONTAINER_ENV),
    "fromHttp-container-endpoint-token-file": ("http", "token-file"),
    "default-chain-via-container-endpoint": ("default", CONTAINER_ENV),
}


def provider_env(bench, how):
    provider, env = JS_PROVIDERS[how]
    return provider, token_file_env(bench) if env == "token-file" else env


@pytest.mark.parametrize("how", JS_PROVIDERS, ids=list(JS_PROVIDERS))
def test_javascript_sdk_v3_gets_each_pods_own_role(bench, how):
    provider, env = provider_env(bench, how)
    keys = {}
    for key in ROLE_PODS:
        pod = bench.by_key[key]
        r = js(bench, pod, provider, env)
        assert "error" not in r, f"{how} in {pod}: {r}"
        assert is_assumed_role(r["arn"], pod.role), f"{how} in {pod}: {r['arn']}"
        assert parse_time(r["expiration"]) > datetime.datetime.now(datetime.timezone.utc), r
        keys[key] = r["accessKeyId"]
    assert len(set(keys.values())) == len(keys), f"two pods share a key: {keys}"


@pytest.mark.parametrize("how", ["default-chain-via-instance-metadata", "default-chain-via-container-endpoint"])
def test_javascript_sdk_v3_in_a_pod_without_role_finds_no_credentials(bench, how):
    pod = bench.by_key["team-c/norole"]
    provider, env = provider_env(bench, how)
    r = js(bench, pod, provider, env)
    assert r.get("name") == "CredentialsProviderError" and "arn" not in r, f"a pod without a role: {r}"
    assert not bench.upstream.leaked(json.dumps(r)), r


@pytest.mark.parametrize("token", ["inline", "file"])
@pytest.mark.parametrize("key", ROLE_PODS)
def test_botocore_container_provider_gets_the_pods_own_role(bench, key, token):
    pod = bench.by_key[key]
    env = CONTAINER_ENV if token == "inline" else token_file_env(bench)
    p = pod.exec([PYTHON, "-c", BOTO_PROBE], env=env)
    assert p.returncode == 0, f"boto3 in {pod}: {p.stderr[-2000:]}"
    r = json.loads(p.stdout)
    assert r["method"] == "container-role", f"boto3 in {pod} used {r['method']}, not the container endpoint"
    assert is_assumed_role(r["arn"], pod.role), f"boto3 in {pod}: {r['arn']}"


def test_container_credentials_without_an_authorization_token_are_refused(bench):
    pod = bench.by_key["team-a/web"]
    p = pod.exec([PYTHON, "-c", BOTO_PROBE], env={"AWS_CONTAINER_CREDENTIALS_FULL_URI": CONTAINER_URI})
    assert p.returncode != 0 and '"arn"' not in p.stdout, f"boto3 without a token in {pod}: {p.stdout} {p.stderr[-2000:]}"
    r = js(bench, pod, "http", {"AWS_CONTAINER_CREDENTIALS_FULL_URI": CONTAINER_URI})
    assert "error" in r and "arn" not in r, f"fromHttp without a token in {pod}: {r}"
    with NetnsThreads(pod.netns) as t:
        for headers in ([], [("Authorization", "")]):
            a = t.call(request, "GET", "/v1/credentials", headers, addr=("169.254.170.23", 80))
            assert a.status == 401 and "Authorization" in a.text, (headers, a)
            assert "SecretAccessKey" not in a.text, a


def test_container_credentials_are_served_only_on_the_container_credentials_address(bench):
    pod = bench.by_key["team-a/web"]
    with NetnsThreads(pod.netns) as t:
        imds_path = t.call(request, "GET", "/v1/credentials", [("Authorization", CONTAINER_TOKEN)])
        assert imds_path.status == 404 and "SecretAccessKey" not in imds_path.text, imds_path
        # The EKS agent serves only the container-credentials path there; so does iamlinkd.
        token = t.call(request, "PUT", "/latest/api/token", [("X-aws-ec2-metadata-token-ttl-seconds", "60")],
                       addr=("169.254.170.23", 80))
        assert token.status == 404, token
        role = t.call(request, "GET", "/latest/meta-data/iam/security-credentials/", addr=("169.254.170.23", 80))
        assert role.status == 404 and "web" not in role.text, role


def test_container_credentials_endpoint_answers_the_documented_json(bench):
    def ask(key):
        with NetnsThreads(bench.by_key[key].netns) as t:
            return t.call(request, "GET", "/v1/credentials", [("Authorization", CONTAINER_TOKEN)],
                          addr=("169.254.170.23", 80))

    r, none = ask("team-a/web"), ask("team-c/norole")
    assert r.status == 200 and r.headers.get("content-type"), r
    doc = json.loads(r.body)
    assert set(doc) == {"AccessKeyId", "SecretAccessKey", "Token", "AccountId", "Expiration"}, doc
    assert doc["AccountId"] == ACCOUNT, doc
    assert parse_time(doc["Expiration"]) > datetime.datetime.now(datetime.timezone.utc), doc
    assert is_assumed_role(bench.moto.caller_arn(doc), "web")
    assert none.status == 404 and not bench.upstream.leaked(none.text), none

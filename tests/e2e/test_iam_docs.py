"""The AWS IAM setup in deploy/iam/ is correct IAM, and it is the setup the bench runs against.

The bench makes its roles from these files (tests/harness/moto.py): pod roles under `/iamlink/`
trusting the node role, the node role carrying node-role-permissions.json. What is checked here:
- grammar: the JSON documents are IAM policies (cfn-lint's IAM policy schemas, the same that
  check cloudformation.yaml), with the right shape for an identity policy and a trust policy;
  cloudformation.yaml parses as plain YAML (long-form intrinsic functions) and carries the same
  documents; the README shows the node policy as the file has it;
- meaning: the node policy's Resource pattern, read with IAM's wildcard rules (`*` any run of
  characters including `/`, `?` one character), matches every pod role ARN of the bench and no
  role outside the path (nor the node role itself); the trust policy's principal is the bench's
  node role ARN;
- enforcement, as far as moto goes: moto 5.2 checks nothing by default (AssumeRole of a role that
  does not exist succeeds). With its authorization switched on (`/moto-api/reset-auth`), it
  evaluates the caller's identity policies (Action and Resource, `*` only) and the target role's
  trust policy, including `StringEquals` on `sts:ExternalId`. It does not model a role ARN as a
  principal matching that role's sessions (it compares the caller's assumed-role ARN as a string),
  so the trust documents are exercised there with their principal set to the node session's ARN;
  the principal itself is checked above. moto also lets an AssumeRole without ExternalId through a
  trust policy that requires one, and never evaluates sts:TagSession: neither is asserted here.
"""

import json
import os
import re
import subprocess

import botocore.exceptions
import pytest
import yaml

from conftest import STANDARD_ROLES
from harness import ACCOUNT, NODE_ROLE, REPO, role_arn
from harness.moto import BASE_ARN, IAM_DOCS, NODE_POLICY_NAME, NODE_ROLE_ARN, POD_ROLE_PATH, iam_document
from harness.util import tool

NODE_POLICY = "node-role-permissions.json"
TRUST = "pod-role-trust-policy.json"
TRUST_EXTERNAL_ID = "pod-role-trust-policy-external-id.json"
EXTERNAL_ID = "iamlink-e2e-external-id"
BENCH_POD_ROLES = sorted({e["role"] for e in STANDARD_ROLES})


def iam_wildcard_match(pattern, value):
    """IAM's ARN wildcards: `*` any run of characters (also none, also across `/` and `:`), `?`
    exactly one character, everything else literal and case-sensitive."""
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, value, flags=re.DOTALL) is not None


def doc(filename, **values):
    return json.loads(iam_document(filename, **values))


def raw(filename):
    with open(os.path.join(IAM_DOCS, filename)) as f:
        return json.load(f)


def as_list(v):
    return v if isinstance(v, list) else [v]


def node_policy_resources():
    return [r for s in doc(NODE_POLICY)["Statement"] if s["Effect"] == "Allow"
            for r in as_list(s["Resource"]) if "sts:AssumeRole" in as_list(s["Action"])]


# -- the wildcard matcher itself -------------------------------------------------------------
@pytest.mark.parametrize("pattern,value,expected", [
    ("arn:aws:iam::1:role/iamlink/*", "arn:aws:iam::1:role/iamlink/web", True),
    ("arn:aws:iam::1:role/iamlink/*", "arn:aws:iam::1:role/iamlink/team/web", True),
    ("arn:aws:iam::1:role/iamlink/*", "arn:aws:iam::1:role/web", False),
    ("arn:aws:iam::1:role/iamlink/*", "arn:aws:iam::1:role/iamlinkweb", False),
    ("arn:aws:iam::1:role/iamlink/*", "arn:aws:iam::2:role/iamlink/web", False),
    ("arn:aws:iam::1:role/iamlink/*", "arn:aws:iam::1:role/IAMLINK/web", False),
    ("arn:aws:iam::1:role/we?", "arn:aws:iam::1:role/web", True),
    ("arn:aws:iam::1:role/we?", "arn:aws:iam::1:role/we", False),
    ("arn:aws:iam::1:role/a.b", "arn:aws:iam::1:role/aXb", False),
    ("*", "anything", True),
])
def test_iam_wildcard_matcher_follows_iam_rules(pattern, value, expected):
    assert iam_wildcard_match(pattern, value) is expected


# -- the documents ----------------------------------------------------------------------------
@pytest.mark.parametrize("filename", [NODE_POLICY, TRUST, TRUST_EXTERNAL_ID])
def test_documents_are_version_2012_10_17_policies_with_only_known_placeholders(filename):
    with open(os.path.join(IAM_DOCS, filename)) as f:
        text = f.read()
    d = json.loads(text)
    assert d["Version"] == "2012-10-17"
    assert isinstance(d["Statement"], list) and d["Statement"]
    for s in d["Statement"]:
        assert s["Effect"] == "Allow", s
        assert set(as_list(s["Action"])) == {"sts:AssumeRole", "sts:TagSession"}, s
        assert re.fullmatch(r"[A-Za-z0-9]*", s.get("Sid", "")), s
    left = set(re.findall(r"\b[A-Z][A-Z_]{3,}[A-Z]\b", text))
    assert left <= {"ACCOUNT_ID", "NODE_ROLE_NAME", "EXTERNAL_ID"}, left


def test_node_policy_is_an_identity_policy_on_the_pod_role_path():
    for s in raw(NODE_POLICY)["Statement"]:
        assert "Principal" not in s and "NotPrincipal" not in s, s
        assert as_list(s["Resource"]) == ["arn:aws:iam::ACCOUNT_ID:role/iamlink/*"], s
    assert POD_ROLE_PATH == "/iamlink/" and BASE_ARN == f"arn:aws:iam::{ACCOUNT}:role/iamlink/"


@pytest.mark.parametrize("filename", [TRUST, TRUST_EXTERNAL_ID])
def test_trust_policies_trust_the_node_role_and_name_no_resource(filename):
    for s in doc(filename, EXTERNAL_ID=EXTERNAL_ID)["Statement"]:
        assert "Resource" not in s and "NotResource" not in s, s
        assert s["Principal"] == {"AWS": NODE_ROLE_ARN}, s


def test_external_id_variant_is_the_trust_policy_plus_an_external_id_condition():
    plain, ext = raw(TRUST), raw(TRUST_EXTERNAL_ID)
    assert len(plain["Statement"]) == len(ext["Statement"]) == 1
    condition = ext["Statement"][0].pop("Condition")
    assert condition == {"StringEquals": {"sts:ExternalId": "EXTERNAL_ID"}}
    for s in (plain["Statement"][0], ext["Statement"][0]):
        s.pop("Sid", None)
    assert plain == ext


def test_node_policy_matches_the_bench_pod_roles_and_nothing_outside_the_path():
    resources = node_policy_resources()
    assert resources
    allowed = lambda arn: any(iam_wildcard_match(p, arn) for p in resources)  # noqa: E731
    for name in BENCH_POD_ROLES + ["team-b/api-v2"]:
        assert allowed(role_arn(name)), role_arn(name)
    outside = [
        f"arn:aws:iam::{ACCOUNT}:role/web",  # the same name without the path
        f"arn:aws:iam::{ACCOUNT}:role/admin",
        f"arn:aws:iam::{ACCOUNT}:role/iamlinkweb",
        f"arn:aws:iam::{ACCOUNT}:role/other/iamlink/web",
        "arn:aws:iam::210987654321:role/iamlink/web",  # another account
        f"arn:aws:iam::{ACCOUNT}:user/iamlink/web",
        NODE_ROLE_ARN,  # the node role cannot assume itself through this policy
    ]
    for arn in outside:
        assert not allowed(arn), f"{arn} is inside {resources}"


def cfn_lint(path):
    p = subprocess.run([tool("cfn-lint"), "--format", "parseable", path], capture_output=True, text=True,
                       timeout=300)
    errors = [line for line in p.stdout.splitlines() if re.search(r":E\d{4}:", line)]
    assert p.returncode & 1 == 0 and not (p.returncode & 2) and not errors, f"cfn-lint {path}:\n{p.stdout}{p.stderr}"
    return p


def test_documents_pass_the_iam_policy_schemas(tmp_path):
    # cfn-lint validates IAM documents inside templates: identity policies (E3510) and trust
    # policies (E3530, no Resource allowed) have schemas of their own.
    template = {"AWSTemplateFormatVersion": "2010-09-09", "Resources": {
        "NodePolicy": {"Type": "AWS::IAM::ManagedPolicy", "Properties": {"PolicyDocument": doc(NODE_POLICY)}},
        "PodRole": {"Type": "AWS::IAM::Role", "Properties": {
            "Path": POD_ROLE_PATH, "AssumeRolePolicyDocument": doc(TRUST)}},
        "PodRoleWithExternalId": {"Type": "AWS::IAM::Role", "Properties": {
            "Path": POD_ROLE_PATH, "AssumeRolePolicyDocument": doc(TRUST_EXTERNAL_ID, EXTERNAL_ID=EXTERNAL_ID)}},
        "NodePodIdentityPolicy": {"Type": "AWS::IAM::ManagedPolicy", "Properties": {
            "PolicyDocument": doc("node-role-permissions-pod-identity.json", REGION="us-east-1",
                                  CLUSTER_NAME="e2e-cluster")}},
        "PodIdentityRole": {"Type": "AWS::IAM::Role", "Properties": {
            "Path": POD_ROLE_PATH, "AssumeRolePolicyDocument": doc("pod-identity-role-trust-policy.json")}},
    }}
    path = tmp_path / "documents.json"
    path.write_text(json.dumps(template, indent=2))
    cfn_lint(str(path))


def test_cloudformation_template_lints_and_carries_the_same_documents():
    path = os.path.join(IAM_DOCS, "cloudformation.yaml")
    cfn_lint(path)
    with open(path) as f:
        template = yaml.safe_load(f)  # long-form functions only: plain YAML parses it

    def resolve(v):
        if isinstance(v, dict) and list(v) == ["Fn::Sub"]:
            return (v["Fn::Sub"].replace("${AWS::Partition}", "aws").replace("${AWS::AccountId}", "ACCOUNT_ID")
                    .replace("${NodeRoleName}", "NODE_ROLE_NAME"))
        if isinstance(v, dict):
            return {k: resolve(x) for k, x in v.items()}
        if isinstance(v, list):
            return [resolve(x) for x in v]
        return v

    resources = resolve(template["Resources"])
    policies = [r for r in resources.values() if r["Type"] == "AWS::IAM::Policy"]
    roles = [r for r in resources.values() if r["Type"] == "AWS::IAM::Role"]
    assert len(policies) == 1 and len(roles) == 1, resources
    assert policies[0]["Properties"]["PolicyDocument"] == raw(NODE_POLICY)
    assert policies[0]["Properties"]["PolicyName"] == NODE_POLICY_NAME
    assert roles[0]["Properties"]["AssumeRolePolicyDocument"] == raw(TRUST)
    assert roles[0]["Properties"]["Path"] == POD_ROLE_PATH


def test_readme_shows_the_node_policy_as_the_file_has_it_and_links_the_documents():
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    blocks = [json.loads(b) for b in re.findall(r"```json\n(.*?)```", readme, flags=re.DOTALL)
              if '"sts:AssumeRole"' in b]
    assert raw(NODE_POLICY) in blocks, "README's AWS IAM setup must show deploy/iam/" + NODE_POLICY
    for name in (NODE_POLICY, TRUST, TRUST_EXTERNAL_ID, "cloudformation.yaml"):
        assert f"deploy/iam/{name}" in readme, name


# -- the bench's roles, made from the documents, in moto ---------------------------------------
@pytest.fixture(scope="module")
def bench(make_module_bench):
    return make_module_bench(with_daemon=False)


def test_bench_pod_roles_are_made_from_the_documents(bench):
    iam = bench.moto.client("iam")
    for name in BENCH_POD_ROLES:
        role = bench.node.call(lambda: iam.get_role(RoleName=name)["Role"])
        assert role["Path"] == POD_ROLE_PATH and role["Arn"] == role_arn(name), role
        assert role["AssumeRolePolicyDocument"] == doc(TRUST), role["AssumeRolePolicyDocument"]
        principal = role["AssumeRolePolicyDocument"]["Statement"][0]["Principal"]["AWS"]
        assert principal == bench.upstream.node_role_arn
        assert any(iam_wildcard_match(p, role["Arn"]) for p in node_policy_resources()), role["Arn"]


def test_bench_node_role_carries_the_node_policy(bench):
    iam = bench.moto.client("iam")
    assert bench.upstream.node_role_arn == NODE_ROLE_ARN == f"arn:aws:iam::{ACCOUNT}:role/{NODE_ROLE}"
    policy = bench.node.call(lambda: iam.get_role_policy(RoleName=NODE_ROLE, PolicyName=NODE_POLICY_NAME))
    assert policy["PolicyDocument"] == doc(NODE_POLICY)


def access_denied(call):
    try:
        call()
    except botocore.exceptions.ClientError as e:
        return e.response["Error"]["Code"] in ("AccessDenied", "AccessDeniedException")
    return False


def test_moto_enforces_the_node_policy_path_and_the_external_id(bench):
    moto, node_creds = bench.moto, bench.upstream.creds
    # Without authorization (how the bench runs), a role from the external-id document is assumed
    # with its external ID like any other.
    moto.create_role("ext-doc", trust=iam_document(TRUST_EXTERNAL_ID, EXTERNAL_ID=EXTERNAL_ID))
    assert moto.caller_arn(moto.assume_role("ext-doc", creds=node_creds, ExternalId=EXTERNAL_ID)).startswith(
        f"arn:aws:sts::{ACCOUNT}:assumed-role/ext-doc/")

    # moto matches trust principals against the caller's session ARN as a string (see the
    # module docstring): the documents' principal, set to the node session's ARN.
    session_arn = moto.caller_arn(node_creds)
    assert session_arn.startswith(f"arn:aws:sts::{ACCOUNT}:assumed-role/{NODE_ROLE}/"), session_arn

    def for_moto(filename):
        d = doc(filename, EXTERNAL_ID=EXTERNAL_ID)
        for s in d["Statement"]:
            s["Principal"] = {"AWS": session_arn}
        return json.dumps(d)

    inside = moto.create_role("inside", trust=for_moto(TRUST))
    outside = moto.create_role("outside", trust=for_moto(TRUST), path="/")
    ext = moto.create_role("ext", trust=for_moto(TRUST_EXTERNAL_ID))
    assert inside == role_arn("inside") and ext == role_arn("ext")
    assert outside == f"arn:aws:iam::{ACCOUNT}:role/outside"

    bench.moto.set_auth("0")  # every request from now on is authorized against IAM
    try:
        assume = lambda role, **kw: moto.assume_role(role, session="iamlinkd", creds=node_creds, **kw)  # noqa: E731
        assert moto.caller_arn(assume("inside"))
        assert access_denied(lambda: assume("outside")), "the node policy let the node role out of /iamlink/"
        assert moto.caller_arn(assume("ext", ExternalId=EXTERNAL_ID))
        assert access_denied(lambda: assume("ext", ExternalId="someone-else")), "a wrong external ID was accepted"
    finally:
        bench.moto.set_auth("inf")

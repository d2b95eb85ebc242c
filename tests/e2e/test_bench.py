"""The bench itself: what the other suites rely on, checked without iamlink in the chain.

Real parts: network namespaces, ptp + host-local through libcni (`cnirt`), moto_server, the AWS
CLI. Nothing of iamlink runs here: if these fail, the other suites' failures say nothing about
iamlink.
"""

import json
import os
import subprocess

import pytest

from harness import NODE_ROLE, Bench, Node, is_assumed_role, missing_binaries
from harness.util import tool


def root_state():
    def out(*argv):
        return subprocess.run(argv, capture_output=True, text=True).stdout

    return out("ip", "-o", "link"), out("ip", "route"), out("nft", "list", "ruleset"), out("ip", "rule")


@pytest.fixture
def plain_bench():
    missing = missing_binaries(plugin=False, daemon=False)
    if missing:
        pytest.fail(f"not built: {missing} (run scripts/setup)", pytrace=False)
    with Bench(pod_roles=[{"namespace": "team-a", "name": "web", "role": "web"}], with_daemon=False,
               pods_options={"with_iamlink": False}) as b:
        yield b


def test_node_has_the_bench_addresses_and_leaves_nothing_behind():
    before = root_state()
    with Node() as node:
        addrs = node.exec(["ip", "-o", "addr", "show", "dev", "lo"]).stdout
        for a in ("198.18.0.1/32", "198.18.0.2/32"):
            assert a in addrs
        pod_ns = node.new_netns()
        proc = node.spawn(["sleep", "60"], netns=pod_ns)
        name = node.name
    assert proc.poll() is not None
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert name not in listed and pod_ns not in listed
    assert root_state() == before


def test_fake_upstream_serves_the_node_role_with_real_moto_credentials(plain_bench):
    b = plain_bench
    assert is_assumed_role(b.moto.caller_arn(b.upstream.creds), NODE_ROLE)
    assert b.upstream.node_role_arn.endswith(f":role/{NODE_ROLE}")


def test_ptp_pod_reaches_moto_but_has_no_metadata_route_without_iamlink(plain_bench):
    b = plain_bench
    before = root_state()
    pod = b.pods.add("team-a", "web")
    assert pod.ip.startswith("198.18.64.")
    creds = b.moto.assume_role("web")
    p = pod.aws("sts", "get-caller-identity", "--endpoint-url", "http://198.18.0.2:5000", "--query", "Arn",
                "--output", "text")
    assert p.returncode != 0 and "Unable to locate credentials" in p.stderr, p
    p = pod.exec([tool("aws"), "sts", "get-caller-identity", "--endpoint-url", "http://198.18.0.2:5000",
                  "--query", "Arn", "--output", "text"],
                 env={"AWS_ACCESS_KEY_ID": creds["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": creds["SecretAccessKey"],
                      "AWS_SESSION_TOKEN": creds["Token"]})
    assert p.returncode == 0 and is_assumed_role(p.stdout, "web"), p
    r = pod.imds("creds", "--timeout", "2")
    assert not r["ok"] and r.get("error") == "oserror-101", r  # ENETUNREACH: no route to 169.254.169.254
    b.pods.delete(pod)
    assert root_state() == before


def test_pod_environment_carries_no_aws_credentials(plain_bench):
    pod = plain_bench.pods.add("team-a", "web")
    env = dict(line.split("=", 1) for line in pod.exec(["env"]).stdout.splitlines() if "=" in line)
    assert env["AWS_DEFAULT_REGION"] == "us-east-1"
    for k in ("AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        assert not os.path.exists(env[k])
    assert not [k for k in env if k.startswith("AWS_") and k not in
                ("AWS_DEFAULT_REGION", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")], json.dumps(env)

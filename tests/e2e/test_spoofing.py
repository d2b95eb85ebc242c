"""Pods cannot borrow another identity by address tricks, and the node is nobody.

Real parts: namespaces and veths, ptp + host-local + the built iamlink plugin through libcni
(`cnirt`), the nftables interception and packet marks, the built iamlinkd; the spoofing pod uses
`ip addr add` on its own eth0 and binds its client to the borrowed address, as a root process in a
pod could. Emulated: STS by moto; the node's metadata service by the fake upstream.
"""

import json

import pytest

from conftest import add_standard_pods
from harness import PYTHON, NODE_ROLE, is_assumed_role
from harness.util import IMDS_CLIENT

CREDS = "/latest/meta-data/iam/security-credentials/"
ALL_ROLES = ["web", "batch", "api", NODE_ROLE]


@pytest.fixture(scope="module")
def bench(make_module_bench):
    b = make_module_bench()
    b.by_key = add_standard_pods(b)
    return b


def assert_own_role_or_nothing(bench, pod, answer, what):
    """`answer` (imds_client creds output) is the pod's own role, or no credentials at all."""
    text = json.dumps(answer)
    assert not bench.upstream.leaked(text), f"{what}: node role leaked to {pod}: {answer}"
    if answer.get("ok"):
        assert answer["role"] == pod.role, f"{what}: {pod} got role {answer['role']!r}"
        arn = bench.moto.caller_arn(answer["creds"])
        assert is_assumed_role(arn, pod.role), f"{what}: {pod} got credentials of {arn}"


@pytest.mark.parametrize("spoofer,victim", [("team-a/web", "team-a/batch"), ("team-c/norole", "team-b/api")])
def test_pod_using_another_pods_address_cannot_complete_a_handshake(bench, spoofer, victim):
    """The spoofer's SYN carries the victim's source address, so the node sends the SYN-ACK to
    the victim (its route for that address), never to the spoofer: no connection, no answer."""
    pod, other = bench.by_key[spoofer], bench.by_key[victim]
    add = pod.exec(["ip", "addr", "add", f"{other.ip}/32", "dev", "eth0"])
    assert add.returncode == 0, add.stderr
    try:
        attempts = {f"creds {mode}": pod.imds("creds", "--source", other.ip, "--timeout", "2", *mode)
                    for mode in ([], ["--v1"])}
        for role in ALL_ROLES:
            attempts[f"GET {role}"] = pod.imds("request", "GET", CREDS + role, "--source", other.ip, "--timeout", "2")
    finally:
        pod.exec(["ip", "addr", "del", f"{other.ip}/32", "dev", "eth0"])
    for what, answer in attempts.items():
        assert not bench.upstream.leaked(json.dumps(answer)), f"{what}: node role leaked to {pod}: {answer}"
        assert answer.get("error") == "connect-timeout" and answer.get("status") is None, (
            f"{what} from {pod} with source {other.ip}: the handshake completed: {answer}")
    # The victim is unaffected.
    if other.role:
        mine = other.imds("creds")
        assert mine["ok"] and mine["role"] == other.role, mine


@pytest.mark.parametrize("key", ["team-a/web", "team-c/norole"])
def test_forwarded_for_headers_do_not_change_who_asks(bench, key):
    pod, other = bench.by_key[key], bench.by_key["team-b/api"]
    for header in (f"X-Forwarded-For: {other.ip}", f"X-Real-IP: {other.ip}", f"Forwarded: for={other.ip}"):
        r = pod.imds("request", "GET", CREDS, "-H", header)
        if pod.role:
            assert r.get("status") == 200 and r["body"].strip() == pod.role, (header, r)
        else:
            assert r.get("status") == 404, (header, r)
        r = pod.imds("request", "GET", CREDS + "api", "-H", header)
        assert r.get("status") == 404, (header, r)


@pytest.mark.parametrize("key", ["team-a/web", "team-c/norole"])
def test_pod_connecting_to_the_daemon_directly_gets_its_own_role_or_nothing(bench, key):
    pod = bench.by_key[key]
    answer = pod.imds("creds", "--host", "198.18.0.1", "--port", "8181", "--timeout", "2")
    assert_own_role_or_nothing(bench, pod, answer, "direct to 198.18.0.1:8181")
    v1 = pod.imds("creds", "--v1", "--host", "198.18.0.1", "--port", "8181", "--timeout", "2")
    assert_own_role_or_nothing(bench, pod, v1, "direct to 198.18.0.1:8181 (IMDSv1)")
    for role in ALL_ROLES:
        r = pod.imds("request", "GET", CREDS + role, "--host", "198.18.0.1", "--port", "8181", "--timeout", "2")
        if r.get("status") == 200:
            assert role == pod.role and not bench.upstream.leaked(r["body"]), r


def test_process_in_the_node_connecting_to_the_daemon_gets_404(bench):
    def ask(*args):
        p = bench.node.exec([PYTHON, IMDS_CLIENT, *args, "--host", "198.18.0.1", "--port", "8181"], check=True)
        return json.loads(p.stdout)

    assert ask("request", "GET", CREDS).get("status") == 404
    for role in ALL_ROLES:
        r = ask("request", "GET", CREDS + role)
        assert r.get("status") == 404, (role, r)
    t = ask("request", "PUT", "/latest/api/token", "-H", "X-aws-ec2-metadata-token-ttl-seconds: 60")
    if t.get("status") == 200:
        r = ask("request", "GET", CREDS, "-H", f"X-aws-ec2-metadata-token: {t['body']}")
        assert r.get("status") in (401, 404), r

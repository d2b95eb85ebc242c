"""Pods cannot borrow another identity by address tricks, and the node is nobody.

Real parts: namespaces and veths, ptp + host-local + the built iamlink plugin through libcni
(`cnirt`), the nftables interception and packet marks, the built iamlinkd; the spoofing pod uses
`ip addr add` on its own eth0 and binds its client to the borrowed address, as a root process in a
pod could; another agent's packet marks are an nftables table of its own in the node namespace.
Emulated: STS by moto; the node's metadata service by the fake upstream.
"""

import concurrent.futures
import json
import os

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
    calls = {f"creds {mode}": ("creds", "--source", other.ip, "--timeout", "2", *mode) for mode in ([], ["--v1"])}
    for role in ALL_ROLES:
        calls[f"GET {role}"] = ("request", "GET", CREDS + role, "--source", other.ip, "--timeout", "2")
    try:
        # Each attempt waits out its 2 s connect timeout: all at once, not one after the other.
        with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
            futures = {what: pool.submit(pod.imds, *args) for what, args in calls.items()}
            attempts = {what: f.result() for what, f in futures.items()}
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


@pytest.fixture
def another_component_marks_traffic_to_the_daemon(bench):
    """A packet filter of another agent on the node (its own table, as Calico, Cilium or
    kube-proxy keep theirs) that marks pod traffic to the daemon's address and port, and the
    node's own traffic to it, with bits inside iamlink's mask: exactly the mark of the slot that
    team-a/batch holds. Such a mark must never be read as batch's identity."""
    victim = bench.by_key["team-a/batch"]
    with open(os.path.join(bench.store_dir, "records", f"{victim.cid}.eth0.json")) as f:
        slot = json.load(f)["slot"]
    assert 0 < slot < 0x80, slot  # the default mask 0x307f keeps slots below 128 in its low bits
    rules = f"""
table inet other-agent {{
  chain pre {{
    type filter hook prerouting priority mangle + 5; policy accept;
    ip daddr 198.18.0.1 tcp dport 8181 meta mark set meta mark or {slot:#x}
  }}
  chain out {{
    type route hook output priority mangle + 5; policy accept;
    ip daddr 198.18.0.1 tcp dport 8181 meta mark set meta mark or {slot:#x}
  }}
}}
"""
    bench.node.exec(["nft", "-f", "-"], input=rules)
    try:
        yield victim
    finally:
        bench.node.exec(["nft", "delete", "table", "inet", "other-agent"])


DIRECT = ("--host", "198.18.0.1", "--port", "8181", "--timeout", "2")


@pytest.mark.parametrize("key", ["team-a/web", "team-c/norole"])
def test_pod_connecting_to_the_daemon_directly_gets_404_even_with_another_agents_mark(
        bench, key, another_component_marks_traffic_to_the_daemon):
    pod = bench.by_key[key]
    for headers in ([], ["-H", "X-aws-ec2-metadata-token: x"]):
        r = pod.imds("request", "GET", CREDS, *headers, *DIRECT)
        assert r.get("status") == 404 and "no pod identity" in r.get("body", ""), r
    t = pod.imds("request", "PUT", "/latest/api/token", "-H", "X-aws-ec2-metadata-token-ttl-seconds: 60", *DIRECT)
    assert t.get("status") == 404, t
    for path in [CREDS + role for role in ALL_ROLES] + ["/latest/meta-data/iam/info", "/v1/credentials"]:
        r = pod.imds("request", "GET", path, "-H", "Authorization: x", *DIRECT)
        assert r.get("status") == 404 and not bench.upstream.leaked(r.get("body", "")), (path, r)
    # Through the metadata address the same pod is still itself.
    answer = pod.imds("creds", "--timeout", "2")
    assert_own_role_or_nothing(bench, pod, answer, "through 169.254.169.254")
    assert answer.get("ok") == bool(pod.role), answer


def test_process_in_the_node_connecting_to_the_daemon_gets_404(bench, another_component_marks_traffic_to_the_daemon):
    def ask(*args):
        p = bench.node.exec([PYTHON, IMDS_CLIENT, *args, "--host", "198.18.0.1", "--port", "8181"], check=True)
        return json.loads(p.stdout)

    assert ask("request", "GET", CREDS).get("status") == 404
    for role in ALL_ROLES:
        r = ask("request", "GET", CREDS + role)
        assert r.get("status") == 404, (role, r)
    t = ask("request", "PUT", "/latest/api/token", "-H", "X-aws-ec2-metadata-token-ttl-seconds: 60")
    assert t.get("status") == 404, t
    r = ask("request", "GET", "/v1/credentials", "-H", "Authorization: x")
    assert r.get("status") == 404 and not bench.upstream.leaked(r.get("body", "")), r

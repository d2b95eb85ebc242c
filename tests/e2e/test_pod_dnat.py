"""Pod-side DNAT: at ADD the plugin rewrites the metadata and credentials addresses inside the
pod's namespace to iamlinkd's pod ports on the node's address, so that the pod's metadata traffic
is addressed to the node itself: eBPF dataplanes deliver such traffic through the node's stack
with the pod's interface as ingress, while they forward off-node traffic past the node's
netfilter hooks. The node's `identify` rule marks the pod ports by ingress interface as it marks
the metadata addresses, so the answer is still the pod's own role or nothing.

Real parts: namespaces and veths, ptp + host-local + the built iamlink plugin through libcni
(`cnirt`), nftables and conntrack in the pod and node namespaces, a tcx program attached to the
pod's host interface (`tests/bpf/cilium_skip_fib.c`, built with clang at the test's start), the
built iamlinkd, the AWS CLI and a stdlib client in the pods. Emulated: STS by moto; the node's
metadata service by the fake upstream (node role), in a namespace of its own behind `imds0`;
Cilium's BPF host routing with one native device by the stand-in program: a `bpf_redirect_neigh`
of every packet not addressed to the node to `imds0`, with no FIB lookup of its own.
"""

import json
import os
import shutil

import pytest

from harness import PYTHON, role_of_arn, tcx, wait_until
from harness.imds_client import CREDS_PATH

from conftest import record_of
from test_fail_closed import add_pods
from test_ipv6 import DAEMON6, dual_stack_bench

DAEMON, DAEMON_PORT = "198.18.0.1", 8181
# iamlinkd's pod ports: its port + 1 (metadata) and + 2 (credentials), on the same address.
METADATA_PORT, CREDENTIALS_PORT = DAEMON_PORT + 1, DAEMON_PORT + 2
ASKS = 10
TWO_PODS = (("team-a", "web", "web"), ("team-b", "api", "api"))


@pytest.fixture(scope="module")
def skip_fib(tmp_path_factory):
    """Returns a function that attaches the Cilium one-device stand-in (tests/harness/tcx.py,
    compiled for the node's uplink `imds0`; the bench's node addresses 198.18.0.0/24 are what
    "addressed to the node" means) by tcx at the tail of a host interface, as a dataplane does."""
    if not shutil.which("clang"):
        pytest.fail("clang is needed for the tcx stand-in (scripts/setup installs it)", pytrace=False)
    out = str(tmp_path_factory.mktemp("podnat-bpf"))
    objects = {}

    def attach(bench, ifname):
        uplink = int(bench.node.exec(["cat", "/sys/class/net/imds0/ifindex"]).stdout)
        if uplink not in objects:
            objects[uplink] = tcx.build(tcx.CILIUM_SKIP_FIB, out, NATIVE_IFINDEX=uplink, NODE_NET="0xc6120000",
                                        NODE_PREFIX=24)
        bench.node.exec([PYTHON, tcx.__file__, "attach", objects[uplink], ifname, "tail"])

    return attach


def roles_answered(pod, asks=ASKS, host="169.254.169.254"):
    """What `asks` SDK-style credential fetches (one new connection each) were answered with:
    the listed role, or the error."""
    seen = []
    for _ in range(asks):
        r = pod.imds("creds", "--host", host, "--timeout", "2")
        seen.append(r["role"] if r.get("ok") else f"error: {r.get('error') or r.get('status')}")
    return seen


def pod_nft(pod, *args, check=True):
    p = pod.exec(["nft", *args])
    if check:
        assert p.returncode == 0, f"nft {args} in {pod}: {p.stderr}"
    return p


def pod_table(pod):
    """The pod namespace's `table inet iamlink` rules as `nft -j` prints them; None when missing."""
    p = pod_nft(pod, "-j", "list", "table", "inet", "iamlink", check=False)
    if p.returncode != 0:
        return None
    return [i["rule"]["expr"] for i in json.loads(p.stdout)["nftables"] if "rule" in i]


def request(pod, path, host, port=80, headers=()):
    argv = ["request", "GET", path, "--host", host, "--port", port, "--timeout", "2"]
    for h in headers:
        argv += ["-H", h]
    return pod.imds(*argv)


def test_a_pod_gets_its_own_role_when_its_dataplane_forwards_metadata_traffic_past_the_node_firewall(
        make_bench, skip_fib):
    bench = make_bench()
    pods = add_pods(bench, TWO_PODS)
    for pod in pods:
        skip_fib(bench, pod.host_ifname)
    for pod in pods:
        answered = roles_answered(pod)
        assert answered == [pod.role] * ASKS, f"{pod} under a skip-FIB dataplane: {answered}"
        code, arn, err = pod.caller_arn()
        assert code == 0 and role_of_arn(arn) == pod.role, f"AWS CLI in {pod}: {arn} {err}"
    # The credentials address keeps its own meaning: /v1/credentials only, never the IMDS paths.
    web = pods[0]
    creds = request(web, "/v1/credentials", "169.254.170.23", headers=["Authorization: token"])
    assert creds.get("status") == 200 and json.loads(creds["body"]).get("AccessKeyId"), creds
    imds_there = request(web, CREDS_PATH, "169.254.170.23")
    assert imds_there.get("status") == 404, f"the metadata API answered on the credentials address: {imds_there}"
    assert not bench.upstream.unexpected_credential_requests(), "the node's metadata service was asked"


def test_the_pod_side_dnat_is_written_once_recorded_and_checked(make_bench):
    bench = make_bench()
    (web,) = add_pods(bench, [("team-a", "web", "web")])
    assert record_of(bench, web).get("podDnat") is True, record_of(bench, web)
    rules = pod_table(web)
    text = json.dumps(rules)
    assert rules and f'"{DAEMON}"' in text and f"{METADATA_PORT}" in text and f"{CREDENTIALS_PORT}" in text, rules
    again = bench.pods.add_iamlink_again(web)
    assert again.returncode == 0, again.stdout + again.stderr
    assert pod_table(web) == rules, "a repeated ADD changed the pod's DNAT"
    check = bench.pods.add_iamlink_again(web, command="CHECK")
    assert check.returncode == 0, check.stdout + check.stderr
    # The same number of rules, one of them pointing elsewhere: CHECK names it.
    pod_nft(web, "flush", "chain", "inet", "iamlink", "metadata")
    for addr, port in (("169.254.169.254", DAEMON_PORT), ("169.254.170.23", CREDENTIALS_PORT)):
        pod_nft(web, "add", "rule", "inet", "iamlink", "metadata", "ip", "daddr", addr, "tcp", "dport", "80",
                "dnat", "ip", "to", f"{DAEMON}:{port}")
    for addr in ("fd00:ec2::254", "fd00:ec2::23"):
        pod_nft(web, "add", "rule", "inet", "iamlink", "metadata", "ip6", "daddr", addr, "tcp", "dport", "80", "drop")
    check = bench.pods.add_iamlink_again(web, command="CHECK")
    assert check.returncode != 0 and "DNAT altered" in check.stdout + check.stderr, check.stdout + check.stderr
    assert bench.pods.add_iamlink_again(web).returncode == 0
    assert pod_table(web) == rules, "a repeated ADD did not restore the pod's DNAT"
    pod_nft(web, "delete", "table", "inet", "iamlink")
    check = bench.pods.add_iamlink_again(web, command="CHECK")
    assert check.returncode != 0 and "DNAT" in check.stdout + check.stderr, check.stdout + check.stderr


def test_a_pod_that_removes_or_rewrites_its_own_dnat_gets_its_own_role_or_nothing(make_bench):
    bench = make_bench()
    web, api = add_pods(bench, TWO_PODS)
    # Flushed, then removed: the pod's packets are addressed to the metadata address again, and
    # the tcx guard on its host interface drops them: nothing (never api's role, never the node's:
    # the conftest's upstream check).
    pod_nft(web, "flush", "table", "inet", "iamlink")
    assert all(a.startswith("error") for a in roles_answered(web, asks=2)), "answered past the guard"
    pod_nft(web, "delete", "table", "inet", "iamlink")
    assert all(a.startswith("error") for a in roles_answered(web, asks=2)), "answered past the guard"
    # Rewritten to iamlinkd's own port: not through the node's rule, nobody.
    pod_nft(web, "add", "table", "ip", "evil")
    pod_nft(web, "add", "chain", "ip", "evil", "out", "{ type nat hook output priority -100; }")
    pod_nft(web, "add", "rule", "ip", "evil", "out", "ip", "daddr", "169.254.169.254", "tcp", "dport", "80",
            "dnat", "to", f"{DAEMON}:{DAEMON_PORT}")
    direct = request(web, CREDS_PATH, "169.254.169.254")
    assert direct.get("status") == 404, f"a pod reached iamlinkd's port past the rule: {direct}"
    # Rewritten to the credentials port: served as the credentials address, its own role only.
    pod_nft(web, "flush", "chain", "ip", "evil", "out")
    pod_nft(web, "add", "rule", "ip", "evil", "out", "ip", "daddr", "169.254.169.254", "tcp", "dport", "80",
            "dnat", "to", f"{DAEMON}:{CREDENTIALS_PORT}")
    assert request(web, CREDS_PATH, "169.254.169.254").get("status") == 404
    creds = request(web, "/v1/credentials", "169.254.169.254", headers=["Authorization: token"])
    assert creds.get("status") == 200, creds
    api_key = json.loads(request(api, "/v1/credentials", "169.254.170.23",
                                 headers=["Authorization: token"])["body"])["AccessKeyId"]
    assert json.loads(creds["body"])["AccessKeyId"] != api_key, "web was answered with api's credentials"
    # Straight to the pod ports from the pod, no DNAT at all: its own interface, its own role.
    pod_nft(web, "delete", "table", "ip", "evil")
    r = web.imds("creds", "--host", DAEMON, "--port", METADATA_PORT, "--timeout", "2")
    assert r.get("ok") and r["role"] == "web", r
    assert roles_answered(api, asks=3) == ["api"] * 3


# A process in the node's namespace (hostNetwork) that sets a pod's slot bits on its socket.
MARKED_CLIENT = """
import http.client, json, socket, sys
mark, port = int(sys.argv[1]), int(sys.argv[2])
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
s.settimeout(2)
try:
    s.connect(("198.18.0.1", port))
except OSError as e:
    print(json.dumps({"error": type(e).__name__})); sys.exit(0)
c = http.client.HTTPConnection("198.18.0.1", port, timeout=2)
c.sock = s
c.request("GET", sys.argv[3], headers={"Authorization": "token"})
r = c.getresponse()
print(json.dumps({"status": r.status, "body": r.read().decode()}))
"""


def test_a_node_process_that_sets_a_pods_mark_on_the_pod_ports_is_nobody(make_bench):
    bench = make_bench()
    (web,) = add_pods(bench, [("team-a", "web", "web")])
    slot = record_of(bench, web)["slot"]
    assert slot < 0x80, "the mark below assumes the default mask's low bits"
    answers = {}
    for port, path in ((METADATA_PORT, CREDS_PATH + "web"), (CREDENTIALS_PORT, "/v1/credentials"),
                       (DAEMON_PORT, CREDS_PATH + "web")):
        out = bench.node.exec([PYTHON, "-c", MARKED_CLIENT, str(slot), str(port), path]).stdout
        answers[port] = json.loads(out)
    for port, a in answers.items():
        assert a.get("status") in (None, 404), f"a node process with web's mark on port {port}: {a}"
    assert roles_answered(web, asks=2) == ["web"] * 2


def test_a_pod_recorded_without_pod_side_dnat_keeps_its_role_over_both_families(make_bench):
    """An older plugin's record (no `podDnat`, no table in the pod) beside a new pod, across a
    restart of iamlinkd: both get their own role over IPv4 and IPv6; the new pod's IPv6
    connections reach the node addressed to iamlinkd's pod port."""
    bench = dual_stack_bench(make_bench, listen6=True)
    bench.pods.set_netconf(ebpfGuard=False)  # an older plugin put no guard on its pods
    (old,) = add_pods(bench, TWO_PODS[:1])
    bench.pods.set_netconf(ebpfGuard=True)
    (new,) = add_pods(bench, TWO_PODS[1:])
    # What a pod made by an older plugin looks like: no table in its namespace, no flag.
    pod_nft(old, "delete", "table", "inet", "iamlink")
    path = os.path.join(bench.store_dir, "records", f"{old.cid}.eth0.json")
    with open(path) as f:
        record = json.load(f)
    record.pop("podDnat", None)
    with open(path, "w") as f:
        json.dump(record, f)
    bench.daemon.restart()
    for pod in (old, new):
        wait_until(lambda: not bench.node.exec(["ip", "-6", "addr", "show", "dev", pod.host_ifname,
                                                "tentative"]).stdout, 10, f"DAD of {pod}'s gateway")
    for pod in (old, new):
        assert roles_answered(pod, asks=2) == [pod.role] * 2, pod
        assert roles_answered(pod, asks=2, host="fd00:ec2::254") == [pod.role] * 2, f"{pod} over IPv6"
    tracked = bench.node.exec(["conntrack", "-L", "-f", "ipv6", "-p", "tcp", "--orig-dst", DAEMON6,
                               "--orig-port-dst", str(METADATA_PORT)], check=False).stdout
    new6 = next(i["address"].split("/")[0] for i in new.result["ips"] if ":" in i["address"])
    assert new6 in tracked, f"no IPv6 connection of {new} to the pod port: {tracked}"
    assert "podDnat" not in record_of(bench, old)

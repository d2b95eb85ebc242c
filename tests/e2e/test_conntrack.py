"""A connection a pod opened to the real metadata service before the interception existed is cut
when iamlinkd installs the rule set: its conntrack entry is dropped, so its next packet meets the
rule set instead of riding the old, un-NATed entry (aad-pod-identity's lesson).

Real parts: namespaces and veths, ptp + host-local + the built iamlink plugin through libcni
(`cnirt`), the kernel's conntrack and NAT, the built iamlinkd, a stdlib HTTP client in the pod.
Emulated: the node's metadata service (the fake upstream on 169.254.169.254, behind the node). To
reproduce a pod that was running before iamlink came to the node, the test deletes the
interception table and iamlink's routing-policy rules by hand before the pod connects. A real node always tracks connections
(kube-proxy, Calico and aws-vpc-cni all match on conntrack state), while a fresh namespace only
starts tracking once a rule needs it: the test adds such a rule, as kube-proxy would.
"""

import subprocess

from harness.pods import PYTHON

# Opens one keep-alive connection, asks once, waits for a line on stdin, asks again on the
# same connection.
CLIENT = r"""
import http.client, sys
c = http.client.HTTPConnection("169.254.169.254", 80, timeout=5)
c.request("GET", "/latest/meta-data/placement/region")
r = c.getresponse()
print("first", r.status, r.read().decode().strip(), flush=True)
sys.stdin.readline()
try:
    c.request("GET", "/latest/meta-data/placement/availability-zone")
    r = c.getresponse()
    print("second", r.status, r.read().decode().strip(), flush=True)
except Exception as e:
    print("second error", type(e).__name__, flush=True)
"""


def test_connection_opened_before_interception_cannot_keep_reaching_the_upstream(make_bench):
    bench = make_bench(start_daemon=False)
    # A pod without the tcx guard (made by an older plugin, or on a kernel without tcx): the
    # guard would drop its metadata packets before the node's layers under test here.
    bench.pods.set_netconf(ebpfGuard=False)
    pod = bench.pods.add("team-a", "web")
    # The node's layers are under test: the pod's own DNAT (a layer of its own) goes first.
    assert pod.exec(["nft", "delete", "table", "inet", "iamlink"]).returncode == 0
    bench.node.exec(["nft", "delete", "table", "inet", "iamlink"])
    bench.node.delete_ip_rules((60, 61, 62))  # iamlink's second layer, which the plugin added too
    bench.node.exec(["nft", "-f", "-"], input="table inet node-firewall {\n"
                    " chain forward { type filter hook forward priority 0; ct state established,related accept; }\n}\n")

    client = bench.node.spawn([PYTHON, "-c", CLIENT], netns=pod.netns, env=pod.env(),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = client.stdout.readline().decode().strip()
    assert first.startswith("first 200"), f"the pod reaches the upstream while nothing intercepts: {first!r}"

    bench.daemon.start()
    out, err = client.communicate(input=b"\n", timeout=20)
    second = out.decode().strip()
    assert second.startswith("second error"), f"old connection still answered after interception: {second!r} {err!r}"
    paths = [r["path"] for r in bench.upstream.requests()]
    assert "/latest/meta-data/placement/region" in paths
    assert "/latest/meta-data/placement/availability-zone" not in paths, paths

    # And the pod's new connections are iamlinkd's.
    r = pod.imds("creds")
    assert r["ok"] and r["role"] == "web", r

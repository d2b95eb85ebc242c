"""IPv6 pods: their metadata traffic to fd00:ec2::254 is intercepted like IPv4's and answered by
the interface it came in on; with no IPv6 listen address configured it is dropped, never let
through to the node's metadata service.

Real parts: dual-stack ptp + host-local + the built iamlink plugin through libcni (`cnirt`),
the kernel's IPv6 NAT and `tcp_fwmark_accept`, the built iamlinkd, a stdlib HTTP client in the
pod. Emulated: STS by moto; the node's IPv6 metadata service by a one-line HTTP server on
fd00:ec2::254 in the node that answers every path with the node role's name, so a leak shows.
ULA addresses (fd00:198:18::/48) stand in for a cluster's IPv6 ranges.
"""

import pytest

from harness import wait_until
from harness.pods import PYTHON

SUBNET6 = "fd00:198:18:64::/64"
DAEMON6 = "fd00:198:18::1"
NODE_ROLE = "iamlink-node-role"
# Answers every GET with the node role's name: what a leak would look like.
UPSTREAM6 = ("import http.server as h\n"
             "class H(h.BaseHTTPRequestHandler):\n"
             "  def do_GET(s): s.send_response(200); s.end_headers(); s.wfile.write(b'" + NODE_ROLE + "')\n"
             "  do_PUT = do_GET\n"
             "class S(h.HTTPServer): address_family = __import__('socket').AF_INET6\n"
             "S(('fd00:ec2::254', 80), H).serve_forever()\n")


def dual_stack_bench(make_bench, listen6):
    netconf = {"daemonAddress6": f"[{DAEMON6}]:8181"} if listen6 else {}
    settings = {"listen6": f"[{DAEMON6}]:8181"} if listen6 else None
    bench = make_bench(start_daemon=False, daemon_settings=settings,
                       pods_options={"subnet6": SUBNET6, "netconf": netconf})
    for addr in (DAEMON6, "fd00:ec2::254"):
        bench.node.exec(["ip", "-6", "addr", "add", f"{addr}/128", "dev", "lo", "nodad"])
    bench.node.spawn([PYTHON, "-c", UPSTREAM6])
    wait_until(lambda: bench.node.can_connect("fd00:ec2::254", 80), 10, "fake IPv6 upstream")
    bench.daemon.start()
    return bench


@pytest.mark.parametrize("listen6", [True, False], ids=["listen6", "no-listen6"])
def test_ipv6_pods_get_their_own_role_or_nothing_never_the_nodes(make_bench, listen6):
    bench = dual_stack_bench(make_bench, listen6)
    web = bench.pods.add("team-a", "web")
    api = bench.pods.add("team-b", "api")
    for pod in (web, api):
        # The gateway address on the host veth is usable once its duplicate address detection
        # is over (ptp's business, not iamlink's); until then the pod's IPv6 packets wait.
        wait_until(lambda: not bench.node.exec(["ip", "-6", "addr", "show", "dev", pod.host_ifname, "tentative"]).stdout,
                   10, f"duplicate address detection of {pod}'s gateway address")
    route = web.exec(["ip", "-6", "route", "get", "fd00:ec2::254"])
    assert route.returncode == 0 and "eth0" in route.stdout, route.stdout + route.stderr

    for pod, role in ((web, "web"), (api, "api")):
        r = pod.imds("creds", "--host", "fd00:ec2::254", "--timeout", "2")
        assert NODE_ROLE not in str(r), f"{pod} reached the node's IPv6 metadata service: {r}"
        if listen6:
            assert r["ok"] and r["role"] == role, f"{pod} over IPv6: {r}"
        else:
            assert not r["ok"], f"{pod} got an answer with IPv6 interception off: {r}"
        # IPv4 keeps working either way.
        r4 = pod.imds("creds")
        assert r4["ok"] and r4["role"] == role, r4

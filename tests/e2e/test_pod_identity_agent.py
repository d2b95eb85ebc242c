"""Living beside the EKS Pod Identity agent: on a node where the agent holds 169.254.170.23 and
fd00:ec2::23 (its link `pod-id-link0`), iamlink leaves that address to it by default and serves
169.254.169.254 only; with `credentials_address` set explicitly it takes the address over, saying
so loudly.

Real parts: the node network namespace with pods made through ptp + host-local + iamlink (libcni,
`cnirt`), nftables, routing-policy rules, the built binaries. The agent is a stand-in: a veth end
named `pod-id-link0` carrying its two addresses, and a small HTTP server on 169.254.170.23:80 in the
node namespace that answers every request with a marker (the real agent answers only with the
pod's own token's role, so traffic that reaches it is safe to let through).
"""

import json
import os

from conftest import add_standard_pods
from harness import IAMLINK_PLUGIN, IAMLINKD, is_assumed_role
from harness.netns_threads import NetnsThreads
from harness.rawhttp import request
from harness.util import BASE_PATH, PYTHON, wait_until

AGENT = ("169.254.170.23", 80)
MARKER = "answered-by-the-fake-pod-identity-agent"
AGENT_SERVER = f"""
import http.server, socketserver
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"{MARKER}"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
class S(http.server.ThreadingHTTPServer):
    daemon_threads = True
    def server_bind(self):
        socketserver.TCPServer.server_bind(self)
S(("169.254.170.23", 80), H).serve_forever()
"""
TOKEN = [("Authorization", "pod-identity-token")]
# iamlinkd's credentials pod port (its port + 2, `pod_dnat::pod_ports`) on the bench's daemon address.
CREDENTIALS_POD_PORT = ("198.18.0.1", 8181 + 2)


class FakeAgent:
    """The agent's link and server in the node namespace, as the add-on's init and main containers
    leave them (hostNetwork)."""

    def __init__(self, node):
        self.node = node
        self.proc = None

    def up(self):
        node = self.node
        node.exec(["ip", "link", "add", "pod-id-link0", "type", "veth", "peer", "name", "pod-id-peer0"])
        node.exec(["ip", "addr", "add", "169.254.170.23/32", "dev", "pod-id-link0"])
        node.exec(["ip", "addr", "add", "fd00:ec2::23/128", "dev", "pod-id-link0", "nodad"])
        for link in ("pod-id-link0", "pod-id-peer0"):
            node.exec(["ip", "link", "set", link, "up"])
        self.proc = node.spawn([PYTHON, "-c", AGENT_SERVER], env={"PATH": BASE_PATH, "LANG": "C.UTF-8"})
        wait_until(lambda: node.can_connect(*AGENT), 10, "the fake agent on 169.254.170.23:80")
        return self

    def down(self):
        if self.proc is not None:
            self.node.forget(self.proc)
            self.proc.kill()
            self.proc.wait(5)
            self.proc = None
        self.node.exec(["ip", "link", "del", "pod-id-link0"], check=False)


def ask_agent_address(pod):
    with NetnsThreads(pod.netns) as t:
        return t.call(request, "GET", "/v1/credentials", TOKEN, addr=AGENT, host="169.254.170.23")


def intercepted_addresses(bench):
    table = bench.node.exec(["nft", "list", "table", "inet", "iamlink"]).stdout
    rules = bench.node.exec(["ip", "rule"]).stdout + bench.node.exec(["ip", "-6", "rule"]).stdout
    return table, rules


def start_with_agent(make_bench, settings=None, pods_options=None):
    bench = make_bench(start_daemon=False, daemon_settings=settings, pods_options=pods_options)
    agent = FakeAgent(bench.node).up()
    bench.callback(agent.down)
    bench.daemon.start()
    return bench, agent


def test_a_pods_requests_to_the_agents_address_reach_the_agent_and_metadata_stays_iamlinks(make_bench):
    # As on EKS: aws-vpc-cni's default route via the node, and the plugin's entry as install-cni
    # writes it beside the agent (its test is below).
    eks = {"chain": "aws-vpc-cni", "netconf": {"credentialsAddress": "", "podIdentityAgent": True}}
    bench, _ = start_with_agent(make_bench, pods_options=eks)
    pods = add_standard_pods(bench)
    web = pods["team-a/web"]

    answer = ask_agent_address(web)
    assert answer.status == 200 and answer.text == MARKER, f"169.254.170.23 from {web}: {answer}"
    for pod in pods.values():
        rc, out, err = pod.caller_arn()
        if pod.role:
            assert rc == 0 and is_assumed_role(out.strip(), pod.role), (pod, out, err)
        else:
            assert rc != 0, (pod, out)
    table, rules = intercepted_addresses(bench)
    # Not intercepted (no rule matches it as a destination); the credentials pod port of a pod
    # whose DNAT predates the agent is sent on to the agent (`dnat ip to 169.254.170.23:80`).
    assert "169.254.169.254" in table and "daddr 169.254.170.23" not in table, table
    assert "daddr fd00:ec2::23" not in table and "fd00:ec2::23 " not in table, table
    assert "169.254.170.23" not in rules and "fd00:ec2::23" not in rules, rules
    assert "169.254.169.254" in rules, rules
    log = bench.daemon.log_text()
    assert "EKS Pod Identity agent" in log and "pod-id-link0" in log, log[-3000:]


def test_the_agent_appearing_after_iamlinkd_started_gets_its_address_and_leaving_gives_it_back(make_bench):
    bench = make_bench()
    web = bench.pods.add("team-a", "web")
    before = ask_agent_address(web)
    assert before.status == 200 and "SecretAccessKey" in before.text, f"iamlink serves 169.254.170.23: {before}"

    agent = FakeAgent(bench.node).up()
    bench.callback(agent.down)
    reached = wait_until(lambda: ask_agent_address(web).text == MARKER, 5, "the pod's request reaching the agent")
    assert reached
    def left_to_the_agent():
        table, rules = intercepted_addresses(bench)
        return "daddr 169.254.170.23" not in table and "169.254.170.23" not in rules

    wait_until(left_to_the_agent, 3, "neither the rule set nor an ip rule intercepting 169.254.170.23")
    rc, out, err = web.caller_arn()
    assert rc == 0 and is_assumed_role(out.strip(), "web"), (out, err)

    agent.down()
    wait_until(lambda: "SecretAccessKey" in ask_agent_address(web).text, 5, "iamlink serving 169.254.170.23 again")
    wait_until(lambda: all("169.254.170.23" in t for t in intercepted_addresses(bench)), 3,
               "the rule set and the ip rules naming 169.254.170.23 again")
    log = bench.daemon.log_text()
    assert "EKS Pod Identity agent appeared" in log and "EKS Pod Identity agent is gone" in log, log[-3000:]


def test_an_explicit_credentials_address_takes_the_agents_address_over_with_a_warning(make_bench):
    bench, _ = start_with_agent(make_bench, settings={"credentials_address": "169.254.170.23"})
    web = bench.pods.add("team-a", "web")

    answer = ask_agent_address(web)
    assert answer.status == 200 and "SecretAccessKey" in answer.text and MARKER not in answer.text, answer
    log = bench.daemon.log_text()
    assert "taking over" in log and "pod-id-link0" in log, log[-3000:]


def test_a_disabled_credentials_address_refuses_the_credentials_pod_port_instead_of_sending_it_to_the_agent(
        make_bench):
    """`credentials_address = ""` turns the credentials address off, agent or no agent: iamlink
    serves no credentials there and sends nothing on to 169.254.170.23 either. A pod that dials
    iamlinkd's credentials pod port (as a pod whose pod-side DNAT was written while the address was
    served does) is refused, while the metadata address is still iamlink's."""
    off = {"credentials_address": ""}
    bench, _ = start_with_agent(make_bench, settings=off, pods_options={"netconf": {"credentialsAddress": ""}})
    web = bench.pods.add("team-a", "web")

    with NetnsThreads(web.netns) as t:
        answer = t.call(request, "GET", "/v1/credentials", TOKEN, addr=CREDENTIALS_POD_PORT, host="169.254.170.23",
                        timeout=2)
    assert answer.status is None and answer.error == "refused", f"credentials pod port from {web}: {answer}"
    assert MARKER not in answer.text, answer
    rc, out, err = web.caller_arn()
    assert rc == 0 and is_assumed_role(out.strip(), "web"), (out, err)


def test_install_cni_leaves_the_agents_address_out_of_the_plugins_entry(make_bench):
    bench, agent = start_with_agent(make_bench)
    conf_dir = os.path.join(bench.node.workdir, "net.d")
    bin_dir = os.path.join(bench.node.workdir, "cni-bin")
    os.makedirs(conf_dir)
    os.makedirs(bin_dir)
    primary = dict(bench.pods.conflist, plugins=[p for p in bench.pods.conflist["plugins"] if p["type"] != "iamlink"])
    path = os.path.join(conf_dir, "10-primary.conflist")
    with open(path, "w") as f:
        json.dump(primary, f)
    bench.daemon.settings["cni"] = {"conf_dir": conf_dir, "bin_dir": bin_dir, "plugin_path": IAMLINK_PLUGIN}
    bench.daemon.write_config()

    def entry():
        p = bench.node.exec([IAMLINKD, "--config", bench.daemon.config_path, "install-cni"], check=False)
        assert p.returncode == 0, p.stderr
        return json.load(open(path))["plugins"][-1]

    assert entry()["credentialsAddress"] == "", "the agent is there"
    agent.down()
    assert entry()["credentialsAddress"] == "169.254.170.23", "no agent: iamlink serves the address"

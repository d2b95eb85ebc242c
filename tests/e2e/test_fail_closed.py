"""Own role or nothing, whatever else happens to the node's firewall: a ruleset flush (what a
stock `systemctl reload nftables` does), a map element deleted by hand, traffic that NAT never sees
(`notrack`, as Calico's doNotTrack and Cilium's no-conntrack rules make it), a mark mask changed
with pods running, a rule set left by an older iamlink, a map entry that points at the wrong slot.

Real parts: namespaces and veths, ptp + host-local + the built iamlink plugin through libcni
(`cnirt`), nftables, conntrack and routing-policy rules in the node namespace, the built iamlinkd
and its CLI, a stdlib IMDSv2 client in the pods (one new connection per request). Emulated: STS by
moto; the node's metadata service by the fake upstream (node role, real moto credentials), in a
namespace of its own behind a veth so that pods reach it only by being forwarded, as on a node.
"""

import collections
import json
import os
import time

import pytest

from harness import PYTHON, NODE_ROLE, IAMLINKD, Timeout, role_of_arn, wait_until
from harness.imds_client import CREDS_PATH
from harness.util import IMDS_CLIENT, stop_process

METRICS = ("198.18.0.1", 9101)
POLICY_PREFS = (60, 61, 62)
# Two masks under which the same mark names different slots: slot 2 under 0x307f is mark 0x2,
# which 0x307e reads as slot 1.
OLD_MASK, NEW_MASK = "0x307f", "0x307e"

STANDARD = [("team-a", "web", "web"), ("team-a", "batch", "batch"), ("team-b", "api", "api")]


def add_pods(bench, pods=STANDARD):
    out = []
    for ns, name, role in pods:
        pod = bench.pods.add(ns, name)
        pod.role = role
        out.append(pod)
    return out


def nft(bench, *args, check=True, input=None):
    return bench.node.exec(["nft", *args], check=check, input=input)


def table(bench):
    """`nft -j list table inet iamlink` as a list of items; None when the table is missing."""
    p = nft(bench, "-j", "list", "table", "inet", "iamlink", check=False)
    return json.loads(p.stdout)["nftables"] if p.returncode == 0 else None


def map_entries(bench):
    items = table(bench) or []
    for item in items:
        if item.get("map", {}).get("name") == "pods":
            return {e[0]: e[1]["jump"]["target"] for e in item["map"].get("elem", [])}
    return {}


def slot_marks(bench):
    """slot chain name -> the mark bits its rule ORs in, read from the kernel."""
    marks = {}
    for item in table(bench) or []:
        rule = item.get("rule")
        if rule and rule["chain"].startswith("slot-"):
            marks[rule["chain"]] = rule["expr"][0]["mangle"]["value"]["|"][1]
    return marks


def layout_comment(bench):
    for item in table(bench) or []:
        rule = item.get("rule")
        if rule and rule["chain"] == "identify-pod" and "comment" in rule:
            return rule["comment"]
    return None


def policy_rules(bench):
    return bench.node.ip_rules(POLICY_PREFS)


def delete_policy_rules(bench):
    """What another agent rewriting the node's ip rules would do to ours."""
    bench.node.delete_ip_rules(POLICY_PREFS)
    assert policy_rules(bench) == []


def ask(pod, path=CREDS_PATH, timeout=2):
    return pod.imds("request", "GET", path, "--timeout", timeout)


def metric(bench, name):
    """The sum of a metric's samples from iamlinkd's /metrics (0 when absent)."""
    import http.client

    def get():
        c = http.client.HTTPConnection(*METRICS, timeout=5)
        c.request("GET", "/metrics")
        body = c.getresponse().read().decode()
        c.close()
        return body

    total = 0.0
    for line in bench.node.call(get).splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def readyz(bench):
    import http.client

    def get():
        c = http.client.HTTPConnection(*METRICS, timeout=5)
        c.request("GET", "/readyz")
        r = c.getresponse()
        body = r.read().decode()
        c.close()
        return r.status, body

    return bench.node.call(get)


def own_role_or_nothing(bench, pod, answer, what):
    """A `creds` answer is the pod's own role (checked with moto) or no credentials at all."""
    assert not bench.upstream.leaked(json.dumps(answer)), f"{what}: {pod} got the node's role: {answer}"
    if answer.get("ok"):
        assert answer["role"] == pod.role, f"{what}: {pod} got role {answer['role']!r}"
        assert role_of_arn(bench.moto.caller_arn(answer["creds"])) == pod.role, f"{what}: {pod}: {answer}"


def loop(pod, seconds, interval=0.05):
    return pod.spawn([PYTHON, IMDS_CLIENT, "loop", "--seconds", str(seconds), "--timeout", "1",
                      "--interval", str(interval), "--timeline"])


def summary(bench, client):
    stop_process(client, timeout=10)
    out, err = client.communicate(timeout=10)
    bench.node.forget(client)
    try:
        return json.loads(out)
    except ValueError:
        raise AssertionError(f"client printed no summary: {out[:300]!r} {err[-1000:]!r}")


def wrong_answers(bench, pod, s):
    """Every answer in a loop summary that is not the pod's own role, checked with moto."""
    wrong = []
    for akid, entry in s["keys"].items():
        for listed, count in entry["roles"].items():
            if listed != pod.role:
                wrong.append(f"listed {listed!r} x{count}")
        arn = bench.moto.caller_arn(entry["creds"])
        if role_of_arn(arn) != pod.role:
            wrong.append(f"key {akid} is {arn}")
    return wrong


# -- 1. the rule set disappears ------------------------------------------------------------------


def test_ruleset_flush_while_a_pod_asks_every_50ms_gives_no_node_role_and_its_own_within_2s(make_bench,
                                                                                        bench_report):
    bench = make_bench()
    (pod,) = add_pods(bench, STANDARD[:1])
    repairs_before = metric(bench, "iamlink_interception_repairs_total")
    client = loop(pod, seconds=20)
    try:
        wait_until(lambda: table(bench) and ask(pod).get("status") == 200, 10, "the pod answered")
        flushed = time.monotonic()
        nft(bench, "flush", "ruleset")
        wait_until(lambda: layout_comment(bench) is not None and pod.host_ifname in map_entries(bench), 2,
                   "iamlinkd to reinstall the table with the pod's entry")
        restored = time.monotonic()
        # The client keeps asking until it has been answered a while after the restore.
        wait_until(lambda: sum(1 for a in bench.daemon.audit_lines() if a.get("pod") == pod.key) >= 40, 15,
                   "answers after the restore")
    finally:
        s = summary(bench, client)
    assert not bench.upstream.leaked(json.dumps(s)), f"the node's role reached the pod: {s['keys'].keys()}"
    assert not wrong_answers(bench, pod, s), wrong_answers(bench, pod, s)
    after = [(first, outcome) for first, _, outcome, _ in s["timeline"] if first >= flushed]
    first_ok = min((f for f, o in after if o == "ok"), default=None)
    assert first_ok is not None, f"no answer after the flush: {s['timeline']}"
    assert first_ok - flushed <= 2.0, f"own role again only {first_ok - flushed:.2f}s after the flush"
    assert metric(bench, "iamlink_interception_repairs_total") > repairs_before
    assert "rule set repaired" in bench.daemon.log_text()
    assert readyz(bench)[0] == 200
    outcomes = collections.Counter(o for _, o in after)
    bench_report(f"nft flush ruleset under a 50 ms client: table back after {restored - flushed:.3f}s, own role "
                 f"again after {first_ok - flushed:.3f}s, 0 node-role answers; outcomes after the flush "
                 f"{dict(outcomes)}")


def test_policy_rules_alone_keep_pods_from_the_node_role_while_the_table_is_gone(make_bench):
    bench = make_bench()
    # A pod without the tcx guard (made by an older plugin, or on a kernel without tcx): the
    # guard would drop its metadata packets before the layer under test here.
    bench.pods.set_netconf(ebpfGuard=False)
    (pod,) = add_pods(bench, STANDARD[:1])
    # The policy rules alone: the pod's own DNAT (a layer of its own) goes first.
    assert pod.exec(["nft", "delete", "table", "inet", "iamlink"]).returncode == 0
    # Three rules for each intercepted address: 169.254.169.254, 169.254.170.23 and their IPv6 twins.
    assert len(policy_rules(bench)) == 12, policy_rules(bench)
    bench.daemon.stop()  # nobody restores the table
    nft(bench, "flush", "ruleset")
    r = pod.imds("creds", "--timeout", "2")
    assert not r.get("ok") and r.get("error") in ("oserror-113", "refused"), r  # EHOSTUNREACH: prohibited
    own_role_or_nothing(bench, pod, r, "table flushed, daemon stopped")
    region = ask(pod, "/latest/meta-data/placement/region")
    assert region.get("error"), f"the pod reached the real metadata service: {region}"
    # Control: without the policy rules the same pod would reach the real service (a harmless path).
    delete_policy_rules(bench)
    assert ask(pod, "/latest/meta-data/placement/region").get("status") == 200, "control: no path to the upstream?"
    bench.daemon.start()
    assert len(policy_rules(bench)) == 12, "iamlinkd puts its policy rules back at start"
    wait_until(lambda: pod.imds("creds").get("ok"), 10, "the pod's own role after iamlinkd started")
    own_role_or_nothing(bench, pod, pod.imds("creds"), "after restart")


def test_a_map_element_deleted_by_hand_is_named_by_status_and_restored_from_the_store(make_bench):
    bench = make_bench()
    web, batch = add_pods(bench, STANDARD[:2])
    bench.daemon.stop()
    nft(bench, "delete", "element", "inet", "iamlink", "pods", "{", f'"{web.host_ifname}"', "}")
    p = bench.node.exec([IAMLINKD, "--config", bench.daemon.config_path, "status"], check=False)
    assert p.returncode == 1, p.stdout
    assert f"the pods map has no entry for {web.host_ifname}" in p.stdout, p.stdout
    bench.daemon.start()
    assert web.host_ifname in map_entries(bench), "restored at start"
    own_role_or_nothing(bench, web, web.imds("creds"), "after restart")
    # While the daemon runs, a deletion is noticed from nf_tables events and undone at once.
    nft(bench, "delete", "element", "inet", "iamlink", "pods", "{", f'"{batch.host_ifname}"', "}")
    wait_until(lambda: batch.host_ifname in map_entries(bench), 1.5, "iamlinkd to restore the element")
    r = batch.imds("creds")
    assert r.get("ok"), r
    own_role_or_nothing(bench, batch, r, "after the element was restored")
    assert "entry" in bench.daemon.log_text() and "restored" in bench.daemon.log_text()


# -- 2. traffic that NAT never sees --------------------------------------------------------------


def test_a_pod_whose_element_is_deleted_under_a_50ms_client_is_refused_until_restored_never_the_node_role(
        make_bench):
    """iamlinkd checks a change to a pod's element after a settle window (one check per burst of
    ADDs and DELs): meanwhile the pod's packets carry no slot and are refused, never answered with
    the node's role or another's, and its own role is back within seconds (the settle window is 200 ms)."""
    bench = make_bench()
    pod, other = add_pods(bench, STANDARD[:2])
    answered = lambda: sum(1 for a in bench.daemon.audit_lines() if a.get("pod") == pod.key)
    client = loop(pod, seconds=20)
    try:
        wait_until(lambda: answered() >= 3, 10, "the pod answered")
        deleted = time.monotonic()
        nft(bench, "delete", "element", "inet", "iamlink", "pods", "{", f'"{pod.host_ifname}"', "}")
        wait_until(lambda: pod.host_ifname in map_entries(bench), 5, "iamlinkd to restore the element")
        before = answered()
        wait_until(lambda: answered() >= before + 10, 10, "answers after the restore")
    finally:
        s = summary(bench, client)
    assert not bench.upstream.leaked(json.dumps(s)), f"the node's role reached the pod: {s['keys'].keys()}"
    assert not wrong_answers(bench, pod, s), wrong_answers(bench, pod, s)
    first_ok = min((f for f, _, o, _ in s["timeline"] if f >= deleted and o == "ok"), default=None)
    assert first_ok is not None and first_ok - deleted <= 5, f"own role again late: {s['timeline']}"
    assert other.host_ifname in map_entries(bench), "the other pod's element was never touched"
    own_role_or_nothing(bench, other, other.imds("creds"), "the other pod")


def test_untracked_pod_traffic_is_refused_not_forwarded_to_the_real_service(make_bench):
    bench = make_bench()
    (pod,) = add_pods(bench, STANDARD[:1])
    # What Calico's doNotTrack policy (or a SYN conntrack judges invalid) does: NAT never sees it.
    nft(bench, "-f", "-", input="table inet calico-raw {\n chain pre { type filter hook prerouting priority raw;"
                                f" ip saddr {pod.ip} notrack; }}\n}}\n")
    # The forward-hook refusal alone, without the policy rules' help: the daemon stopped (the rule
    # set stays), or it would put the rules back within a second, in the middle of the check.
    bench.daemon.stop()
    delete_policy_rules(bench)
    for path in (CREDS_PATH, "/latest/meta-data/placement/region"):
        r = ask(pod, path)
        assert r.get("error") in ("refused", "reset"), f"{path}: {r}"
    r = pod.imds("creds", "--timeout", "2")
    own_role_or_nothing(bench, pod, r, "notrack")
    assert not r.get("ok")
    assert not any(req.get("client") == pod.ip for req in bench.upstream.requests()), bench.upstream.requests()


# -- 3. the mark mask changes with pods running ---------------------------------------------------


def restart_with_mask(bench, mask):
    """The daemon restarted with another mark_mask and the conflist's markMask changed with it."""
    bench.daemon.stop()
    bench.daemon.settings["mark_mask"] = mask
    bench.pods.set_netconf(markMask=mask)
    bench.daemon.start()


def test_changing_the_mark_mask_with_pods_running_never_serves_another_pods_role(make_bench):
    bench = make_bench(daemon_settings={"mark_mask": OLD_MASK}, pods_options={"netconf": {"markMask": OLD_MASK}})
    pods = add_pods(bench)
    for pod in pods:
        own_role_or_nothing(bench, pod, pod.imds("creds"), "before")
    restart_with_mask(bench, NEW_MASK)
    answers = {pod.key: pod.imds("creds") for pod in pods}
    for pod in pods:
        own_role_or_nothing(bench, pod, answers[pod.key], f"after the mask became {NEW_MASK}")
    for pod in pods:
        assert answers[pod.key].get("ok"), answers[pod.key]
    marks = slot_marks(bench)
    assert layout_comment(bench).startswith(f"iamlink layout 2 mask {NEW_MASK}")
    # Every slot chain was rebuilt under the new mask: slot 1 is 0x2, slot 2 0x4, slot 3 0x6.
    assert marks == {"slot-1": 0x2, "slot-2": 0x4, "slot-3": 0x6}, marks
    new = bench.pods.add("team-b", "api-2")
    new.role = "api"
    own_role_or_nothing(bench, new, new.imds("creds"), "a pod made after the migration")


def test_the_plugin_refuses_a_pod_rather_than_write_a_mark_under_another_mask(make_bench):
    bench = make_bench(pods_options={"netconf": {"markMask": NEW_MASK}})
    from harness import CniError

    with pytest.raises(CniError) as e:
        bench.pods.add("team-a", "web")
    out = json.loads(e.value.proc.stdout)
    assert out["code"] == 102, out
    assert f"mark mask {OLD_MASK}" in out["msg"] + out.get("details", "") and NEW_MASK in out["msg"] + \
        out.get("details", ""), out


def test_a_rule_set_of_an_older_layout_is_rebuilt_at_start(make_bench):
    bench = make_bench()
    pods = add_pods(bench)
    bench.daemon.stop()
    entries = map_entries(bench)
    # Layout 1, as iamlink wrote it before the layout was recorded (no comment, no refuse chain),
    # with its slot chains written under a mask that is not the daemon's.
    old = ["table inet iamlink {", " map pods { type ifname : verdict; }",
           " chain identify { type filter hook prerouting priority mangle; policy accept;",
           "  ip daddr { 169.254.169.254, 169.254.170.23 } tcp dport 80 jump identify-pod", " }",
           " chain identify-pod {", "  meta mark set meta mark and 0xffffcf80", "  iifname vmap @pods", " }",
           " chain intercept { type nat hook prerouting priority dstnat - 10; policy accept;",
           "  ip daddr { 169.254.169.254, 169.254.170.23 } tcp dport 80 ct state new dnat ip to 198.18.0.1:8181",
           " }"]
    for target in entries.values():
        slot = int(target.split("-")[1])
        old += [f" chain {target} {{", f"  meta mark set meta mark or {slot << 1:#x}", " }"]
    old.append("}")
    nft(bench, "delete", "table", "inet", "iamlink")
    nft(bench, "-f", "-", input="\n".join(old) + "\n")
    for name, target in entries.items():
        nft(bench, "add", "element", "inet", "iamlink", "pods", "{", f'"{name}"', ":", "jump", target, "}")
    bench.daemon.start()
    for pod in pods:
        r = pod.imds("creds")
        own_role_or_nothing(bench, pod, r, "after the upgrade")
        assert r.get("ok"), r
    assert (layout_comment(bench) or "").startswith("iamlink layout 2 mask 0x307f"), layout_comment(bench)
    assert any(i.get("chain", {}).get("name") == "refuse" for i in table(bench))


# -- 6. a map entry that points at another slot --------------------------------------------------


def test_an_entry_pointing_at_another_slot_is_corrected_at_start(make_bench):
    bench = make_bench()
    web, batch = add_pods(bench, STANDARD[:2])
    bench.daemon.stop()
    entries = map_entries(bench)
    nft(bench, "-f", "-", input=(f"add chain inet iamlink slot-9\n"
                                 f"add rule inet iamlink slot-9 meta mark set meta mark or 0x1001\n"
                                 f'delete element inet iamlink pods {{ "{web.host_ifname}" }}\n'
                                 f'add element inet iamlink pods {{ "{web.host_ifname}" : jump slot-9 }}\n'))
    bench.daemon.start()
    assert map_entries(bench) == entries, "the entry points at the record's slot again"
    for pod in (web, batch):
        r = pod.imds("creds")
        assert r.get("ok"), r
        own_role_or_nothing(bench, pod, r, "after the start")


def test_explain_reads_the_slot_chain_the_kernel_has(make_bench):
    bench = make_bench()
    web, batch = add_pods(bench, STANDARD[:2])
    bench.daemon.stop()
    batch_chain = map_entries(bench)[batch.host_ifname]
    web_mark = slot_marks(bench)[map_entries(bench)[web.host_ifname]]
    nft(bench, "flush", "chain", "inet", "iamlink", batch_chain)
    nft(bench, "add", "rule", "inet", "iamlink", batch_chain, "meta", "mark", "set", "meta", "mark", "or",
        hex(web_mark))
    p = bench.node.exec([IAMLINKD, "--config", bench.daemon.config_path, "explain", batch.key], check=False)
    assert p.returncode == 1, p.stdout
    assert f"{batch_chain} sets mark {web_mark:#x}" in p.stdout, p.stdout


# -- 4. a rule changed by hand, rule by rule --------------------------------------------------------


def listing(bench):
    """`nft list table inet iamlink` without handles, its lines sorted (a map's order is the kernel's)."""
    return sorted(nft(bench, "list", "table", "inet", "iamlink").stdout.splitlines())


def rule_handle(bench, chain, index):
    """The kernel's handle of rule `index` of `chain`."""
    rules = [item["rule"] for item in table(bench) or [] if item.get("rule", {}).get("chain") == chain]
    return rules[index]["handle"], rules[index].get("comment")


def tamperings(bench, web, api):
    """Changes a root process could make that keep every chain's rule count or its last rule, each
    making web's connections carry api's slot: web's slot 1 | 2 is slot 3."""
    entries, marks = map_entries(bench), slot_marks(bench)
    web_chain, bits = entries[web.host_ifname], marks[entries[api.host_ifname]] & ~marks[entries[web.host_ifname]]
    assert bits, (marks, entries)
    handle, comment = rule_handle(bench, "identify-pod", 0)
    return {
        # The issue's example: a rule before the slot chain's own.
        "slot-rule-inserted": f"insert rule inet iamlink {web_chain} meta mark set meta mark or {bits:#x}\n",
        # After the map's jump returns, a rule that adds bits for web's interface.
        "base-rule-added": (f'add rule inet iamlink identify-pod iifname "{web.host_ifname}" '
                            f"meta mark set meta mark or {bits:#x}\n"),
        # The rule that clears iamlink's bits, replaced in place, comment and all: the same count,
        # the same layout comment, another expression.
        "base-expression-changed": (f"replace rule inet iamlink identify-pod handle {handle} "
                                    f'meta mark set meta mark or {bits:#x} comment "{comment}"\n'),
    }


@pytest.mark.parametrize("tampering", ["slot-rule-inserted", "base-rule-added", "base-expression-changed"])
def test_a_rule_changed_by_hand_never_serves_a_pod_another_pods_role_and_is_repaired(make_bench, tampering):
    bench = make_bench()
    web, batch, api = add_pods(bench)
    script = tamperings(bench, web, api)[tampering]
    before = listing(bench)
    # Only web asks: every audit line is an answer to web, whichever pod it was taken for.
    answered = lambda: len(bench.daemon.audit_lines())
    client = loop(web, seconds=20)
    try:
        wait_until(lambda: answered() >= 3, 10, "web answered")
        changed = time.monotonic()
        nft(bench, "-f", "-", input=script)
        try:
            wait_until(lambda: listing(bench) == before, 3, f"iamlinkd to undo {tampering}")
            not_undone = None
        except Timeout as e:
            not_undone = e  # what web was answered meanwhile is asserted first
        count = answered()
        wait_until(lambda: answered() >= count + 10, 10, "answers after the tampering")
    finally:
        s = summary(bench, client)
    assert not bench.upstream.leaked(json.dumps(s)), f"the node's role reached the pod: {s['keys'].keys()}"
    assert not wrong_answers(bench, web, s), f"{tampering}: {wrong_answers(bench, web, s)}"
    assert not_undone is None, not_undone
    # Runs of one outcome (first, last, outcome, count): own role answered again after the change.
    ok_after = [max(first, changed) for first, last, o, _ in s["timeline"] if o == "ok" and last >= changed]
    assert ok_after and ok_after[0] - changed <= 3, f"own role again late: {s['timeline']}"
    for pod in (web, batch, api):
        own_role_or_nothing(bench, pod, pod.imds("creds"), f"after {tampering} was undone")
    assert "rule set repaired" in bench.daemon.log_text()

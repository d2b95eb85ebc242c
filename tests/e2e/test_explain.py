"""`iamlinkd explain` and `iamlinkd status` tell an operator what the node knows about a pod and
what is wrong, with the daemon up or down.

Real parts: pods made through ptp + host-local → iamlink (cnirt/libcni), the nftables rule set in
the node namespace, the built iamlinkd (daemon and CLI, run inside the node namespace), the AWS
CLI in the pods. Breakage is made by hand the way it happens on nodes: a map element deleted, a
route deleted in the pod, a stale element left behind.
"""

import fcntl
import json
import os
import re

import pytest

from harness import IAMLINKD, is_assumed_role, wait_until

NOT_ANSWERING = "role and credential state unknown (daemon down?)"


def role_line(role):
    """The start of explain's role line for a pod granted `role` by iamlinkd's config."""
    return re.compile(r"^  role +(arn:aws:iam::\d+:role/(?:\S+/)?" + re.escape(role) + r") \(granted by config", re.M)


def iamlinkd(bench, *args):
    """iamlinkd (the CLI) in the node namespace, with the bench daemon's config file."""
    return bench.node.exec([IAMLINKD, "--config", bench.daemon.config_path] + list(args), check=False, timeout=30)


def explain(bench, target, json_out=False):
    p = iamlinkd(bench, "explain", target, *(["--json"] if json_out else []))
    return p.returncode, (json.loads(p.stdout) if json_out and p.stdout.strip() else p.stdout), p.stderr


def status(bench):
    p = iamlinkd(bench, "status", "--json")
    assert p.stdout.strip(), f"status printed nothing (rc {p.returncode}): {p.stderr}"
    return p.returncode, json.loads(p.stdout)


def socket_path(bench):
    return os.path.join(bench.store_dir, "iamlinkd.sock")


def wait_daemon_answers(bench):
    """Until `status` says the daemon answers on its socket (bound just after its TCP port)."""
    wait_until(lambda: status(bench)[1]["daemon"]["answering"], 20, "iamlinkd answering on its local socket")


def nft_script(bench, script):
    bench.node.exec(["nft", "-f", "-"], input=script)


def slot_of(bench, pod):
    for name in os.listdir(os.path.join(bench.store_dir, "records")):
        if name.startswith(pod.cid):
            with open(os.path.join(bench.store_dir, "records", name)) as f:
                return json.load(f)["slot"]
    raise AssertionError(f"no record for {pod}")


@pytest.fixture(scope="module")
def bench(make_module_bench):
    b = make_module_bench()
    wait_daemon_answers(b)
    return b


def assert_plumbing_shown(out, pod):
    for want in (f"pod {pod.key}", f"uid           {pod.uid}", f"container     {pod.cid}",
                 f"netns         {pod.netns_path}",
                 f"host iface    {pod.host_ifname} (index", "): present",
                 "pod routes    169.254.169.254 via 198.18.64.1 dev eth0: ok",
                 "169.254.170.23 via 198.18.64.1 dev eth0: ok",
                 f"interception  {pod.host_ifname} → slot-"):
        assert want in out, f"{want!r} missing in:\n{out}"


def test_explain_finds_a_healthy_pod_by_netns_interface_or_name_and_shows_its_cached_role(bench):
    pod = bench.pods.add("team-a", "web")
    rc, arn, err = pod.caller_arn()
    assert rc == 0 and is_assumed_role(arn, "web"), (rc, arn, err)
    for target in (pod.netns, pod.netns_path, pod.host_ifname, pod.key):
        rc, out, err = explain(bench, target)
        assert rc == 0, f"explain {target}: rc {rc}\n{out}\n{err}"
        assert_plumbing_shown(out, pod)
        assert role_line("web").search(out), out
        assert "credentials   cached, expires" in out and "last refreshed" in out, out
        assert "problems      none" in out, out
        assert NOT_ANSWERING not in out, out
    print(f"\n$ iamlinkd explain {pod.key}\n{out}")

    assert os.stat(socket_path(bench)).st_mode & 0o777 == 0o600, "the daemon's local socket is root-only"
    rc, doc, _ = explain(bench, pod.key, json_out=True)
    assert rc == 0 and doc["daemon"]["answering"], doc
    (report,) = doc["pods"]
    assert report["record"]["pod"]["uid"] == pod.uid and report["entry"] == report["record"]["slot"], report
    assert report["daemon"]["role"] == role_line("web").search(out).group(1), report
    creds = report["daemon"]["credentials"]
    assert creds["cached"] and creds["usable"] and creds["error"] is None, creds
    assert "SecretAccessKey" not in json.dumps(doc) and "Token" not in json.dumps(creds), "no secrets in explain"


def test_a_pod_without_role_is_explained_as_such(bench):
    pod = bench.pods.add("team-c", "norole")
    rc, out, err = explain(bench, pod.key)
    assert rc == 0, f"rc {rc}\n{out}\n{err}"
    assert "role          no role: " in out and "credentials" not in out, out


def test_explain_and_status_work_with_the_daemon_stopped_and_say_so(bench):
    pod = bench.pods.add("team-a", "batch")
    bench.daemon.stop()
    try:
        rc, out, err = explain(bench, pod.netns)
        assert rc == 0, f"the pod's plumbing is whole: rc {rc}\n{out}\n{err}"
        assert out.startswith(f"iamlinkd is not answering on {socket_path(bench)}: {NOT_ANSWERING}"), out
        assert_plumbing_shown(out, pod)
        assert "role          unknown (iamlinkd not answering)" in out, out
        assert "problems      none" in out, out

        rc, doc = status(bench)
        assert rc == 1 and not doc["daemon"]["answering"], doc
        assert doc["records"] == len(bench.pods.live) and doc["recordsWithoutEntry"] == 0, doc
        assert any("iamlinkd is not answering" in p for p in doc["problems"]), doc["problems"]
        text = iamlinkd(bench, "status").stdout
        assert NOT_ANSWERING in text and "rule set                   installed" in text, text
    finally:
        bench.daemon.start()
    wait_daemon_answers(bench)
    rc, out, _ = explain(bench, pod.key)
    assert rc == 0 and role_line("batch").search(out), out


def test_a_record_without_its_interception_entry_is_named(bench):
    pod = bench.pods.add("team-b", "lost-entry")
    # A running iamlinkd restores the element within milliseconds (test_fail_closed.py): the
    # operator's view of a missing one is seen with the daemon stopped.
    bench.daemon.stop()
    nft_script(bench, f'delete element inet iamlink pods {{ "{pod.host_ifname}" }}\n')
    try:
        rc, out, err = explain(bench, pod.host_ifname)
        assert rc == 1, f"rc {rc}\n{out}\n{err}"
        assert f"interception  MISSING: no entry for {pod.host_ifname}" in out, out
        assert f"PROBLEMS      record without interception entry: the pods map has no entry for {pod.host_ifname}" \
            in out, out
        rc, doc = status(bench)
        assert rc == 1 and doc["recordsWithoutEntry"] == 1, doc
        assert any(p.startswith(f"{pod.key}: record without interception entry") for p in doc["problems"]), doc
    finally:
        bench.daemon.start()
        bench.pods.delete(pod)


def test_a_missing_pod_route_is_named(bench):
    pod = bench.pods.add("team-b", "lost-route")
    bench.node.exec(["ip", "route", "del", "169.254.169.254/32"], netns=pod.netns)
    try:
        rc, out, err = explain(bench, pod.netns)
        assert rc == 1, f"rc {rc}\n{out}\n{err}"
        assert "pod routes    169.254.169.254: no route: MISSING" in out, out
        assert "PROBLEMS      pod route missing: the pod has no route to 169.254.169.254" in out, out
        assert "169.254.170.23 via 198.18.64.1 dev eth0: ok" in out, out
        rc, doc = status(bench)
        assert rc == 1 and doc["podRoutesMissing"] == 1, doc
    finally:
        bench.pods.delete(pod)


def test_an_interception_entry_without_a_record_is_named(bench):
    pod = bench.pods.add("team-b", "api")
    slot = slot_of(bench, pod)
    bench.daemon.stop()  # a running iamlinkd removes an entry without a record at once
    nft_script(bench, f'add element inet iamlink pods {{ "ghost0" : jump slot-{slot} }}\n')
    try:
        rc, out, err = explain(bench, "ghost0")
        assert rc == 1, f"rc {rc}\n{out}\n{err}"
        assert f"interception entry ghost0 → slot-{slot} (no pod record)" in out, out
        assert "PROBLEMS      interception entry without record: ghost0" in out, out
        rc, doc = status(bench)
        assert rc == 1 and doc["entriesWithoutRecord"] == 1, doc
        assert doc["interceptionEntries"] == doc["records"] + 1, doc
    finally:
        bench.daemon.start()
    assert "ghost0" not in bench.node.exec(["nft", "list", "map", "inet", "iamlink", "pods"]).stdout, \
        "iamlinkd removes the entry without a record when it starts"


def set_record_netns(bench, pod, netns):
    """Rewrites the pod's record to name `netns`, under the store lock, by temp file + rename."""
    records = os.path.join(bench.store_dir, "records")
    (name,) = [n for n in os.listdir(records) if n.startswith(pod.cid) and n.endswith(".json")]
    path = os.path.join(records, name)
    with open(os.path.join(bench.store_dir, "lock")) as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with open(path) as f:
            record = json.load(f)
        record["netns"] = netns
        with open(path + ".tmp", "w") as f:
            json.dump(record, f)
        os.replace(path + ".tmp", path)


def test_a_pod_netns_out_of_sight_leaves_its_routes_unknown_not_missing(bench):
    """containerd keeps pods' netns mounts in its own mount namespace: from where iamlinkd runs,
    the recorded path is missing, or the empty file the mount sits on. The pod works; what its
    routes are is unknown from here, which is not a problem and not a missing route."""
    pod = bench.pods.add("team-b", "netns-out-of-sight")
    empty_file = os.path.join(bench.node.workdir, "netns-mount-point")
    open(empty_file, "w").close()
    try:
        for netns in ("/var/run/netns/iamlink-no-such-netns", empty_file):
            set_record_netns(bench, pod, netns)
            rc, arn, err = pod.caller_arn()
            assert rc == 0 and is_assumed_role(arn, "api"), (netns, rc, arn, err)

            rc, doc = status(bench)
            assert doc["podRoutesMissing"] == 0, (netns, doc)
            assert doc.get("podRoutesUnknown") == 1, (netns, doc)
            assert rc == 0 and doc["problems"] == [], (netns, doc)
            (unchecked,) = doc["unchecked"]
            assert unchecked.startswith(f"{pod.key}: cannot look into the pod's network namespace {netns}"), doc
            text = iamlinkd(bench, "status").stdout
            assert "pod routes missing         0" in text, text
            assert "pod routes unknown         1 (pod netns not readable from here)" in text, text
            assert "problems                   none" in text, text

            rc, out, err = explain(bench, pod.key)
            assert rc == 0, f"{netns}: rc {rc}\n{out}\n{err}"
            assert f"pod routes    unknown: cannot enter {netns} from here: " in out, out
            assert "problems      none" in out and "MISSING" not in out, out
    finally:
        set_record_netns(bench, pod, pod.netns_path)
        bench.pods.delete(pod)
        os.remove(empty_file)


def test_status_counts_a_healthy_node(bench):
    rc, doc = status(bench)
    live = len(bench.pods.live)
    assert live >= 1
    assert rc == 0, doc
    assert doc["ruleSet"] == {"state": "installed"}, doc
    assert doc["records"] == live and doc["interceptionEntries"] == live, doc
    assert (doc["recordsWithoutEntry"], doc["entriesWithoutRecord"], doc["hostInterfaceGone"],
            doc["podRoutesMissing"], doc["problems"]) == (0, 0, 0, 0, []), doc
    daemon = doc["daemonStatus"]
    assert doc["daemon"]["answering"] and daemon["records"] == live, doc
    roles = sum(1 for p in bench.pods.live if p.namespace != "team-c")
    assert daemon["withRole"] == roles, doc
    text = iamlinkd(bench, "status").stdout
    assert f"records                    {live} in {bench.store_dir}" in text, text
    assert "problems                   none" in text, text
    print(f"\n$ iamlinkd status\n{text}")


def test_an_unknown_target_exits_2_and_says_what_was_searched(bench):
    for target in ("team-z/nobody", "nosuchif0", "/var/run/netns/no-such-netns"):
        rc, out, err = explain(bench, target)
        assert rc == 2, f"{target}: rc {rc}\n{out}\n{err}"
        assert f"nothing matches {target}" in err and out == "", (out, err)
    rc, out, err = explain(bench, "a/b/c")
    assert rc == 2 and "neither namespace/pod nor" in err, (rc, err)

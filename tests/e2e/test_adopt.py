"""Pods already running when iamlink is installed: iamlinkd adopts them at start, each with its
own role, from the runtime's record of what it made, once the kernel confirms which host
interface is the pod's; a pod that fails the check stays refused and `iamlinkd status` says why.

Real parts: containerd 1.6 with its CRI plugin (tests/harness/containerd.py), whose libcni writes
its result cache under /var/lib/cni/results in containerd's mount namespace; ptp + host-local as
the node's primary chain (its IPAM gives pods a default route via the node, as primary plugins
on real nodes do); `iamlinkd install-cni` chaining the built plugin into containerd's conflist;
the built iamlinkd started afterwards in containerd's mount namespace (as the DaemonSet mounts
/var/lib/cni and the pods' netns paths); the unmodified AWS CLI in the sandboxes. Emulated: STS
by moto, the node's metadata service by the fake upstream (serving a node role, so a leak would
show).
"""

import json
import os
import uuid

import pytest

from harness import IAMLINK_PLUGIN, IAMLINKD, wait_until
from harness.containerd import Containerd, missing_prerequisites
from harness.daemonset import loaded_cni_plugins
from harness.imds_client import CREDS_PATH

ROLES = [{"namespace": "team-a", "name": "web", "role": "web"},
         {"namespace": "team-a", "name": "batch", "role": "batch"},
         {"namespace": "team-a", "name": "late", "role": "late"},
         {"namespace": "team-a", "name": "between", "role": "between"}]


@pytest.fixture
def node(make_bench):
    """A node whose pods run through ptp + host-local alone (iamlink not chained, iamlinkd not
    started); iamlinkd configured to install into containerd's CNI dirs."""
    missing = missing_prerequisites()
    if missing:
        pytest.fail("not installed or built: " + ", ".join(missing) + " (run scripts/setup)", pytrace=False)
    bench = make_bench(pod_roles=ROLES, start_daemon=False, pods_options={"with_iamlink": False})
    bench.pods.conflist["plugins"][0]["ipam"]["routes"].append({"dst": "0.0.0.0/0"})
    ctd = Containerd(bench.node, bench.pods, plugin_tap=False)
    bench.callback(ctd.close)
    bench.containerd = ctd
    bench.extra_logs += [("containerd", ctd.log_path)]
    ctd.start()
    # iamlinkd sees what the DaemonSet mounts: libcni's cache and the pods' netns paths.
    bench.daemon.wrapper = ["nsenter", "-t", str(ctd.holder.pid), "-m", "--"]
    bench.daemon.settings["cni"] = {"conf_dir": ctd.conf_dir, "bin_dir": ctd.bin_dir, "plugin_path": IAMLINK_PLUGIN,
                                    "log_file": bench.pods.plugin_log}
    return bench


def run_pod(bench, name):
    return bench.containerd.run_sandbox("team-a", name, str(uuid.uuid4()))


def install_and_start(bench):
    """What the DaemonSet does on a node with running pods: install-cni, then iamlinkd."""
    bench.daemon.write_config()
    p = bench.containerd.node_exec([IAMLINKD, "--config", bench.daemon.config_path, "install-cni"])
    assert p.returncode == 0, p.stderr
    wait_until(lambda: "iamlink" in loaded_cni_plugins(bench.containerd.cri), 10, "containerd to load the chain")
    bench.daemon.start()


def iamlinkd_cli(bench, *args):
    p = bench.containerd.node_exec([IAMLINKD, "--config", bench.daemon.config_path, *args])
    return p.returncode, p.stdout, p.stderr


def record_of(bench, sandbox):
    try:
        with open(os.path.join(bench.store_dir, "records", f"{sandbox.id}.eth0.json")) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def assert_role(sandbox, role):
    rc, out, err = sandbox.caller_arn()
    assert rc == 0 and f"assumed-role/{role}/" in out, f"{sandbox}: {out} {err}"


def test_pods_running_before_iamlink_was_chained_get_their_own_roles_without_a_restart(node):
    web, batch = run_pod(node, "web"), run_pod(node, "batch")
    install_and_start(node)
    assert_role(web, "web")
    assert_role(batch, "batch")
    record = record_of(node, web)
    assert record["adopted"] is True and record["hostInterface"]["name"] == web.host_ifname, record
    rc, out, err = iamlinkd_cli(node, "explain", "team-a/web")
    assert rc == 0 and "adopted at " in out, f"rc {rc}\n{out}\n{err}"


def test_a_pod_whose_node_route_names_another_pods_interface_is_refused_never_served_its_role(node):
    web, batch = run_pod(node, "web"), run_pod(node, "batch")
    # web's address now routes to batch's veth: the route alone would hand web batch's identity.
    node.node.exec(["ip", "route", "replace", f"{web.ip}/32", "dev", batch.host_ifname])
    install_and_start(node)
    node.node.exec(["ip", "route", "replace", f"{web.ip}/32", "dev", web.host_ifname])
    assert record_of(node, web) is None
    answer = web.imds("request", "GET", CREDS_PATH, "--timeout", "5")
    assert answer.get("status") == 404, answer
    rc, out, err = web.caller_arn()
    assert rc != 0 and "assumed-role" not in out, (out, err)
    assert_role(batch, "batch")
    rc, out, err = iamlinkd_cli(node, "status", "--json")
    doc = json.loads(out)
    assert rc == 1 and [n["pod"] for n in doc["notAdopted"]] == ["team-a/web"], f"rc {rc}\n{out}\n{err}"
    reason = doc["notAdopted"][0]["reason"]
    assert batch.host_ifname in reason and "not in the pod's network namespace" in reason, reason
    assert any(p.startswith("team-a/web: running without a record, not adopted") for p in doc["problems"]), doc


def test_an_adopted_pods_del_through_the_chain_removes_its_record_and_the_next_pod_gets_its_own_role(node):
    web = run_pod(node, "web")
    install_and_start(node)
    assert_role(web, "web")
    slot = record_of(node, web)["slot"]
    node.containerd.stop_and_remove(web)
    assert record_of(node, web) is None, "the runtime's DEL, now through iamlink, removes the adopted record"
    assert not os.path.exists(os.path.join(node.store_dir, "slots", str(slot)))
    # The next pod takes the freed slot: it is served its own role, never the adopted pod's.
    late = run_pod(node, "late")
    record = record_of(node, late)
    assert record is not None and "adopted" not in record and record["slot"] == slot, record
    assert_role(late, "late")


def test_bad_runtime_cache_entries_are_skipped_with_the_file_named_and_good_ones_adopted(node):
    web = run_pod(node, "web")
    results = node.containerd.cni_results
    good = os.path.join(results, f"{node.pods.conflist['name']}-{web.id}-eth0")
    with open(good) as f:
        entry = json.load(f)
    bad = {"unparsable": "{\"kind\": \"cniCacheV1\", ",
           "no-pod-args": json.dumps(dict(entry, containerId="c0ffee01", cniArgs=[["IgnoreUnknown", "1"]])),
           "netns-gone": json.dumps(dict(entry, containerId="c0ffee02", result=dict(entry["result"], interfaces=[
               dict(i, sandbox="/nonexistent/netns/cni-gone") if i.get("sandbox") else i
               for i in entry["result"]["interfaces"]])))}
    for name, text in bad.items():
        with open(os.path.join(results, f"{node.pods.conflist['name']}-{name}-eth0"), "w") as f:
            f.write(text)
    install_and_start(node)
    assert_role(web, "web")
    log = node.daemon.log_text()
    for name in ("unparsable", "no-pod-args"):
        assert any(name in line and "skipping runtime CNI cache entry" in line for line in log.splitlines()), \
            f"no log line names {name}:\n{node.daemon.log_tail()}"
    assert any("netns-gone" in line and "not adopted" in line for line in log.splitlines()), node.daemon.log_tail()
    assert node.daemon.running, node.daemon.log_tail()


def test_a_pod_made_while_iamlink_was_out_of_the_conflist_is_adopted_while_iamlinkd_runs(node):
    install_and_start(node)
    ctd = node.containerd
    conflist = os.path.join(ctd.conf_dir, "10-iamlink.conflist")
    with open(conflist) as f:
        chained = f.read()
    # The primary plugin rewrites its conflist (aws-node restarting) before manage puts iamlink back.
    with open(conflist, "w") as f:
        json.dump(node.pods.conflist, f)
    wait_until(lambda: "iamlink" not in loaded_cni_plugins(ctd.cri), 10, "containerd to load the plain chain")
    between = run_pod(node, "between")
    with open(conflist, "w") as f:
        f.write(chained)
    # iamlinkd reads the cache on its inotify events and every 5 s (when the chain was back only after the event).
    wait_until(lambda: record_of(node, between) is not None, 15, "iamlinkd to adopt the pod made in between")
    assert record_of(node, between)["adopted"] is True
    assert_role(between, "between")

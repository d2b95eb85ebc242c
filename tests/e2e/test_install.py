"""Installing and uninstalling on a node: `iamlinkd install-cni` chains the plugin into the node's
CNI config and `iamlinkd uninstall-cni` takes it, its binary and the interception rule set away,
leaving running pods their network.

Real parts: the node network namespace with pods made through ptp + host-local + iamlink (libcni,
`cnirt`), nftables, the built binaries. The CNI config and bin directories are the bench's own
(in its work directory) standing in for /etc/cni/net.d and /opt/cni/bin.
"""

import json
import os

from harness import IAMLINK_PLUGIN, IAMLINKD
from harness.util import REFERENCE_PLUGINS


def cni_dirs(bench):
    conf_dir = os.path.join(bench.node.workdir, "net.d")
    bin_dir = os.path.join(bench.node.workdir, "cni-bin")
    os.makedirs(conf_dir, exist_ok=True)
    os.makedirs(bin_dir, exist_ok=True)
    # The primary plugin's config, as the node's CNI wrote it: the bench's own chain without iamlink.
    primary = dict(bench.pods.conflist, plugins=[p for p in bench.pods.conflist["plugins"] if p["type"] != "iamlink"])
    with open(os.path.join(conf_dir, "10-primary.conflist"), "w") as f:
        json.dump(primary, f, indent=2)
    return conf_dir, bin_dir


def iamlinkd(bench, *args):
    return bench.node.exec([IAMLINKD, "--config", bench.daemon.config_path] + list(args), check=False)


def test_install_chains_and_uninstall_removes_entry_binary_and_rule_set_but_not_the_network(make_bench):
    bench = make_bench()
    conf_dir, bin_dir = cni_dirs(bench)
    bench.daemon.reconfigure(settings={"cni": {"conf_dir": conf_dir, "bin_dir": bin_dir, "plugin_path": IAMLINK_PLUGIN}})

    p = iamlinkd(bench, "install-cni")
    assert p.returncode == 0, p.stderr
    conflist = json.load(open(os.path.join(conf_dir, "10-primary.conflist")))
    assert [x["type"] for x in conflist["plugins"]] == ["ptp", "iamlink"], conflist
    ours = conflist["plugins"][-1]
    assert ours["daemonAddress"] == "198.18.0.1:8181" and ours["storeDir"] == bench.store_dir, ours
    assert ours["capabilities"] == {"io.kubernetes.cri.pod-annotations": True}, ours
    installed = os.path.join(bin_dir, "iamlink")
    assert os.access(installed, os.X_OK)

    # A pod made by the installed config and binary gets its role; then the daemon stops and iamlink leaves.
    bench_chain = (bench.pods.conflist_path, bench.pods.bin_dirs)
    bench.pods.conflist_path = os.path.join(conf_dir, "10-primary.conflist")
    bench.pods.bin_dirs = f"{REFERENCE_PLUGINS}:{bin_dir}"
    pod = bench.pods.add("team-a", "web")
    bench.pods.conflist_path, bench.pods.bin_dirs = bench_chain  # its DEL at teardown: the bench's chain
    rc, out, err = pod.caller_arn()
    assert rc == 0 and "assumed-role/web/" in out, (out, err)
    assert bench.node.exec(["nft", "list", "table", "inet", "iamlink"], check=False).returncode == 0
    bench.daemon.stop()

    p = iamlinkd(bench, "uninstall-cni")
    assert p.returncode == 0, p.stderr
    conflist = json.load(open(os.path.join(conf_dir, "10-primary.conflist")))
    assert [x["type"] for x in conflist["plugins"]] == ["ptp"], conflist
    assert not os.path.exists(installed)
    table = bench.node.exec(["nft", "list", "table", "inet", "iamlink"], check=False)
    assert table.returncode != 0, f"the interception rule set is still there:\n{table.stdout}"
    # The pod keeps its address, routes and reachability (moto in the node answers it).
    probe = pod.exec(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5",
                      "http://198.18.0.2:5000/moto-api/data.json"])
    assert probe.returncode == 0 and probe.stdout == "200", (probe.stdout, probe.stderr)

    # Running it again finds nothing to do and says so without failing.
    again = iamlinkd(bench, "uninstall-cni")
    assert again.returncode == 0, again.stderr

"""Pods keep their roles across daemon restarts and STS outages, and lose them at DEL.

Real parts: namespaces and veths, ptp + host-local + the built iamlink plugin through libcni
(`cnirt`, with libcni's result cache, and containerd's second DEL with an empty netns and no
prevResult), the nftables interception, the built iamlinkd stopped, killed and restarted, the
unmodified AWS CLI in the pods. Emulated: STS by moto (stopping moto is the STS outage); the node's
metadata service by the fake upstream.
"""

import datetime
import os
import signal

import pytest

from conftest import add_standard_pods
from harness import is_assumed_role, parse_time

CREDS = "/latest/meta-data/iam/security-credentials/"


def assert_every_pod_has_its_role(bench, pods):
    for pod in pods.values():
        rc, out, err = pod.caller_arn()
        if pod.role:
            assert rc == 0 and is_assumed_role(out, pod.role), f"{pod}: rc {rc} {out!r} {err!r}"
        else:
            assert rc != 0 and not bench.upstream.leaked(out + err), f"{pod}: rc {rc} {out!r} {err!r}"


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_every_pod_keeps_its_role_across_a_daemon_restart(make_bench, how):
    bench = make_bench()
    pods = add_standard_pods(bench)
    assert_every_pod_has_its_role(bench, pods)
    if how == "stop":
        rc = bench.daemon.stop()
        assert rc in (0, -signal.SIGTERM), f"iamlinkd exited {rc} on SIGTERM:\n{bench.daemon.log_tail()}"
    else:
        bench.daemon.kill()
    r = pods["team-a/web"].imds("request", "GET", CREDS, "--timeout", "2")
    assert r.get("error") == "refused", f"while iamlinkd is down: {r}"
    bench.daemon.start()
    assert_every_pod_has_its_role(bench, pods)


def test_cached_credentials_are_served_while_sts_is_down(make_bench):
    bench = make_bench()
    pods = {k: p for k, p in add_standard_pods(bench).items() if p.role}
    first = {}
    for key, pod in pods.items():
        r = pod.imds("creds")
        assert r["ok"] and r["role"] == pod.role, r
        first[key] = r["creds"]
    bench.moto.stop()
    now = datetime.datetime.now(datetime.timezone.utc)
    for key, pod in pods.items():
        for mode in ([], ["--v1"]):
            r = pod.imds("creds", *mode)
            assert r["ok"], f"{pod} while STS is down {mode}: {r}"
            doc = r["creds"]
            assert doc["AccessKeyId"] == first[key]["AccessKeyId"], f"{pod}: new key while STS is down"
            assert parse_time(doc["Expiration"]) > now, f"{pod}: expired credentials served: {doc}"
    # A pod that arrives during the outage has nothing cached: it gets its own role or nothing.
    late = bench.pods.add("team-b", "late")
    r = late.imds("creds", "--timeout", "10")
    assert not bench.upstream.leaked(str(r)), r
    if r["ok"]:
        assert r["role"] == "api", r
        assert r["creds"]["AccessKeyId"] in {c["AccessKeyId"] for k, c in first.items() if k.startswith("team-b/")}, \
            f"{late} got a key nobody of its role had before the outage: {r}"


def test_del_removes_the_pods_credentials(make_bench):
    bench = make_bench()
    pods = add_standard_pods(bench)
    web, batch = pods["team-a/web"], pods["team-a/batch"]
    assert web.imds("creds")["ok"]
    records = os.path.join(bench.store_dir, "records")
    assert any(f.startswith(web.cid) for f in os.listdir(records)), os.listdir(records)

    bench.pods.delete(web, remove_netns=False)
    r = web.imds("creds", "--timeout", "2")
    assert not r["ok"], f"{web} after DEL: {r}"
    assert not any(f.startswith(web.cid) for f in os.listdir(records)), os.listdir(records)
    rules = bench.node.exec(["nft", "list", "ruleset"]).stdout
    assert web.host_ifname not in rules, rules
    # The others are untouched.
    r = batch.imds("creds")
    assert r["ok"] and r["role"] == "batch", r
    bench.node.delete_netns(web.netns)


def test_second_del_with_empty_netns_succeeds_and_touches_nobody_else(make_bench):
    bench = make_bench()
    pods = add_standard_pods(bench)
    web, batch = pods["team-a/web"], pods["team-a/batch"]
    bench.pods.delete(web)
    again = bench.pods.del_again(web)
    assert again.returncode == 0, f"second DEL: {again.stdout} {again.stderr}"
    # A second DEL arriving late for a pod whose address is now someone else's.
    replacement = bench.pods.add("team-b", "api-2")
    replacement.role = "api"
    again = bench.pods.del_again(web)
    assert again.returncode == 0, f"third DEL: {again.stdout} {again.stderr}"
    for pod in (batch, replacement):
        r = pod.imds("creds")
        assert r["ok"] and r["role"] == pod.role, (pod, r)

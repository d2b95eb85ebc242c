"""Pods keep their roles across daemon restarts and STS outages, and lose them at DEL.

Real parts: namespaces and veths, ptp + host-local + the built iamlink plugin through libcni
(`cnirt`, with libcni's result cache, and containerd's second DEL with an empty netns and no
prevResult), the nftables interception, the built iamlinkd stopped, killed and restarted, the
unmodified AWS CLI in the pods. Emulated: STS by moto (stopping moto is the STS outage); the node's
metadata service by the fake upstream.
"""

import datetime
import json
import os
import signal
import subprocess

import pytest

from conftest import add_standard_pods, record_of
from harness import PYTHON, is_assumed_role, parse_time, wait_until

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


# One keep-alive connection: token, role listing and credentials; then, after a line on stdin, on
# the same connection (never a new one: auto_open is off) what an SDK does next: the listing with
# its token, and when that fails a new token and the listing again. JSON lines out.
KEEPALIVE_CLIENT = r"""
import http.client, json, sys
c = http.client.HTTPConnection("169.254.169.254", 80, timeout=5)
c.auto_open = 0
def ask(method, path, headers):
    try:
        c.request(method, path, headers=headers)
        r = c.getresponse()
        return {"status": r.status, "body": r.read().decode()}
    except Exception as e:
        return {"error": type(e).__name__, "detail": str(e)}
c.connect()
port = c.sock.getsockname()[1]
token = ask("PUT", "/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "300"})
h = {"X-aws-ec2-metadata-token": token.get("body", "")}
listing = ask("GET", CREDS, h)
creds = ask("GET", CREDS + listing.get("body", "").strip(), h)
print(json.dumps({"port": port, "token": token, "listing": listing, "creds": creds}), flush=True)
sys.stdin.readline()
out = {"listing": ask("GET", CREDS, h)}
if out["listing"].get("status") != 200:
    out["new token"] = ask("PUT", "/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "300"})
    h = {"X-aws-ec2-metadata-token": out["new token"].get("body", "")}
    out["listing with the new token"] = ask("GET", CREDS, h)
for k in ("listing", "listing with the new token"):
    if out.get(k, {}).get("status") == 200:
        out["creds"] = ask("GET", CREDS + out[k]["body"].strip(), h)
        break
print(json.dumps(out), flush=True)
""".replace("CREDS", repr(CREDS))


def test_keep_alive_connection_held_across_its_slots_reuse_is_never_answered_for_the_new_pod(make_bench):
    """web holds a keep-alive connection while its record goes and batch takes the same slot; web's
    interface is still up (iamlink's DEL ran, ptp's not yet), so the connection still carries
    requests: they must get no credentials, never batch's."""
    bench = make_bench()
    web = bench.pods.add("team-a", "web")
    client = bench.node.spawn([PYTHON, "-c", KEEPALIVE_CLIENT], netns=web.netns, env=web.env(), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = json.loads(client.stdout.readline())
    assert first["listing"] == {"status": 200, "body": "web"}, first
    assert is_assumed_role(bench.moto.caller_arn(json.loads(first["creds"]["body"])), "web"), first
    slot = record_of(bench, web)["slot"]

    gone = bench.pods.del_iamlink_only(web)
    assert gone.returncode == 0, f"{gone.stdout} {gone.stderr}"
    batch = bench.pods.add("team-a", "batch")
    assert record_of(bench, batch)["slot"] == slot, "the lowest free slot, web's, was not reused"
    mine = batch.imds("creds")
    assert mine["ok"] and mine["role"] == "batch", mine
    # web's path to the node still works: a new connection arrives without identity (404).
    fresh = web.imds("request", "GET", CREDS, "--timeout", "2")
    assert fresh.get("status") == 404, f"{web} after its iamlink DEL, new connection: {fresh}"

    out, err = client.communicate(input=b"\n", timeout=20)
    second = json.loads(out.decode().strip().splitlines()[-1])
    listings = [second[k] for k in ("listing", "listing with the new token") if k in second]
    assert all(r.get("status") != 200 for r in listings) and "creds" not in second, (
        f"{web}'s connection from before {batch} took slot {slot} was answered: {second} {err!r}")
    assert not bench.upstream.leaked(out.decode()), second
    bench.pods.delete(web)
    mine = batch.imds("creds")
    assert mine["ok"] and mine["role"] == "batch", f"{batch} after web's full DEL: {mine}"


def test_connection_waiting_in_the_accept_queue_across_its_slots_reuse_is_never_answered_for_the_new_pod(make_bench):
    """web's connection completes its handshake and sends its request while iamlinkd is slow to
    accept (stopped here with SIGSTOP: the kernel still completes handshakes into the listen
    queue); web's record goes and batch takes the same slot before iamlinkd accepts."""
    bench = make_bench()
    web = bench.pods.add("team-a", "web")
    slot = record_of(bench, web)["slot"]
    pid = bench.daemon.proc.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        client = bench.node.spawn([PYTHON, "-c", KEEPALIVE_CLIENT.replace("timeout=5", "timeout=30")],
                                  netns=web.netns, env=web.env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE)
        wait_until(lambda: bench.node.exec(["ss", "-tnH", "state", "established", "sport", "= :8181"]).stdout.strip(),
                   10, "web's connection in iamlinkd's listen queue")
        gone = bench.pods.del_iamlink_only(web)
        assert gone.returncode == 0, f"{gone.stdout} {gone.stderr}"
        batch = bench.pods.add("team-a", "batch")
        assert record_of(bench, batch)["slot"] == slot, "the lowest free slot, web's, was not reused"
    finally:
        os.kill(pid, signal.SIGCONT)
    first = json.loads(client.stdout.readline())
    assert first["listing"].get("status") != 200 and first["creds"].get("status") != 200, (
        f"{web}'s connection, established before {batch} took slot {slot}, was answered: {first}")
    client.stdin.close()

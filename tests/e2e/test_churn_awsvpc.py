"""Churn behind aws-vpc-cni: a StatefulSet pod recreated again and again gets the same host
interface name each time, its old incarnation's DEL arrives after the new one's ADD, addresses are
reused, and the role alternates between incarnations. Every answer carries the asking
incarnation's role; the late DEL never takes the new incarnation's identity away.

Real parts: namespaces and veths, libcni (`cnirt`) driving a 0.4.0 chain with its result cache
(DEL in reverse order with the cached result), the reference host-local IPAM (a three-address
range: an address is reused once its holder's late DEL released it), the built iamlink plugin and
iamlinkd, the nftables interception, the pod's annotations passed by the runtime as containerd
does (capability io.kubernetes.cri.pod-annotations).
Emulated: aws-vpc-cni's plumbing by tests/harness/aws_vpc_cni_shaped.py (host interface "eni" +
sha1(namespace.name)[:11], a leftover of that name deleted by the next ADD, /32 address, default
route via 169.254.1.1 with a static ARP entry, aws-vpc-cni's result shape), ipamd by host-local;
STS by moto (every AccessKeyId answered is resolved with moto's get-caller-identity using its own
credentials); the Kubernetes API is configured but unreachable, so each incarnation's role is its
runtime annotation `iam.amazonaws.com/role` (iamlinkd serves it unchecked until it has listed
namespaces). The clients are the stdlib IMDSv2 loop (tests/harness/imds_client.py), one per pod.
"""

import hashlib
import json
import os
import time

from harness import PYTHON, role_of_arn, wait_until
from harness.util import IMDS_CLIENT, stop_process

ROLES = ["churn-a", "churn-b"]        # alternating between incarnations
NAMESPACE, NAME = "team-s", "db-0"    # one StatefulSet pod, recreated
INCARNATIONS = 30
LIFETIME = 0.5                        # seconds an incarnation asks after its predecessor's DEL, at most
DEADLINE = 150                        # seconds for the whole churn, whatever happens


def eni_name(namespace, name):
    return "eni" + hashlib.sha1(f"{namespace}.{name}".encode()).hexdigest()[:11]


class Incarnation:
    def __init__(self, bench, n):
        self.role = ROLES[n % 2]
        self.pod = bench.pods.add(NAMESPACE, NAME, annotations={"iam.amazonaws.com/role": self.role})
        self.client = self.pod.spawn([PYTHON, IMDS_CLIENT, "loop", "--timeline", "--seconds", "60", "--timeout", "2"])
        self.replaced_at = None       # monotonic time the next incarnation's ADD began
        self.summary = None


def finish(bench, inc):
    """Stops the incarnation's client and keeps its summary; removes its namespace."""
    stop_process(inc.client, timeout=10)
    out, err = inc.client.communicate(timeout=10)
    bench.node.forget(inc.client)
    bench.node.delete_netns(inc.pod.netns)
    try:
        inc.summary = json.loads(out)
    except ValueError:
        raise AssertionError(f"client in {inc.pod} printed no summary: stdout {out!r} stderr {err!r}")


def records(bench):
    return sorted(os.listdir(os.path.join(bench.store_dir, "records")))


def test_recreated_pod_with_the_same_interface_name_and_a_late_del_never_gets_another_role(make_bench, bench_report):
    bench = make_bench(
        pod_roles=[], kubernetes={}, kube_api_up=False,
        # One client loop asks ~900 times a second, above the per-pod rate: 429s are not this test's subject.
        daemon_settings={"limits": {"requests_per_second": 0}},
        pods_options={"chain": "aws-vpc-cni", "subnet": "198.18.64.0/29",
                      "range_start": "198.18.64.2", "range_end": "198.18.64.4"},
    )
    for role in ROLES:
        bench.moto.create_role(role)
    start = time.monotonic()
    done, old, late_del_done = [], None, {}
    while len(done) + (old is not None) < INCARNATIONS and time.monotonic() - start < DEADLINE:
        if old is not None:
            old.replaced_at = time.monotonic()
        new = Incarnation(bench, len(done) + (old is not None))
        assert new.pod.host_ifname == eni_name(NAMESPACE, NAME), new.pod.result
        if old is not None:
            # The old sandbox's DEL arrives after the new ADD, with the old container ID.
            bench.pods.delete(old.pod, remove_netns=False)
            late_del_done[id(new)] = time.monotonic()
            assert records(bench) == [f"{new.pod.cid}.eth0.json"], records(bench)
            finish(bench, old)
            done.append(old)
        # The new incarnation asks for a while (bounded) with its predecessor's DEL behind it.
        wait_until(lambda: new.client.poll() is not None or time.monotonic() - late_del_done.get(id(new), start) >= LIFETIME,
                   LIFETIME + 5, "the incarnation's lifetime", interval=0.05)
        old = new
    old.replaced_at = time.monotonic()
    bench.pods.delete(old.pod, remove_netns=False)
    finish(bench, old)
    done.append(old)
    elapsed = time.monotonic() - start

    wrong, broken, quiet = [], [], []
    key_role, address_roles = {}, {}
    for inc in done:
        s, pod = inc.summary, inc.pod
        address_roles.setdefault(pod.ip, set()).add(inc.role)
        for akid, entry in s["keys"].items():
            for listed, n in entry["roles"].items():
                if listed != inc.role:
                    wrong.append((pod.cid[:8], inc.role, f"listing {listed!r} key {akid}", n))
            if key_role.setdefault(akid, (inc.role, entry["creds"]))[0] != inc.role:
                wrong.append((pod.cid[:8], inc.role, f"key {akid} also served to {key_role[akid][0]}", 1))
        # Until its successor's ADD began, every request of this incarnation was answered with credentials.
        # (A timeline run is [first, last, outcome, count]; times are when requests ended.)
        before = [run for run in s["timeline"] if run[0] < inc.replaced_at]
        bad = [run for run in before if run[2] != "ok"]
        if bad:
            broken.append((pod.cid[:8], inc.role, bad))
        since_late_del = late_del_done.get(id(inc))
        if since_late_del is not None and not any(run[2] == "ok" and run[1] >= since_late_del for run in before):
            quiet.append((pod.cid[:8], inc.role))
    for akid, (role, creds) in key_role.items():
        arn = bench.moto.caller_arn(creds)
        if role_of_arn(arn) != role:
            wrong.append(("?", role, f"key {akid} is {arn}", 1))

    answers = sum(inc.summary["answers"] for inc in done)
    reused = {ip: sorted(r) for ip, r in address_roles.items() if len(r) >= 2}
    summary = (f"{len(done)} incarnations of {NAMESPACE}/{NAME} on {eni_name(NAMESPACE, NAME)} in {elapsed:.1f}s, "
               f"{answers} answers, {len(key_role)} keys, {len(wrong)} wrong, addresses {address_roles}")
    bench_report(f"churn behind aws-vpc-cni: {summary}")
    assert not wrong, f"wrong answers: {wrong[:20]}\n{summary}"
    assert len(done) == INCARNATIONS, summary
    assert not broken, f"incarnations not answered while they were the pod: {broken[:10]}\n{summary}"
    assert not quiet, f"incarnations never answered after their predecessor's late DEL: {quiet[:10]}\n{summary}"
    assert reused, f"no address served both roles: {summary}"

"""IP reuse under churn: an answer always carries the asking pod's role, never a former
holder's of the same address, never the node's.

Real parts: namespaces and veths, ptp + host-local + the built iamlink plugin through libcni
(`cnirt`), the nftables interception, the built iamlinkd; host-local's range is six addresses so
every address is handed to a new pod (often of another role) within seconds of its release.
Emulated: STS by moto (every distinct AccessKeyId answered is resolved once with moto's
get-caller-identity using that key's own credentials), the node's metadata service by the fake
upstream. The clients are a small stdlib IMDSv2 client (tests/harness/imds_client.py), one per
pod, instead of an SDK, so that one machine can make >10,000 answers in well under a minute.
"""

import collections
import concurrent.futures
import json
import os
import random
import time

from harness import PYTHON, role_of_arn
from harness.util import IMDS_CLIENT, stop_process

ROLES = ["churn-a", "churn-b", "churn-c"]
NAMESPACES = ROLES + ["churn-none"]  # churn-none has no role entry and no default: no credentials
LIVE_PODS = 4          # of the 6 addresses in the range
MIN_PODS = 80          # pods made, at least
MIN_LIFETIME = 0.5     # seconds a pod's client asks, at least, before the pod goes
TARGET_ANSWERS = 12000
DEADLINE = 150         # seconds for the churn phase, whatever happens
CLIENT_SECONDS = 60    # each client stops by itself after this
SEED = int(os.environ.get("IAMLINK_CHURN_SEED", "1"))  # which namespace each new pod is in


class Churn:
    def __init__(self, bench):
        self.bench = bench
        self.live = collections.deque()
        self.done = []  # (pod, expected role or None, summary, deleted_while_asking)
        self.made = 0
        self.rng = random.Random(SEED)
        self.answers = 0
        self.slowest_stop = 0.0

    def create(self, ns, name):
        pod = self.bench.pods.add(ns, name)
        pod.role = ns if ns in ROLES else None
        client = pod.spawn([PYTHON, IMDS_CLIENT, "loop", "--seconds", str(CLIENT_SECONDS), "--timeout", "5"])
        return pod, client, time.monotonic()

    def retire(self, old):
        pod, client, born = old
        remaining = born + MIN_LIFETIME - time.monotonic()
        if remaining > 0 and client.poll() is None:
            try:
                client.wait(timeout=remaining)  # the pod lives its minimum lifetime (bounded)
            except Exception:
                pass
        # Every other pod loses its network while its client is still asking, the rest after.
        del_first = int(pod.name.rsplit("-", 1)[1]) % 2 == 0
        if del_first:
            self.bench.pods.delete(pod, remove_netns=False)
        t = time.monotonic()
        stop_process(client, timeout=10)
        self.slowest_stop = max(self.slowest_stop, time.monotonic() - t)
        out, err = client.communicate(timeout=10)
        self.bench.node.forget(client)
        if not del_first:
            self.bench.pods.delete(pod, remove_netns=False)
        self.bench.node.delete_netns(pod.netns)
        try:
            summary = json.loads(out)
        except ValueError:
            raise AssertionError(f"client in {pod} printed no summary: stdout {out!r} stderr {err!r}")
        self.answers += summary["answers"]
        self.done.append((pod, pod.role, summary, del_first))

    def run(self):
        """Each step makes a pod while (in parallel) the oldest goes: ADD and DEL overlap."""
        start = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            while (self.made < MIN_PODS or self.answers < TARGET_ANSWERS) and time.monotonic() - start < DEADLINE:
                ns = self.rng.choice(NAMESPACES)
                new = pool.submit(self.create, ns, f"pod-{self.made}")
                self.made += 1
                try:
                    if len(self.live) >= LIVE_PODS:
                        self.retire(self.live.popleft())
                finally:
                    self.live.append(new.result())
        while self.live:
            self.retire(self.live.popleft())
        return time.monotonic() - start


def test_ip_reuse_under_churn_never_serves_another_pods_role(make_bench, bench_report):
    bench = make_bench(
        pod_roles=[{"namespace": r, "role": r} for r in ROLES],
        pods_options={"subnet": "198.18.64.0/29", "range_start": "198.18.64.2", "range_end": "198.18.64.7"},
    )
    churn = Churn(bench)
    elapsed = churn.run()

    wrong = []              # (pod, expected, what it got, count)
    missing = 0             # answers without credentials to pods that have a role
    errors = collections.Counter()
    key_owner = {}          # AccessKeyId -> (pod, expected role, credentials)
    ip_roles = collections.defaultdict(set)
    for pod, expected, s, del_first in churn.done:
        ip_roles[pod.ip].add(expected or "<none>")
        if not del_first:
            errors.update(s["errors"])
            errors.update(s["statuses"])
        if expected is None:
            for akid, entry in s["keys"].items():
                wrong.append((pod.key, None, f"{entry['roles']} key {akid}", sum(entry["roles"].values())))
            continue
        if not del_first:  # between the plugin's DEL and ptp's, "no role" is the right answer
            missing += s["no_credentials"]
        for akid, entry in s["keys"].items():
            for listed, n in entry["roles"].items():
                if listed != expected:
                    wrong.append((pod.key, expected, f"listing {listed!r} key {akid}", n))
            if akid in key_owner and key_owner[akid][1] != expected:
                wrong.append((pod.key, expected, f"key {akid} also served to {key_owner[akid][0]}", 1))
            key_owner.setdefault(akid, (pod.key, expected, entry["creds"]))

    # Each distinct key, resolved once by STS with its own credentials.
    for akid, (podkey, expected, creds) in key_owner.items():
        arn = bench.moto.caller_arn(creds)
        if role_of_arn(arn) != expected:
            wrong.append((podkey, expected, f"key {akid} is {arn}", 1))

    reused = {ip: roles for ip, roles in ip_roles.items() if len(roles) >= 2}
    summary = (f"{churn.made} pods in {elapsed:.1f}s, {churn.answers} answers, {len(key_owner)} keys, "
               f"slowest client stop {churn.slowest_stop:.2f}s, {len(wrong)} wrong, {missing} without credentials for pods with a role, errors {dict(errors)}, "
               f"addresses {dict((ip, sorted(r)) for ip, r in ip_roles.items())}")
    bench_report(f"churn (seed {SEED}): {summary}")
    assert not wrong, f"wrong answers: {wrong[:20]}\n{summary}"
    assert churn.answers >= 10000, summary
    assert reused, f"no address served pods of different roles: {summary}"
    assert missing == 0, f"pods with a role were told they have none: {summary}"
    assert sum(errors.values()) <= churn.answers // 100, f"too many failed requests: {summary}"

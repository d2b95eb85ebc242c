"""iamlinkd SIGKILLed twice while pods of different roles keep asking: every answer that
succeeds is the asking pod's own role, never the node's; while iamlinkd is down the pods'
connections are refused (they get no other answer); they are answered again once it is back;
and the pod store is exactly as it was.

Real parts: namespaces and veths, ptp + host-local + the built iamlink plugin through libcni
(`cnirt`), the nftables interception (which stays in place while iamlinkd is dead, so pods meet
a closed port, never the real metadata service), the built iamlinkd killed with SIGKILL and
started again, the pod store on disk. Emulated: STS by moto (each distinct AccessKeyId answered
is resolved with moto's get-caller-identity using its own credentials), the node's metadata
service by the fake upstream. The clients are the churn test's stdlib IMDSv2 loop
(tests/harness/imds_client.py), one per pod, recording the time of every outcome so that each can
be placed before, during or after an outage.
"""

import collections
import json
import os
import time

from conftest import add_standard_pods
from harness import PYTHON, role_of_arn, wait_until
from harness.netns_threads import NetnsThreads
from harness.rawhttp import request
from harness.util import IMDS_CLIENT, stop_process

KILLS = 2
OUTAGE = 1.5        # seconds iamlinkd stays dead while the pods keep asking
AROUND_KILL = 0.5   # after SIGKILL, requests that were in flight may end in any error
CLIENT_SECONDS = 60  # each client stops by itself after this, whatever happens


def store_state(store_dir):
    """Every record's bytes and every slot link's target."""
    records = os.path.join(store_dir, "records")
    slots = os.path.join(store_dir, "slots")
    return ({n: open(os.path.join(records, n), "rb").read() for n in sorted(os.listdir(records))},
            {n: os.readlink(os.path.join(slots, n)) for n in sorted(os.listdir(slots))})


def answered_since(bench, pod, marker, n=10):
    """True once iamlinkd's log, after `marker`, shows `n` answers to `pod` (credentials, or
    "no role" for a pod without one): its client is being answered."""
    text = bench.daemon.log_text()
    tail = text[text.rfind(marker):]
    want = 'outcome="credentials served"' if pod.role else 'outcome="no role"'
    return sum(f"pod={pod.key} " in line and want in line for line in tail.splitlines()) >= n


def refused(threads):
    return threads.call(request, "GET", "/latest/meta-data/iam/security-credentials/", timeout=2).error == "refused"


def test_every_answer_stays_the_pods_own_across_sigkill_and_restart(make_bench, bench_report):
    bench = make_bench()
    pods = add_standard_pods(bench)
    before = store_state(bench.store_dir)
    clients = {key: pod.spawn([PYTHON, IMDS_CLIENT, "loop", "--seconds", str(CLIENT_SECONDS), "--timeout", "3",
                               "--timeline"]) for key, pod in pods.items()}
    outages = []  # (killed, dead, restarting, up)
    threads = {key: NetnsThreads(pod.netns) for key, pod in pods.items()}
    try:
        for pod in pods.values():
            wait_until(lambda: answered_since(bench, pod, "---- iamlinkd start #1"), 15,
                       f"{pod}'s client to be answered")
        for n in range(KILLS):
            killed = time.monotonic()
            bench.daemon.kill()
            dead = time.monotonic()
            for t in threads.values():
                wait_until(lambda: refused(t), 5, f"{t.name} to be refused while iamlinkd is dead")
            # iamlinkd stays down for OUTAGE seconds in all: the load phase the clients live through.
            wait_until(lambda: time.monotonic() - dead >= OUTAGE, OUTAGE + 1, "the end of the outage")
            restarting = time.monotonic()
            bench.daemon.start()
            up = time.monotonic()
            outages.append((killed, dead, restarting, up))
            for pod in pods.values():
                wait_until(lambda: answered_since(bench, pod, f"---- iamlinkd start #{n + 2}"), 15,
                           f"{pod}'s client to be answered after restart #{n + 1}")
    finally:
        for t in threads.values():
            t.close()
        summaries = {}
        for key, client in clients.items():
            stop_process(client, timeout=10)
            out, err = client.communicate(timeout=10)
            bench.node.forget(client)
            summaries[key] = (out.decode("utf-8", "replace"), err.decode("utf-8", "replace"))

    wrong, keys, lines = [], {}, []
    for key, (out, err) in summaries.items():
        pod = pods[key]
        assert not bench.upstream.leaked(out), f"{pod} was given the node's identity: {out[:500]}"
        try:
            s = json.loads(out)
        except ValueError:
            raise AssertionError(f"client in {pod} printed no summary: stdout {out[:500]!r} stderr {err[-2000:]!r}")
        for akid, entry in s["keys"].items():
            for listed, count in entry["roles"].items():
                if listed != pod.role:
                    wrong.append((key, f"listed {listed!r} x{count} with key {akid}"))
            if akid in keys and keys[akid][0] != key:
                wrong.append((key, f"key {akid} also served to {keys[akid][0]}"))
            keys.setdefault(akid, (key, entry["creds"]))
        if pod.role is None:
            assert not s["keys"], f"{pod} has no role but got credentials: {list(s['keys'])}"

        timeline = s["timeline"]
        outcomes = collections.Counter()
        for first, last, outcome, count in timeline:
            outcomes[outcome] += count
            for killed, dead, restarting, up in outages:
                inside = first < restarting and last > dead + AROUND_KILL
                if inside and outcome != "refused":
                    wrong.append((key, f"{outcome} x{count} at {first - killed:.2f}-{last - killed:.2f}s after "
                                       f"SIGKILL, while iamlinkd was dead"))
            # Allowed besides answers and refusals: a request cut by the kill, and the one 401 of
            # a token issued by the killed iamlinkd (tokens die with the process).
            cut_by_kill = any(killed <= first and last <= dead + AROUND_KILL for killed, dead, _, _ in outages)
            after_restart = any(restarting <= first <= up + 5 for _, _, restarting, up in outages)
            if outcome not in ("ok", "no-credentials", "refused") and not cut_by_kill and \
                    not (outcome == "listing-401" and after_restart):
                wrong.append((key, f"{outcome} x{count} at {first:.2f} outside any outage"))
        for i, (killed, dead, restarting, up) in enumerate(outages):
            saw_refused = any(o == "refused" and f < restarting and l > dead for f, l, o, _ in timeline)
            assert saw_refused, f"{pod} was never refused during outage #{i + 1}: {timeline}"
            answer = "ok" if pod.role else "no-credentials"
            resumed = [f for f, _, o, _ in timeline if o == answer and f >= restarting]
            assert resumed, f"{pod} got no answer after restart #{i + 1}"
        lines.append(f"{key}: {dict(outcomes)}")

    for akid, (key, creds) in keys.items():
        arn = bench.moto.caller_arn(creds)
        if role_of_arn(arn) != pods[key].role:
            wrong.append((key, f"key {akid} belongs to {arn}"))

    resumed_after = [f"{min(f for f, _, o, _ in json.loads(summaries[k][0])['timeline'] if o == 'ok' and f >= r) - r:.2f}s"
                     for k in pods if pods[k].role for _, _, r, _ in outages]
    bench_report(f"kill under load: {KILLS} SIGKILLs, outages {[round(r - d, 2) for _, d, r, _ in outages]}s, "
                 f"{len(keys)} keys, first answers after restart {resumed_after}; " + "; ".join(lines))
    assert not wrong, f"wrong answers: {wrong[:20]}"
    assert store_state(bench.store_dir) == before, "the pod store changed across the kills"

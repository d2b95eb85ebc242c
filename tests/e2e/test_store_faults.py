"""A damaged, vanished or read-only pod store never makes iamlinkd crash or guess who is asking:
the pods behind what it cannot read get no credentials, everyone else is unaffected.

Real parts: namespaces and veths, ptp + host-local + the built iamlink plugin through libcni
(`cnirt`), the nftables interception, the built iamlinkd and the store directory it shares with
the plugin; requests come from sockets opened inside the pods' namespaces. The damage is done
by hand, as a crash, a bug or an operator would leave it: record files truncated or overwritten
with garbage, slot links pointing at the wrong record, a pod's namespace deleted without a CNI
DEL (its veth disappears with it), the whole store removed, and a read-only store made by a
read-only bind mount inside a private mount namespace of iamlinkd's own (root ignores `chmod`,
and nothing may change the host's mounts).
Emulated: STS by moto (behind the counting proxy of test_sts_faults where calls are counted),
the node's metadata service by the fake upstream.
"""

import json
import os
import re
import shutil
import time

from harness import IAMLINKD, is_assumed_role, wait_until
from harness.netns_threads import NetnsThreads
from harness.rawhttp import request
from harness.sts_faults import StsFaultProxy

CREDS = "/latest/meta-data/iam/security-credentials/"
ROLES = [{"namespace": "team-a", "role": "web"}, {"namespace": "team-b", "role": "batch"}]


def creds_answer(pod, role):
    """(listing reply, credentials reply) from inside the pod."""
    with NetnsThreads(pod.netns) as t:
        return t.call(request, "GET", CREDS), t.call(request, "GET", CREDS + role)


def assert_gets_own_role(bench, pod, role):
    listing, answer = creds_answer(pod, role)
    assert listing.status == 200 and listing.text.strip() == role, f"{pod} listing: {listing}"
    assert answer.status == 200, f"{pod} credentials: {answer}"
    arn = bench.moto.caller_arn(json.loads(answer.body))
    assert is_assumed_role(arn, role), f"{pod} got credentials of {arn}"


def assert_gets_no_identity(bench, pod, others):
    """No answer to `pod` names a role or carries credentials (its own, another pod's, the node's)."""
    paths = (CREDS, CREDS + "web", CREDS + "batch", "/v1/credentials", "/latest/meta-data/iam/info")
    container = {"/v1/credentials": {"addr": ("169.254.170.23", 80), "headers": [("Authorization", "t")]}}
    with NetnsThreads(pod.netns) as t:
        replies = [t.call(request, "GET", path, **container.get(path, {})) for path in paths]
    for path, r in zip(paths, replies):
        assert r.status is not None and r.status >= 400, f"{pod} {path}: {r}"
        assert not bench.upstream.leaked(r.text), f"{pod} {path} leaked the node's identity: {r}"
        for key in others:
            assert key not in r.text, f"{pod} {path} got another pod's key: {r}"
    return replies


def write_over(path, data):
    with open(path, "wb") as f:
        f.write(data)


def record_path(bench, pod):
    return os.path.join(bench.store_dir, "records", f"{pod.cid}.eth0.json")


def test_unreadable_records_are_logged_and_their_pods_get_no_credentials(make_bench):
    bench = make_bench(pod_roles=ROLES)
    good = bench.pods.add("team-a", "good")
    truncated = bench.pods.add("team-a", "truncated")
    garbage = bench.pods.add("team-b", "garbage")
    _, good_creds = creds_answer(good, "web")
    assert good_creds.status == 200, good_creds
    good_key = json.loads(good_creds.body)["AccessKeyId"]

    data = open(record_path(bench, truncated), "rb").read()
    write_over(record_path(bench, truncated), data[:len(data) // 2])
    write_over(record_path(bench, garbage), bytes(range(256)) * 2)
    stray = os.path.join(bench.store_dir, "records", "stray.eth0.json")
    write_over(stray, b"\x00garbage\xff" * 10)
    os.symlink("../records/stray.eth0.json", os.path.join(bench.store_dir, "slots", "77"))

    statuses = set()
    for pod in (truncated, garbage):
        statuses |= {r.status for r in assert_gets_no_identity(bench, pod, [good_key])}
    assert bench.daemon.running, bench.daemon.log_tail()
    for path in (record_path(bench, truncated), record_path(bench, garbage), stray):
        wait_until(lambda: os.path.basename(path) in bench.daemon.log_text(), 5,
                   f"iamlinkd's log to name the unreadable record {path}")
    assert_gets_own_role(bench, good, "web")
    late = bench.pods.add("team-b", "late")
    assert_gets_own_role(bench, late, "batch")
    assert bench.daemon.running
    assert statuses == {404}, f"a pod behind an unreadable record gets {sorted(statuses)}, not 404"


def test_slot_link_to_another_pods_record_is_not_trusted(make_bench):
    bench = make_bench(pod_roles=ROLES)
    web = bench.pods.add("team-a", "web")
    batch = bench.pods.add("team-b", "batch")
    slots = os.path.join(bench.store_dir, "slots")
    web_slot = next(s for s in os.listdir(slots) if os.readlink(os.path.join(slots, s)).startswith(f"../records/{web.cid}"))
    tmp = os.path.join(slots, ".relink")
    os.symlink(f"../records/{batch.cid}.eth0.json", tmp)
    os.rename(tmp, os.path.join(slots, web_slot))
    listing, answer = creds_answer(web, "batch")
    assert listing.status != 200 and answer.status != 200, \
        f"{web} was answered as team-b/batch: listing {listing}, credentials {answer}"


def slot_of(bench, pod):
    with open(record_path(bench, pod)) as f:
        return json.load(f)["slot"]


def pods_map(bench):
    """The rule set's pods map: [(host interface, slot)], one pair per element."""
    text = bench.node.exec(["nft", "list", "map", "inet", "iamlink", "pods"]).stdout
    return [(name, int(slot)) for name, slot in re.findall(r'"([^"]+)" : jump slot-(\d+)', text)]


def crash_before_slot_link(bench, pod):
    """What ADD killed after writing its record and before linking its slot leaves: the record,
    and no slot link, element or slot chain. Returns the slot. Made with iamlinkd stopped (a
    node coming back), since a running one repairs the rule set within milliseconds."""
    slot = slot_of(bench, pod)
    bench.daemon.stop()
    os.remove(os.path.join(bench.store_dir, "slots", str(slot)))
    bench.node.exec(["nft", "-f", "-"], input=f'delete element inet iamlink pods {{ "{pod.host_ifname}" }}\n'
                                              f"delete chain inet iamlink slot-{slot}\n")
    return slot


def iamlinkd_cli(bench, *args):
    return bench.node.exec([IAMLINKD, "--config", bench.daemon.config_path] + list(args), check=False)


def test_add_repeated_after_a_crash_before_its_slot_link_never_lends_its_role_to_the_slots_new_holder(make_bench):
    """ADD(A) killed after writing its record and before linking its slot (iamlinkd down
    meanwhile, as on a node coming back); ADD(B) takes that slot, free by the links; the runtime
    repeats ADD(A). B gets B's role only, A gets A's, and iamlinkd's guard keeps one element per
    slot, each its holder's."""
    bench = make_bench(pod_roles=ROLES)
    a = bench.pods.add("team-a", "a")
    slot = crash_before_slot_link(bench, a)
    b = bench.pods.add("team-b", "b")
    assert slot_of(bench, b) == slot, "B takes the slot that no link names"
    again = bench.pods.add_iamlink_again(a)
    assert again.returncode == 0 and json.loads(again.stdout) == a.result, (again.stdout, again.stderr)
    bench.daemon.start()

    assert_gets_own_role(bench, b, "batch")
    _, web_for_b = creds_answer(b, "web")
    assert web_for_b.status == 404, f"{b} asked for A's role: {web_for_b}"
    assert_gets_own_role(bench, a, "web")
    a_slot = slot_of(bench, a)
    assert a_slot != slot, f"the repeated ADD of A kept slot {slot}, which B holds"
    # iamlinkd's guard, which repaired the rule set from the store at start, keeps one element
    # per slot, each its holder's.
    wait_until(lambda: sorted(pods_map(bench)) == sorted([(a.host_ifname, a_slot), (b.host_ifname, slot)]), 5,
               f"the pods map to hold exactly A's and B's elements: {pods_map(bench)}")
    status = iamlinkd_cli(bench, "status", "--json")
    doc = json.loads(status.stdout)
    assert status.returncode == 0 and doc["problems"] == [], doc
    assert doc["records"] == 2 and doc["interceptionEntries"] == 2, doc


def test_a_record_whose_slot_went_to_another_pod_gets_no_element_is_explained_and_its_del_leaves_that_pod_alone(
        make_bench):
    bench = make_bench(pod_roles=ROLES)
    a = bench.pods.add("team-a", "a")
    slot = crash_before_slot_link(bench, a)
    b = bench.pods.add("team-b", "b")
    assert slot_of(bench, b) == slot, "B takes the slot that no link names"
    bench.daemon.start()

    # The guard gives A's record no element: A's packets carry no slot, never B's.
    assert pods_map(bench) == [(b.host_ifname, slot)], pods_map(bench)
    listing, _ = creds_answer(a, "batch")
    assert listing.status == 404 and "batch" not in listing.text, f"{a} is answered as team-b/b: {listing}"
    assert_gets_own_role(bench, b, "batch")

    explained = iamlinkd_cli(bench, "explain", a.key)
    holder = f"team-b/b (container {b.cid})"
    assert explained.returncode == 1, explained
    assert f"(slot {slot}, HELD BY {holder}, created" in explained.stdout, explained.stdout
    assert f"slot {slot} held by {holder}, not this record" in explained.stdout, explained.stdout
    assert "the runtime's repeated ADD gives it a free slot" in explained.stdout, explained.stdout
    status = iamlinkd_cli(bench, "status", "--json")
    doc = json.loads(status.stdout)
    assert status.returncode == 1 and doc["recordsWithoutEntry"] == 0, doc
    assert [p for p in doc["problems"] if p.startswith(f"{a.key}: slot {slot} held by {holder}")], doc

    # A's DEL removes A's record and nothing of B's.
    bench.pods.delete(a)
    assert not os.path.exists(record_path(bench, a))
    assert os.readlink(os.path.join(bench.store_dir, "slots", str(slot))) == f"../records/{b.cid}.eth0.json"
    assert pods_map(bench) == [(b.host_ifname, slot)], pods_map(bench)
    assert_gets_own_role(bench, b, "batch")
    status = iamlinkd_cli(bench, "status", "--json")
    assert status.returncode == 0 and json.loads(status.stdout)["problems"] == [], status.stdout


def test_store_removed_under_a_running_node_never_lends_a_new_pods_identity(make_bench):
    bench = make_bench(pod_roles=ROLES)
    old = bench.pods.add("team-a", "old")
    assert_gets_own_role(bench, old, "web")
    shutil.rmtree(bench.store_dir)
    assert_gets_no_identity(bench, old, [])
    new = bench.pods.add("team-b", "new")
    assert_gets_own_role(bench, new, "batch")
    listing, answer = creds_answer(old, "batch")
    assert listing.status != 200 and answer.status != 200, \
        f"{old} (record removed) is answered as {new.key}: listing {listing}, credentials {answer}"


def test_pod_whose_interface_vanished_without_del_breaks_nothing_and_is_not_prefetched(make_bench):
    bench = make_bench(pod_roles=ROLES, start_daemon=False)
    proxy = StsFaultProxy(bench.node, bench.moto)
    bench.callback(proxy.stop)
    bench.daemon.sts["endpoint"] = proxy.endpoint
    bench.daemon.start()
    live = bench.pods.add("team-a", "live")
    gone = bench.pods.add("team-b", "gone")
    assert_gets_own_role(bench, gone, "batch")

    bench.node.delete_netns(gone.netns)  # the sandbox dies; the runtime has not sent DEL yet
    wait_until(lambda: "host interface gone" in bench.daemon.log_text() and "team-b/gone" in bench.daemon.log_text(),
               5, "iamlinkd to notice that team-b/gone's interface is gone")
    assert bench.daemon.running
    assert_gets_own_role(bench, live, "web")
    assert os.path.exists(record_path(bench, gone)), "the record stays until DEL"

    # After a restart, only pods that can still connect are prefetched.
    restarted = time.monotonic()
    bench.daemon.restart()
    wait_until(lambda: proxy.calls(session="team-a.live", since=restarted), 10, "the live pod's prefetch")
    wait_until(lambda: bench.daemon.log_text().count("host interface gone") >= 2, 5,
               "the restarted iamlinkd to skip team-b/gone")
    assert not proxy.calls(session="team-b.gone", since=restarted), "credentials prefetched for a pod that is gone"

    newer = bench.pods.add("team-b", "newer")
    assert_gets_own_role(bench, newer, "batch")
    assert_gets_own_role(bench, live, "web")
    bench.pods.delete(gone, remove_netns=False)  # the runtime's late DEL, with the netns gone
    assert not os.path.exists(record_path(bench, gone))
    assert bench.daemon.running


def test_store_directory_that_does_not_exist_yet_is_created(make_bench):
    bench = make_bench(pod_roles=ROLES, start_daemon=False)
    store = os.path.join(bench.node.workdir, "fresh", "iamlink")
    bench.daemon.settings["store_dir"] = store
    bench.daemon.start()
    for d in (store, os.path.join(store, "records"), os.path.join(store, "slots")):
        assert os.path.isdir(d), f"{d} not created"
        assert os.stat(d).st_mode & 0o777 == 0o700, f"{d} mode {oct(os.stat(d).st_mode)}"
    assert bench.daemon.running
    # The bench's plugin writes elsewhere: its pod is unknown to this iamlinkd, and is told so.
    pod = bench.pods.add("team-a", "elsewhere")
    listing, _ = creds_answer(pod, "web")
    assert listing.status == 404 and "no pod identity" in listing.text, listing


def read_only_store_wrapper(store):
    """iamlinkd in a private mount namespace of its own in which `store` is read-only."""
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"', store]


def test_read_only_store_at_start_keeps_serving_what_it_can(make_bench):
    bench = make_bench(pod_roles=ROLES, start_daemon=False)
    pod = bench.pods.add("team-a", "web")
    bench.daemon.wrapper = read_only_store_wrapper(bench.store_dir)
    try:
        bench.daemon.start(timeout=10)
    finally:
        mounts = open("/proc/self/mountinfo").read()
        assert bench.store_dir not in mounts, "the read-only bind mount leaked into the test's mount namespace"
    assert "read-only" in bench.daemon.log_text().lower(), bench.daemon.log_tail()
    assert_gets_own_role(bench, pod, "web")
    assert bench.daemon.running


def test_read_only_store_at_start_never_serves_a_guess(make_bench):
    """Whatever iamlinkd does with a read-only store, no pod is answered with credentials that
    are not its own, and the pod is refused rather than sent to the node's metadata service."""
    bench = make_bench(pod_roles=ROLES, start_daemon=False)
    pod = bench.pods.add("team-a", "web")
    bench.daemon.wrapper = read_only_store_wrapper(bench.store_dir)
    try:
        bench.daemon.start(wait=False)

        def settled():
            if not bench.daemon.running:
                return "exited"
            return "listening" if bench.node.can_connect("198.18.0.1", 8181) else None

        state = wait_until(settled, 10, "iamlinkd to either serve or exit")
    finally:
        assert bench.store_dir not in open("/proc/self/mountinfo").read()
    listing, answer = creds_answer(pod, "web")
    if state == "exited":
        assert "Read-only file system" in bench.daemon.log_text(), bench.daemon.log_tail()
        assert listing.error == "refused" and answer.error == "refused", (listing, answer)
    else:
        assert answer.status in (200, 404, 500, 503), answer
        if answer.status == 200:
            assert is_assumed_role(bench.moto.caller_arn(json.loads(answer.body)), "web"), answer
    assert not bench.upstream.leaked(listing.text + answer.text)

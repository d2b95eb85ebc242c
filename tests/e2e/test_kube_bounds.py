"""What iamlinkd keeps of the Kubernetes API is bounded, whatever users write into it.

Any user with `edit` in one namespace can create service accounts with 250 KiB annotations, and
iamlinkd watches every service account of the cluster. Here one such user creates 1,000 of them
with a 250 KiB `eks.amazonaws.com/role-arn` each (250 MB of annotations); iamlinkd's memory must
stay far under the DaemonSet's limit (256 MiB, deploy/kubernetes/daemonset.yaml) while they arrive
and across a restart (a relist from scratch and the snapshot read at start), pods with valid roles
must still be served theirs, and a pod whose role is one of those values is refused, never served
another role.

Real parts: iamlinkd with its kube reflectors, the CNI chain (cnirt, ptp, iamlink), the AWS CLI in
the pods, moto as STS. Emulated: the Kubernetes API server (tests/harness/kube_api.py).
"""

import os
import time

from harness import role_arn, wait_until
from test_kube_roles import METRICS, assert_cli_role, ensure_namespace, kube_pod, listing, make, metrics_get, \
    wait_for_role

COUNT = 1000
HUGE = 250 * 1024
# What iamlinkd may add to its resident memory (high-water mark over the idle daemon's) while
# the service accounts arrive and when it restarts into them: what it keeps of them is a name and
# a marker each (≈ 100 KiB for all); a restart adds one list page in flight (kube_view::LIST_PAGE,
# 20 objects of 256 KiB, ≈ 3 copies while decoded: ≈ 15 MiB) to its start. Measured: +6 MiB and
# +32 MiB (before the bounds: +1,176 MiB and +1,351 MiB). The DaemonSet's limit is 256 MiB.
RSS_BOUND_MIB = 48
# The snapshot holds every service account's name and kept annotations: ≈ 60 bytes each here.
SNAPSHOT_BOUND = 256 * 1024


def huge_value(i):
    """Longer than any role ARN can be, and starting like a valid one: cut short, it would name admin."""
    head = role_arn("admin")
    return head + str(i).rjust(HUGE - len(head), "0")


def memory(bench):
    """VmRSS and VmHWM (the peak since the process started) of the running iamlinkd, in MiB."""
    out = {}
    with open(f"/proc/{bench.daemon.proc.pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024
    return out


def snapshot_size(bench):
    try:
        return os.path.getsize(os.path.join(bench.store_dir, "kube-snapshot.json"))
    except FileNotFoundError:
        return None


def snapshot_has(bench, key):
    path = os.path.join(bench.store_dir, "kube-snapshot.json")
    try:
        with open(path) as f:
            return f'"{key}"' in f.read()
    except FileNotFoundError:
        return False


def assert_refused(pod, timeout=30):
    """The pod's listing is 403 (polled, bounded: a daemon busy with a relist may time out) and
    the AWS CLI in it gets no role at all."""
    wait_until(lambda: listing(pod)[0] == 403, timeout, f"{pod} refused (403)", interval=0.2)
    rc, out, err = pod.caller_arn()
    assert rc != 0 and "assumed-role/" not in out, (out, err[:300])


def test_a_thousand_huge_service_accounts_keep_memory_bounded_and_valid_pods_served(make_bench, bench_report):
    bench = make(make_bench, daemon_settings={"metrics_listen": "%s:%d" % METRICS})
    kube = bench.kube
    ensure_namespace(bench, "team-ok")
    kube.create_service_account("team-ok", "reader", {"eks.amazonaws.com/role-arn": role_arn("irsa")})
    irsa = kube_pod(bench, "team-ok", "irsa", None, "reader")
    annotated = kube_pod(bench, "team-ok", "annotated", {"iam.amazonaws.com/role": "web"}, runtime=True)
    last = f"huge-{COUNT - 1:04d}"
    greedy = kube_pod(bench, "hostile", "greedy", None, last)
    # The pod's own annotation, over-long in the API and (what the runtime hands the plugin) at ADD;
    # one argument of cnirt's command line holds at most 128 KiB.
    huge_pod = kube_pod(bench, "hostile", "huge-pod", {"iam.amazonaws.com/role": huge_value(0)[:100 * 1024]},
                        runtime=True)
    wait_for_role(irsa, "irsa")
    wait_for_role(annotated, "web")
    wait_until(lambda: listing(greedy)[0] == 404, 15, f"{greedy}: no role before its service account exists")
    assert_refused(huge_pod)
    record_size = os.path.getsize(os.path.join(bench.store_dir, "records", f"{huge_pod.cid}.eth0.json"))
    bench_report(f"record of a pod whose runtime annotation is 100 KiB: {record_size:,} B")
    idle = memory(bench)
    bound = idle["VmRSS"] + RSS_BOUND_MIB

    t0 = time.monotonic()
    for i in range(COUNT):
        kube.create_service_account("hostile", f"huge-{i:04d}", {"eks.amazonaws.com/role-arn": huge_value(i)})
    created_s = time.monotonic() - t0
    assert created_s < 300, f"creating {COUNT} service accounts took {created_s:.0f} s"
    # Watch events arrive in order: once the last is in the view, all are.
    assert_refused(greedy, timeout=120)
    wait_until(lambda: snapshot_has(bench, f"hostile/{last}"), 60, f"the snapshot holding hostile/{last}")
    arrived = memory(bench)
    snapshot_bytes = snapshot_size(bench)
    bench_report(f"{COUNT} service accounts × {HUGE // 1024} KiB role-arn, created in {created_s:.0f} s: iamlinkd "
                 f"idle VmRSS {idle['VmRSS']:.1f} MiB (peak {idle['VmHWM']:.1f}); once they arrived VmRSS "
                 f"{arrived['VmRSS']:.1f}, peak {arrived['VmHWM']:.1f} MiB; snapshot {snapshot_bytes:,} B")
    assert_cli_role(irsa, "irsa")
    assert_cli_role(annotated, "web")

    # A restart: the snapshot is read, then everything is listed from scratch.
    bench.daemon.restart()
    wait_until(lambda: metrics_get(bench, "/readyz")[0] == 200, 120, "iamlinkd ready: every resource listed")
    restarted = memory(bench)
    bench_report(f"restarted into them: VmRSS {restarted['VmRSS']:.1f}, peak {restarted['VmHWM']:.1f} MiB")
    wait_for_role(irsa, "irsa")
    wait_for_role(annotated, "web")
    assert_refused(greedy)
    assert_refused(huge_pod)
    assert_cli_role(irsa, "irsa")

    over = f"over idle {idle['VmRSS']:.1f} + {RSS_BOUND_MIB}"
    assert arrived["VmHWM"] <= bound, f"iamlinkd's peak {arrived['VmHWM']:.1f} MiB while they arrived, {over}"
    assert restarted["VmHWM"] <= bound, f"iamlinkd's peak {restarted['VmHWM']:.1f} MiB restarting into them, {over}"
    assert snapshot_bytes <= SNAPSHOT_BOUND, f"snapshot of {snapshot_bytes:,} bytes"
    assert record_size <= 4096, f"the pod record keeps the over-long runtime annotation: {record_size:,} bytes"

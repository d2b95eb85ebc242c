"""Part 5's two extra steps, called by bench/memory.py after its 250-pod measurement.

1. Burst recovery: iamlinkd's RSS steady (no load), its peak while 1,000 connections (20 pods ×
   50, iamlink chain, STS open) ask for credentials at once, and at the recovery mark after the
   burst (30 s; 5 s with --quick, which only proves the step works). Target: at the mark
   ≤ 1.5 × steady. Waiting for the mark is the measurement's duration, not a synchronisation.
2. The Kubernetes view at scale: iamlinkd restarted with `[kubernetes]` against the emulated API
   server (tests/harness/kube_api_server.py) holding 5,000 namespaces and 20,000 service accounts
   (500 / 2,000 with --quick), generated straight into the emulator's state file (as etcd would
   hold them, so setup takes seconds, not 25,000 POSTs). The objects look like a real cluster's:
   labels, `kubectl.kubernetes.io/last-applied-configuration`, managed fields, a spec and status
   for namespaces; one namespace in five has a policy annotation, one service account in four an
   IRSA role. VmRSS and RssAnon once /readyz says every resource is listed, against the same
   daemon with an empty API. What the view costs per object is the difference.
Both leave the bench daemon as they found it (config and binary), restarted.
"""

import http.client
import json
import os
import threading
import time
import uuid

from .node import PROXY_HOST, role_arn, wait_until  # noqa: F401
from .single_flight import NAMESPACE as BURST_NAMESPACE, ROLE as BURST_ROLE
from .stats import mib
from harness.kube_api import KubeApi

RECOVERY_MARK = 30.0
RECOVERY_TARGET = 1.5
METRICS = ("198.18.0.1", 9101)
T0 = "2026-11-02T09:00:00Z"


# -- 1. burst recovery -------------------------------------------------------------------------
def burst_recovery(b, quick):
    npods, per_pod = (4, 10) if quick else (20, 50)
    mark = 5.0 if quick else RECOVERY_MARK
    steady = b.daemon.status()
    peak = {"VmRSS": steady["VmRSS"]}
    stop = threading.Event()

    def sample():  # the peak of the burst: VmRSS every 20 ms until the burst is answered
        while not stop.wait(0.02):
            try:
                peak["VmRSS"] = max(peak["VmRSS"], b.daemon.status()["VmRSS"])
            except OSError:
                return

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    burst = b.cnibench_interactive("burst", ["--conflist", b.conflists["iamlink-nowait"], "--pods", npods,
                                             "--per-pod", per_pod, "--namespace", BURST_NAMESPACE,
                                             "--role", BURST_ROLE, "--request-timeout", "20s",
                                             "--deadline", "60s"])
    try:
        burst.next(120)  # added
        sent = burst.next(60)
        result = burst.finish(120)
        t_done = time.monotonic()
    finally:
        stop.set()
        sampler.join(5)
        burst.close()
    answered = sum(t["statuses"].get("200", 0) for t in result["pods"])
    time.sleep(max(0.0, mark - (time.monotonic() - t_done)))  # the recovery mark: measured, not awaited
    after = b.daemon.status()
    ratio = after["VmRSS"] / steady["VmRSS"]
    rows = [
        {"metric": f"iamlinkd VmRSS {mark:.0f} s after a burst of {sent['connections']:,} connections "
                   f"(steady before / peak during)",
         "value": mib(after["VmRSS"]), "unit": "MiB",
         "baseline": f"{mib(steady['VmRSS']):.2f} / {mib(peak['VmRSS']):.2f} MiB", "ratio": ratio,
         "target": f"≤ {RECOVERY_TARGET}× steady at 30 s", "met": ratio <= RECOVERY_TARGET},
        {"metric": "RssAnon after the burst (steady before)", "value": mib(after.get("RssAnon")), "unit": "MiB",
         "baseline": mib(steady.get("RssAnon")), "ratio": None},
        {"metric": "burst requests answered 200", "value": answered, "unit": f"of {sent['connections']}",
         "baseline": None, "ratio": None},
    ]
    return rows, {"steady": steady, "peak": peak, "after": after, "mark_s": mark,
                  "connections": sent["connections"], "answered": answered}


# -- 2. the Kubernetes view at scale ------------------------------------------------------------
def _managed(manager, fields):
    return [{"manager": manager, "operation": "Update", "apiVersion": "v1", "time": T0,
             "fieldsType": "FieldsV1", "fieldsV1": fields}]


def _applied(obj):
    return json.dumps(obj, separators=(",", ":"), sort_keys=True) + "\n"


def cluster_objects(namespaces, per_namespace):
    """(state-file objects, resourceVersion): `namespaces` namespaces of `per_namespace` service
    accounts each (`default` as the controller makes it, the rest applied with kubectl)."""
    objects, rv = [], 0
    for i in range(namespaces):
        name = f"team-{i:05d}"
        rv += 1
        annotations = {}
        if i % 5 == 0:
            annotations["iam.amazonaws.com/permitted"] = f"{name}-.*"
        labels = {"kubernetes.io/metadata.name": name, "team": f"group-{i % 50}", "env": "prod"}
        manifest = {"apiVersion": "v1", "kind": "Namespace",
                    "metadata": {"name": name, "labels": {k: v for k, v in labels.items() if k != "kubernetes.io/metadata.name"},
                                 "annotations": dict(annotations)}}
        annotations["kubectl.kubernetes.io/last-applied-configuration"] = _applied(manifest)
        ns = {"apiVersion": "v1", "kind": "Namespace",
              "metadata": {"name": name, "uid": str(uuid.uuid4()), "resourceVersion": str(rv),
                           "creationTimestamp": T0, "labels": labels, "annotations": annotations,
                           "managedFields": _managed("kubectl-client-side-apply", {"f:metadata": {
                               "f:annotations": {".": {}, **{f"f:{k}": {} for k in annotations}},
                               "f:labels": {".": {}, **{f"f:{k}": {} for k in labels}}}})},
              "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}}
        objects.append({"group": "", "version": "v1", "plural": "namespaces", "namespace": None, "name": name,
                        "object": ns})
        for j in range(per_namespace):
            sa_name = "default" if j == 0 else f"app-{j}"
            rv += 1
            meta = {"name": sa_name, "namespace": name, "uid": str(uuid.uuid4()), "resourceVersion": str(rv),
                    "creationTimestamp": T0}
            if j:
                sa_annotations = {}
                if j == 1:
                    sa_annotations["eks.amazonaws.com/role-arn"] = f"arn:aws:iam::123456789012:role/{name}-app"
                manifest = {"apiVersion": "v1", "kind": "ServiceAccount",
                            "metadata": {"name": sa_name, "namespace": name, "annotations": dict(sa_annotations),
                                         "labels": {"app.kubernetes.io/name": sa_name}}}
                sa_annotations["kubectl.kubernetes.io/last-applied-configuration"] = _applied(manifest)
                meta.update(annotations=sa_annotations, labels={"app.kubernetes.io/name": sa_name},
                            managedFields=_managed("kubectl-client-side-apply", {"f:metadata": {
                                "f:annotations": {".": {}, **{f"f:{k}": {} for k in sa_annotations}},
                                "f:labels": {".": {}, "f:app.kubernetes.io/name": {}}}}))
            objects.append({"group": "", "version": "v1", "plural": "serviceaccounts", "namespace": name,
                            "name": sa_name, "object": {"apiVersion": "v1", "kind": "ServiceAccount",
                                                        "metadata": meta}})
    return objects, rv


def _ready(b):
    def call():
        conn = http.client.HTTPConnection(*METRICS, timeout=2)
        try:
            conn.request("GET", "/readyz")
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()

    return b.node.call(call, timeout=10)


def _view_rss(b, kube, settle):
    """Restarts the daemon on `kube`, waits (bounded) for every resource listed; its status."""
    b.daemon.restart()
    t0 = time.monotonic()
    wait_until(lambda: _ready(b), 180, "iamlinkd ready with every Kubernetes resource listed", interval=0.2)
    listed = time.monotonic() - t0
    time.sleep(settle)  # let the lists' transient buffers be freed (iamlinkd trims malloc every 10 s)
    return b.daemon.status(), listed


def view_at_scale(b, quick):
    namespaces, per_ns = (500, 4) if quick else (5000, 4)
    settle = 2.0 if quick else 11.0
    kube = KubeApi(b.node, start=False)
    saved = dict(b.daemon.settings)
    b.daemon.settings["kubernetes"] = {"kubeconfig": kube.kubeconfig_path}
    try:
        with open(kube.state_path, "w") as f:
            json.dump({"resourceVersion": "0", "objects": []}, f)
        kube.start()
        empty, _ = _view_rss(b, kube, settle)
        kube.stop()
        t0 = time.monotonic()
        objects, rv = cluster_objects(namespaces, per_ns)
        with open(kube.state_path, "w") as f:
            json.dump({"resourceVersion": str(rv), "objects": objects}, f)
        state_mb = os.path.getsize(kube.state_path) / 1e6
        kube.start(timeout=60)
        generated = time.monotonic() - t0
        full, listed = _view_rss(b, kube, settle)
    finally:
        b.daemon.stop()
        b.daemon.settings.clear()
        b.daemon.settings.update(saved)
        kube.stop()
        b.daemon.start()
    sas = namespaces * per_ns
    objs = namespaces + sas
    per_object = (full["RssAnon"] - empty["RssAnon"]) * 1024 / objs
    rows = [
        {"metric": f"iamlinkd VmRSS, view of {namespaces:,} namespaces / {sas:,} service accounts",
         "value": mib(full["VmRSS"]), "unit": "MiB", "baseline": mib(empty["VmRSS"]),
         "ratio": full["VmRSS"] / empty["VmRSS"]},
        {"metric": "RssAnon, same view (baseline: the same API, empty)", "value": mib(full["RssAnon"]),
         "unit": "MiB", "baseline": mib(empty["RssAnon"]), "ratio": None},
        {"metric": "anonymous memory per namespace or service account", "value": per_object, "unit": "B",
         "baseline": None, "ratio": None},
        {"metric": "time to list them all (iamlinkd restart to /readyz)", "value": listed, "unit": "s",
         "baseline": None, "ratio": None},
    ]
    return rows, {"empty": empty, "full": full, "namespaces": namespaces, "service_accounts": sas,
                  "per_object_bytes": per_object, "listed_s": listed, "setup_s": generated, "state_mb": state_mb}

"""Part 9, token mode: the first answer after ADD and the cached answer of an IRSA pod served from
its own projected service-account token (AssumeRoleWithWebIdentity, the node holding no role),
against the same figures of a pod served in legacy mode (the node's AssumeRole), same run.

Each mode gets a node of its own, built as the end-to-end tests build it (tests/harness): token
mode with moto enforcing IAM, iamlinkd's principal without any policy, the strict web identity
shim in front of moto as STS, the emulated Kubernetes API (pod, service account annotated with the
role, the projected token volume) and kubelet's token files on a tmpfs, written before ADD as
kubelet writes them before the containers start; legacy mode with a namespace's role in the
config and moto as STS. Pods are made one at a time through libcni (`cnirt`, ptp + host-local +
iamlink); right after ADD returns, a thread entered into the pod's namespace asks for the role's
credentials (the first answer), then asks again (cached answers), each a new connection, timed
around the request alone. ADD waits for the pod's credentials (`waitForCredentials`, 1 s by
default), so the first answer is usually a cached one in both modes, and ADD carries the STS
exchange: its median is shown too.
"""

import os
import time
import types
import uuid

from .node import UNDER_TEST  # also puts tests/ on the path, for the harness
from .stats import median, percentile, ratio

from harness import Bench  # noqa: E402
from harness.moto import BASE_ARN  # noqa: E402
from harness.netns_threads import NetnsThreads  # noqa: E402
from harness.oidc import IRSA_AUDIENCE, IRSA_VOLUME, projected_volume  # noqa: E402
from harness.rawhttp import request  # noqa: E402
from harness.token_bench import TokenBench  # noqa: E402
from harness.util import REFERENCE_PLUGINS  # noqa: E402

NAMESPACE = "bench-token"
SERVICE_ACCOUNT = "app"
TOKEN_ROLE = "bench-token"
LEGACY_ROLE = "bench-legacy"
CREDS_PATH = "/latest/meta-data/iam/security-credentials/"


def _timed_asks(pod, role, cached):
    """(first_ms, [cached_ms], failures) of 1 + `cached` credential requests from inside the pod."""
    times, failures = [], []
    with NetnsThreads(pod.netns) as t:
        for _ in range(1 + cached):
            t0 = time.perf_counter()
            r = t.call(request, "GET", CREDS_PATH + role, timeout=5)
            times.append((time.perf_counter() - t0) * 1000)
            if r.status != 200 or "AccessKeyId" not in r.text:
                failures.append(str(r)[:200])
    return times[0], times[1:], failures


def _bench(**kwargs):
    """A harness bench running the binaries under test (the bench's build, not the tests')."""
    bench = Bench(start_daemon=False, pods_options={"bin_dirs": (REFERENCE_PLUGINS, UNDER_TEST)}, **kwargs)
    bench.__enter__()
    bench.daemon.binary = os.path.join(UNDER_TEST, "iamlinkd")
    return bench


def _legacy(pods, cached):
    bench = _bench(pod_roles=[{"namespace": NAMESPACE, "role": LEGACY_ROLE}])
    try:
        bench.daemon.start()
        out = []
        for i in range(pods):
            t0 = time.perf_counter()
            pod = bench.pods.add(NAMESPACE, f"legacy-{i}")
            add_ms = (time.perf_counter() - t0) * 1000
            out.append((add_ms, *_timed_asks(pod, LEGACY_ROLE, cached)))
            bench.pods.delete(pod)
        return out
    finally:
        bench.close()


def _irsa_pod(tb, name):
    """An IRSA pod whose token kubelet wrote before ADD; returns (pod, ADD ms)."""
    uid = str(uuid.uuid4())
    tb.bench.kube.create_pod(NAMESPACE, name, node=tb.node.name, service_account=SERVICE_ACCOUNT, uid=uid,
                             volumes=[projected_volume(IRSA_VOLUME, IRSA_AUDIENCE)])
    bound = types.SimpleNamespace(namespace=NAMESPACE, name=name, uid=uid)
    tb.kubelet.write(uid, tb.issuer.token(bound, SERVICE_ACCOUNT, IRSA_AUDIENCE, node=tb.node.name))
    t0 = time.perf_counter()
    pod = tb.bench.pods.add(NAMESPACE, name, uid=uid)
    return pod, (time.perf_counter() - t0) * 1000


def _token(pods, cached):
    bench = _bench(kubernetes={}, pod_roles=[])
    try:
        tb = TokenBench(bench, {TOKEN_ROLE: (NAMESPACE, SERVICE_ACCOUNT)}, roles_extra={"legacy_assume_role": False})
        kube = bench.kube
        kube.create_namespace(NAMESPACE)
        kube.create_service_account(NAMESPACE, SERVICE_ACCOUNT,
                                    annotations={"eks.amazonaws.com/role-arn": BASE_ARN + TOKEN_ROLE})
        out = []
        for i in range(pods):
            pod, add_ms = _irsa_pod(tb, f"token-{i}")
            out.append((add_ms, *_timed_asks(pod, TOKEN_ROLE, cached)))
            bench.pods.delete(pod)
        exchanged = [c for c in tb.shim_calls() if c["outcome"] == "forwarded"]
        return out, len(exchanged)
    finally:
        bench.close()


def _figures(samples):
    add = [s[0] for s in samples]
    first = [s[1] for s in samples]
    cached = [x for s in samples for x in s[2]]
    failures = [f for s in samples for f in s[3]]
    return {"add_p50": median(add), "first_p50": median(first), "first_p99": percentile(first, 99),
            "cached_p50": median(cached), "cached_p99": percentile(cached, 99), "failures": failures,
            "first_ms": first, "cached_ms": cached}


def run(b, quick, want_profile):
    pods, cached = (4, 5) if quick else (30, 10)
    legacy = _figures(_legacy(pods, cached))
    samples, exchanged = _token(pods, cached)
    token = _figures(samples)
    failed = len(legacy["failures"]) + len(token["failures"])
    rows = [
        {"metric": "first answer after ADD, median, token mode vs legacy", "value": token["first_p50"], "unit": "ms",
         "baseline": legacy["first_p50"], "ratio": ratio(token["first_p50"], legacy["first_p50"])},
        {"metric": "first answer after ADD, p99, token mode vs legacy", "value": token["first_p99"], "unit": "ms",
         "baseline": legacy["first_p99"], "ratio": ratio(token["first_p99"], legacy["first_p99"])},
        {"metric": "cached answer, median, token mode vs legacy", "value": token["cached_p50"], "unit": "ms",
         "baseline": legacy["cached_p50"], "ratio": ratio(token["cached_p50"], legacy["cached_p50"])},
        {"metric": "cached answer, p99, token mode vs legacy", "value": token["cached_p99"], "unit": "ms",
         "baseline": legacy["cached_p99"], "ratio": ratio(token["cached_p99"], legacy["cached_p99"])},
        {"metric": "context: ADD (waits for the pod's credentials), median, token mode vs legacy",
         "value": token["add_p50"], "unit": "ms", "baseline": legacy["add_p50"],
         "ratio": ratio(token["add_p50"], legacy["add_p50"])},
        {"metric": "token-mode pods whose role came through AssumeRoleWithWebIdentity", "value": exchanged,
         "unit": f"of {pods}", "baseline": None, "ratio": None, "target": f"≥ {pods}", "met": exchanged >= pods,
         "check": True},
        {"metric": "failed first or cached answers", "value": failed, "unit": "", "baseline": None, "ratio": None,
         "target": "0", "met": failed == 0, "check": True},
    ]
    return {"title": "Token mode (first and cached answers)", "rows": rows,
            "met": all(r.get("met", True) for r in rows), "pods": pods, "cached": cached,
            "token": token, "legacy": legacy, "exchanged": exchanged}


def explain(r):
    t, legacy = r["token"], r["legacy"]
    text = (f"**Result.** {r['pods']} pods per mode, {r['cached']} cached requests each. An IRSA pod's first "
            f"answer after ADD takes {t['first_p50']:.2f} ms (median) against {legacy['first_p50']:.2f} ms in "
            f"legacy mode, its cached answers {t['cached_p50']:.2f} ms against {legacy['cached_p50']:.2f} ms. "
            "ADD, which waits for the pod's credentials, takes "
            f"{t['add_p50']:.1f} ms against {legacy['add_p50']:.1f} ms: the token's read and checks, and the "
            "web identity exchange through the strict shim, happen there.")
    if t["failures"] or legacy["failures"]:
        text += f" Failed answers: {(t['failures'] + legacy['failures'])[:3]}"
    return text

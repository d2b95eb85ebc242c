"""The body of scripts/demo (see there). Run as root after scripts/setup."""

import os
import sys
import time
import uuid

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from harness import Bench, is_assumed_role, missing_binaries, role_arn, wait_until  # noqa: E402

# namespace, name, expected role (None: no credentials), where the role comes from, pod annotations,
# service account. The API objects go to an emulated Kubernetes API server (none runs here).
PODS = [
    ("team-a", "web", "web", "iamlinkd config", None, "default"),
    ("team-b", "api", "api", "iamlinkd config (namespace)", None, "default"),
    ("shop", "web", "shop-web", "pod annotation (kube2iam)", {"iam.amazonaws.com/role": "shop-web"}, "default"),
    ("analytics", "report", "analytics-reporter", "service account (IRSA)", None, "reporter"),
    ("locked", "greedy", None, "pod annotation, refused by namespace policy", {"iam.amazonaws.com/role": "admin"},
     "default"),
    ("team-c", "norole", None, "none", None, "default"),
]
NAMESPACE_ANNOTATIONS = {"locked": {"iam.amazonaws.com/permitted": "web|batch"}}
CONFIG_ROLES = [{"namespace": "team-a", "name": "web", "role": "web"}, {"namespace": "team-b", "role": "api"}]


def decided(pod):
    """The view has caught up with the pod: its credential requests no longer get 503."""
    return pod.imds("request", "GET", "/latest/meta-data/iam/security-credentials/").get("status") != 503


def main():
    missing = missing_binaries()
    if missing:
        print("demo: not built: " + ", ".join(missing), file=sys.stderr)
        return 2
    t0 = time.monotonic()
    rows, wrong = [], 0
    with Bench(pod_roles=CONFIG_ROLES, kubernetes={}) as bench:
        print(f"demo: node {bench.node.name}: moto on 198.18.0.2:5000, iamlinkd on 198.18.0.1:8181, emulated "
              f"Kubernetes API on {bench.kube.HOST}:{bench.kube.PORT}, fake node metadata service on "
              f"169.254.169.254 (role iamlink-node-role)")
        for role in ("shop-web", "analytics-reporter", "admin"):
            bench.moto.create_role(role)
        for ns in sorted({p[0] for p in PODS}):
            bench.kube.create_namespace(ns, annotations=NAMESPACE_ANNOTATIONS.get(ns))
        bench.kube.create_service_account("analytics", "reporter",
                                          {"eks.amazonaws.com/role-arn": role_arn("analytics-reporter")})
        pods = []
        for ns, name, role, source, annotations, sa in PODS:
            uid = str(uuid.uuid4())
            bench.kube.create_pod(ns, name, node=bench.node.name, service_account=sa, uid=uid, annotations=annotations)
            pods.append((bench.pods.add(ns, name, uid=uid, annotations=annotations or {}), role, source))
        print("demo: in each pod: aws sts get-caller-identity --endpoint-url http://198.18.0.2:5000 "
              "--query Arn --output text")
        for pod, role, source in pods:
            wait_until(lambda: decided(pod), 30, f"iamlinkd's view of {pod}", interval=0.1)
            rc, out, err = pod.caller_arn()
            if role is None:
                ok = rc != 0 and not bench.upstream.leaked(out + err)
                got = "no credentials" if rc != 0 and "Unable to locate credentials" in err else (out or err)
            else:
                ok = rc == 0 and is_assumed_role(out, role)
                got = out if rc == 0 else f"error: {err.splitlines()[-1] if err else rc}"
            wrong += not ok
            rows.append((f"{pod.namespace}/{pod.name}", pod.ip, source, got, "ok" if ok else "WRONG"))
        if wrong:
            print("---- iamlinkd log ----\n" + bench.daemon.log_tail(30), file=sys.stderr)
    header = ("pod", "ip", "role from", "identity", "check")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(5)]
    line = "  ".join("{:<%d}" % w for w in widths)
    print()
    print(line.format(*header))
    for r in rows:
        print(line.format(*r))
    print()
    print(f"demo: {len(rows) - wrong} of {len(rows)} pods right, cleaned up ({time.monotonic() - t0:.1f}s)")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())

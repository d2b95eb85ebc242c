"""The body of scripts/demo (see there). Run as root after scripts/setup."""

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from harness import Bench, is_assumed_role, missing_binaries  # noqa: E402

PODS = [  # namespace, name, role (None: no entry in iamlinkd's config)
    ("team-a", "web", "web"),
    ("team-a", "batch", "batch"),
    ("team-b", "api", "api"),
    ("team-c", "norole", None),
]
ROLES = [{"namespace": ns, "name": name, "role": role} for ns, name, role in PODS if role]


def main():
    missing = missing_binaries()
    if missing:
        print("demo: not built: " + ", ".join(missing), file=sys.stderr)
        return 2
    t0 = time.monotonic()
    rows, wrong = [], 0
    with Bench(pod_roles=ROLES) as bench:
        print(f"demo: node {bench.node.name}: moto on 198.18.0.2:5000, iamlinkd on 198.18.0.1:8181, "
              f"fake node metadata service on 169.254.169.254 (role iamlink-node-role)")
        pods = [(bench.pods.add(ns, name), role) for ns, name, role in PODS]
        print("demo: in each pod: aws sts get-caller-identity --endpoint-url http://198.18.0.2:5000 "
              "--query Arn --output text")
        for pod, role in pods:
            rc, out, err = pod.caller_arn()
            if role is None:
                ok = rc != 0 and not bench.upstream.leaked(out + err)
                got = "no credentials" if rc != 0 and "Unable to locate credentials" in err else (out or err)
            else:
                ok = rc == 0 and is_assumed_role(out, role)
                got = out if rc == 0 else f"error: {err.splitlines()[-1] if err else rc}"
            wrong += not ok
            rows.append((f"{pod.namespace}/{pod.name}", pod.ip, role or "-", got, "ok" if ok else "WRONG"))
        if wrong:
            print("---- iamlinkd log ----\n" + bench.daemon.log_tail(30), file=sys.stderr)
    widths = [max(len(r[i]) for r in rows + [("pod", "ip", "role", "identity", "check")]) for i in range(5)]
    line = "  ".join("{:<%d}" % w for w in widths)
    print()
    print(line.format("pod", "ip", "role", "identity", "check"))
    for r in rows:
        print(line.format(*r))
    print()
    print(f"demo: {len(rows) - wrong} of {len(rows)} pods right, cleaned up ({time.monotonic() - t0:.1f}s)")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())

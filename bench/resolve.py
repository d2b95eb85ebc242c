"""Part 7, role decision: what deciding a pod's role costs on each answer once roles come from
Kubernetes (a pod annotation checked against its namespace's `permitted` regex and `allowed-roles`
list) against the static `[[roles.pod]]` lookup of 50 namespaces, both in one process
(`node-server/examples/resolve_cost.rs`: `Roles::resolve` in a loop, best of 7 rounds of 20,000
calls). The API view's lookups (two hash-map reads in the reflector stores) are not included; the
request path around the decision is part 2's.
"""

import json
import os
import subprocess

from .node import UNDER_TEST

BINARY = os.path.join(UNDER_TEST, "examples", "resolve_cost")
# A cached answer costs ≈ 40 µs of server CPU (part 2): the decision may add 5% of that.
ADDED_LIMIT_US = 2.0


def run(b, quick, want_profile):
    args = [BINARY] + (["3", "2000"] if quick else [])
    out = json.loads(subprocess.run(args, capture_output=True, text=True, timeout=120, check=True).stdout)
    us = {k[:-3]: v / 1000 for k, v in out.items() if k.endswith("_ns")}
    added = us["pod_annotation_with_policy"] - us["static_config"]
    rows = [
        {"metric": "role decision, pod annotation + namespace policy", "value": us["pod_annotation_with_policy"],
         "unit": "µs", "baseline": us["static_config"], "ratio": us["pod_annotation_with_policy"] / us["static_config"],
         "target": f"adds ≤ {ADDED_LIMIT_US:g} µs per answer", "met": added <= ADDED_LIMIT_US},
        {"metric": "role decision, pod annotation, no policy", "value": us["pod_annotation"], "unit": "µs",
         "baseline": us["static_config"], "ratio": us["pod_annotation"] / us["static_config"]},
        {"metric": "namespace policy check, regexes cached (baseline: compiled per call)", "value": us["policy_cached"],
         "unit": "µs", "baseline": us["policy_compiled_each_call"],
         "ratio": us["policy_cached"] / us["policy_compiled_each_call"]},
    ]
    return {"title": "Role decision (roles from Kubernetes)", "rows": rows, "met": added <= ADDED_LIMIT_US, "raw": out}


def explain(r):
    raw = r["raw"]
    return (f"**Result.** Compiling a namespace's policy (one regex, one glob per `allowed-roles` entry) costs "
            f"{raw['policy_compiled_each_call_ns'] / 1000:.0f} µs, several whole answers; `policy::Compiled` keeps "
            "each compiled regex (shared, not cloned: a cloned `Regex` starts with a cold match cache) so a "
            f"check costs {raw['policy_cached_ns'] / 1000:.2f} µs. The static lookup scans the `[[roles.pod]]` "
            "entries and formats the ARN; the annotation path skips the scan.")

"""Token mode: the node holds no role, and pods get their own role from their own
service-account token (IRSA: AssumeRoleWithWebIdentity).

Real parts: network namespaces, the ptp/host-local/iamlink chain, nftables, iamlinkd with its
kube reflectors, the unmodified AWS CLI in the pods. Emulated: the Kubernetes API server, kubelet's
projected token files (a tmpfs laid out as kubelet's atomic writer lays it out), the OIDC issuer
(RS256, kube-apiserver's claims) and STS's checks (tests/harness/sts_web_identity_shim.py in front
of moto). moto enforces IAM on every request, and iamlinkd's principal has no policy: any
AssumeRole it tried with its own identity would be denied.
"""

import pytest

from harness import is_assumed_role, role_arn
from harness.token_bench import TokenBench

ROLES = {"irsa-app": ("team-t", "app")}


@pytest.fixture(scope="module")
def tb(make_module_bench):
    bench = make_module_bench(start_daemon=False, kubernetes={}, pod_roles=[])
    return TokenBench(bench, ROLES)


def cli_arn(pod):
    rc, out, err = pod.caller_arn()
    return out if rc == 0 else f"(aws exited {rc}: {err[-300:]})"


def test_an_irsa_pod_gets_its_role_through_the_cli_while_the_node_may_assume_no_role(tb):
    pod = tb.irsa_pod("team-t", "app-0", "app", "irsa-app")
    arn = cli_arn(pod)
    assert is_assumed_role(arn, "irsa-app"), f"expected assumed-role/irsa-app/..., got {arn}"
    assert [c["outcome"] for c in tb.shim_calls() if c["role"] == role_arn("irsa-app")][-1:] == ["forwarded"]

"""Pods that start before iamlinkd: refused until it runs, then their own roles — never the node's.

Real parts: namespaces and veths, ptp + host-local + the built iamlink plugin through libcni
(`cnirt`), the nftables interception the plugin installs on its own when the daemon is not there
yet, the built iamlinkd started afterwards, the unmodified AWS CLI in the pods.
Emulated: STS by moto; the node's metadata service by the fake upstream serving the node role on
169.254.169.254 behind the node, exactly where a missing interception would send the pods.
"""

from conftest import add_standard_pods
from harness import is_assumed_role, wait_until

CREDS = "/latest/meta-data/iam/security-credentials/"


def test_pods_made_before_the_daemon_are_refused_then_get_their_own_roles(make_bench):
    bench = make_bench(start_daemon=False)
    pods = add_standard_pods(bench)

    for pod in pods.values():
        r = pod.imds("request", "GET", CREDS, "--timeout", "2")
        assert r.get("error") == "refused", f"{pod} before iamlinkd runs: {r}"
        rc, out, err = pod.caller_arn()
        assert rc != 0 and "Unable to locate credentials" in err, f"{pod}: rc {rc} {out!r} {err!r}"
        assert not bench.upstream.leaked(out + err)
    assert bench.upstream.credential_requests() == []

    bench.daemon.start()
    for pod in pods.values():
        if pod.role is None:
            continue
        # iamlinkd reconciles the pods it finds in the store at start: the first CLI call succeeds.
        rc, out, err = pod.caller_arn()
        assert rc == 0, f"{pod} after iamlinkd started: {err}"
        assert is_assumed_role(out, pod.role), f"{pod} got {out!r}"
    norole = pods["team-c/norole"]
    rc, out, err = norole.caller_arn()
    assert rc != 0 and not bench.upstream.leaked(out + err), (rc, out, err)


def test_pod_made_before_the_daemon_gets_credentials_within_a_bounded_time_of_its_start(make_bench):
    bench = make_bench(start_daemon=False)
    pod = bench.pods.add("team-a", "web")
    bench.daemon.start()
    r = wait_until(lambda: (lambda c: c if c["ok"] else None)(pod.imds("creds")), 10,
                   f"credentials for {pod} after iamlinkd started")
    assert r["role"] == "web"
    assert is_assumed_role(bench.moto.caller_arn(r["creds"]), "web")

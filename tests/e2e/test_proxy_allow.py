"""Only allow-listed metadata paths reach the real service, matched byte for byte, and no entry
of `proxy_allow` can name the node's credentials, user data or tokens.

Real parts: the built iamlinkd (its `--check-config` and the running daemon), namespaces and
veths, ptp + host-local + the built iamlink plugin through libcni (`cnirt`), the nftables
interception; requests are raw bytes from inside a real pod namespace. Emulated: STS by moto,
the node's metadata service by the fake upstream (which logs every request it gets and serves
the node's identity credentials too, so a leak would be visible).
"""

import json
import subprocess

import pytest

from harness import IAMLINKD
from harness.netns_threads import NetnsThreads
from harness.rawhttp import request

IDENTITY_CREDENTIALS = "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance"

# entry -> a word the refusal must say about why
REFUSED = {
    IDENTITY_CREDENTIALS: "identity-credentials",
    "/latest/meta-data/identity-credentials/ec2/info": "identity-credentials",
    "/latest/meta-data/%69am/security-credentials/": "percent",
    "/latest/meta-data/placement/%72egion": "percent",
    "/latest/meta-data/placement/../iam/info": "dot segment",
    "/latest/meta-data/./iam/info": "dot segment",
    "/latest/meta-data//iam/info": "empty segment",
    "/latest/meta-data/iam/info": "iam",
    "/latest/user-data": "user-data",
    "/latest/user-data/": "user-data",
    "/latest/api/token": "token",
    "latest/meta-data/placement/region": "absolute",
}


def check_config(tmp_path, entries):
    config = tmp_path / "iamlinkd.toml"
    config.write_text('listen = "198.18.0.1:8181"\nproxy_allow = ' + json.dumps(entries) + "\n")
    return subprocess.run([IAMLINKD, "--check-config", "--config", str(config)],
                          capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("entry", REFUSED)
def test_a_proxy_allow_entry_that_could_reach_node_secrets_is_refused_at_load_with_the_reason(built, tmp_path, entry):
    p = check_config(tmp_path, ["/latest/meta-data/placement/region", entry])
    assert p.returncode != 0, f"{entry!r} accepted: {p.stdout}"
    assert "proxy_allow" in p.stderr and entry in p.stderr and REFUSED[entry] in p.stderr, p.stderr


def test_ordinary_proxy_allow_entries_are_accepted(built, tmp_path):
    p = check_config(tmp_path, ["/latest/meta-data/placement/region", "/latest/meta-data/instance-id",
                                "/latest/dynamic/instance-identity/document"])
    assert p.returncode == 0, p.stderr


@pytest.fixture(scope="module")
def bench(make_module_bench):
    b = make_module_bench(pod_roles=[{"namespace": "team-a", "name": "web", "role": "web"}])
    b.web = b.pods.add("team-a", "web")
    return b


UNLISTED = [
    IDENTITY_CREDENTIALS,
    "/latest/meta-data/placement/%72egion",
    "/latest/meta-data/placement/regio%6E",
    "/latest/meta-data/placement/%2e%2e/%2e%2e/user-data",
    "/latest/meta-data/placement//region",
    "/latest/meta-data/placement/./region",
    "/latest/meta-data//placement/region",
    "/latest/meta-data/placement/region/",
]


@pytest.mark.parametrize("path", UNLISTED)
def test_paths_that_only_resemble_an_allowed_one_get_404_and_never_reach_the_real_service(bench, path):
    before = len(bench.upstream.requests())
    with NetnsThreads(bench.web.netns) as t:
        r = t.call(request, "GET", path)
        control = t.call(request, "GET", "/latest/meta-data/placement/region")
    assert r.status == 404, r
    assert not bench.upstream.leaked(r.text), r
    assert control.status == 200 and control.text == "us-east-1", control
    # Exactly one request reached the upstream since: the control's (plus the daemon's token PUT).
    paths = [u["path"] for u in bench.upstream.requests()[before:]]
    assert [p for p in paths if p != "/latest/api/token"] == ["/latest/meta-data/placement/region"], paths

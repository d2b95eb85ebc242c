"""Which STS endpoint iamlinkd calls (issue 24 item 5): the regional endpoint of the node's own
region, FIPS and dual-stack on request, the aws-cn and aws-us-gov partitions, a custom (VPC)
endpoint, all through the operator's outbound proxy except what NO_PROXY lists.

Real parts: network namespaces, the CNI chain with `iamlink`, nftables, `iamlinkd`, the unmodified
AWS CLI in the pods, moto as STS. The endpoint host iamlinkd calls is read where it cannot be
faked: an HTTPS proxy in the node (tests/harness/recording_proxy.py) records the host of every
CONNECT tunnel, then terminates the tunnel's TLS with a test CA that iamlinkd trusts through
`[sts] ca_bundle` and hands the request to moto, which answers with ARNs of the partition of the
region the request was signed for. The node's region comes from the fake metadata service.
"""

import pytest

from harness import ACCOUNT, IAMLINKD
from harness.recording_proxy import RecordingProxy
from harness.util import wait_until

# Every host a case below expects iamlinkd to call: the proxy's certificate names them all, so a
# wrong host shows as the CONNECT it is, not as a TLS failure.
HOSTS = ["sts.eu-west-1.amazonaws.com", "sts.us-east-1.amazonaws.com", "sts-fips.us-east-1.amazonaws.com",
         "sts.us-east-1.api.aws", "sts.cn-north-1.amazonaws.com.cn", "sts.us-gov-west-1.amazonaws.com",
         "sts.amazonaws.com"]
ROLE = "app"
# The pods' own CLI calls moto directly: what is shown is iamlinkd's endpoint, not theirs.
MOTO = "http://198.18.0.2:5000"


@pytest.fixture(scope="module")
def bench(make_module_bench):
    b = make_module_bench(default_role=ROLE, start_daemon=False)
    b.proxy = RecordingProxy(b.node, b.moto, HOSTS)
    b.callback(b.proxy.stop)
    return b


def start(bench, sts=None, env=None, partition="aws", region=""):
    """iamlinkd with only these [sts] endpoint keys (no moto endpoint, no region unless given),
    trusting the proxy's CA, its environment naming the proxy; the node's metadata names
    `region` ("": none)."""
    d = bench.daemon
    if d.running:
        d.stop()
    bench.upstream.set_region(region)
    d.sts = {"endpoint": None, "region": None, "ca_bundle": bench.proxy.ca_path, **(sts or {})}
    d.roles_base = f"arn:{partition}:iam::{ACCOUNT}:role/iamlink/"
    # The bench gives the daemon a region in its environment: here only a case's own env does.
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        d.aws_keys.pop(name, None)
    d.extra_env = {"HTTPS_PROXY": bench.proxy.url, **(env or {})}
    return d


def caller(pod, region):
    """The ARN `aws sts get-caller-identity` shows with the pod's credentials (signed for `region`,
    so moto answers in that region's partition)."""
    p = pod.aws("sts", "get-caller-identity", "--endpoint-url", MOTO, "--region", region,
                "--query", "Arn", "--output", "text")
    assert p.returncode == 0, f"aws sts get-caller-identity in {pod} failed: {p.stderr.strip()}"
    return p.stdout.strip()


def served_through(bench, namespace, region, partition):
    """A new pod's CLI gets its own role, in `partition`; returns the tunnels iamlinkd opened for it."""
    before = len(bench.proxy.tunnels())
    pod = bench.pods.add(namespace, "web")
    try:
        assert caller(pod, region) == f"arn:{partition}:sts::{ACCOUNT}:assumed-role/{ROLE}/{namespace}.web"
    finally:
        bench.pods.delete(pod)
    return bench.proxy.tunnels()[before:]


def connected_hosts(tunnels):
    return sorted({(t.get("via"), t.get("host"), t.get("port")) for t in tunnels})


def test_the_regional_endpoint_of_the_region_the_nodes_metadata_names_is_called_through_the_proxy(bench):
    start(bench, region="eu-west-1").start()
    tunnels = served_through(bench, "regional", "eu-west-1", "aws")
    assert connected_hosts(tunnels) == [("proxy", "sts.eu-west-1.amazonaws.com", 443)], tunnels
    log = this_start(bench.daemon)
    assert "https://sts.eu-west-1.amazonaws.com" in log and "instance metadata" in log, bench.daemon.log_tail()


def test_the_environments_region_comes_before_the_nodes_and_never_the_global_endpoint(bench):
    start(bench, region="eu-west-1", env={"AWS_REGION": "us-east-1"}).start()
    tunnels = served_through(bench, "from-env", "us-east-1", "aws")
    assert connected_hosts(tunnels) == [("proxy", "sts.us-east-1.amazonaws.com", 443)], tunnels


@pytest.mark.parametrize("switches, host", [
    ({"use_fips": True}, "sts-fips.us-east-1.amazonaws.com"),
    ({"use_dual_stack": True}, "sts.us-east-1.api.aws"),
])
def test_fips_and_dual_stack_switches_choose_the_regions_fips_and_dual_stack_endpoints(bench, switches, host):
    start(bench, sts={"region": "us-east-1", **switches}).start()
    namespace = "fips" if "use_fips" in switches else "dualstack"
    tunnels = served_through(bench, namespace, "us-east-1", "aws")
    assert connected_hosts(tunnels) == [("proxy", host, 443)], tunnels


@pytest.mark.parametrize("region, partition, host", [
    ("cn-north-1", "aws-cn", "sts.cn-north-1.amazonaws.com.cn"),
    ("us-gov-west-1", "aws-us-gov", "sts.us-gov-west-1.amazonaws.com"),
])
def test_a_node_in_another_partition_serves_its_partitions_roles_at_its_endpoint(bench, region, partition, host):
    start(bench, region=region, partition=partition).start()
    tunnels = served_through(bench, partition, region, partition)
    assert connected_hosts(tunnels) == [("proxy", host, 443)], tunnels


def test_a_custom_vpc_endpoint_in_no_proxy_is_called_directly_and_overrides_the_switches(bench):
    endpoint = bench.proxy.direct_url
    start(bench, sts={"region": "us-east-1", "endpoint": endpoint, "use_fips": True},
          env={"NO_PROXY": "localhost,127.0.0.1"}).start()
    tunnels = served_through(bench, "vpce", "us-east-1", "aws")
    assert connected_hosts(tunnels) == [("direct", "127.0.0.1", None)], tunnels


def test_a_custom_endpoint_not_in_no_proxy_goes_through_the_proxy(bench):
    start(bench, sts={"region": "us-east-1", "endpoint": "https://sts.amazonaws.com"}).start()
    tunnels = served_through(bench, "global", "us-east-1", "aws")
    assert connected_hosts(tunnels) == [("proxy", "sts.amazonaws.com", 443)], tunnels


# -- refused at start ----------------------------------------------------------------------------

def refusal(daemon, timeout=20):
    """iamlinkd's exit code and log once it has refused to start (bounded)."""
    daemon.start(wait=False)
    wait_until(lambda: not daemon.running, timeout, "iamlinkd to refuse its configuration")
    return daemon.proc.returncode, this_start(daemon)


def this_start(daemon):
    """The log of iamlinkd's latest start."""
    return daemon.log_text().rsplit("---- iamlinkd start #", 1)[-1]


@pytest.mark.parametrize("case, named", [
    ("no region anywhere", "sts.region is unset, as are $AWS_REGION and $AWS_DEFAULT_REGION"),
    ("endpoint not a URL", "sts.endpoint \"sts.internal.example\" is not a URL"),
    ("discovered region of another partition", "roles.base_arn \"arn:aws:iam::123456789012:role/iamlink/\" is a role "
                                               "of partition aws, and this node's STS endpoint is in partition aws-cn"),
    ("unknown partition", "roles.base_arn \"arn:aws-moon:iam::123456789012:role/iamlink/\" names partition "
                          "\"aws-moon\", which is not an AWS partition"),
])
def test_an_endpoint_iamlinkd_cannot_name_is_refused_at_start_naming_the_key(bench, case, named):
    daemon = {
        "no region anywhere": lambda: start(bench, region=""),
        "endpoint not a URL": lambda: start(bench, sts={"region": "eu-west-1", "endpoint": "sts.internal.example"}),
        "discovered region of another partition": lambda: start(bench, region="cn-north-1", partition="aws"),
        "unknown partition": lambda: start(bench, region="eu-west-1", partition="aws-moon"),
    }[case]()
    code, log = refusal(daemon)
    assert code == 2 and named in log, (code, daemon.log_tail())


def test_the_endpoint_in_use_is_shown_by_iamlinkd_status(bench):
    d = start(bench, sts={"region": "us-east-1", "use_dual_stack": True})
    d.start()
    p = bench.node.exec([IAMLINKD, "--config", d.config_path, "status"], check=False)
    line = next((l for l in p.stdout.splitlines() if l.startswith("STS endpoint")), "")
    assert "https://sts.us-east-1.api.aws (region us-east-1 from sts.region, partition aws) through proxy" in line, \
        p.stdout + p.stderr

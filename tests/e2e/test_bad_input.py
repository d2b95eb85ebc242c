"""Bad input to both binaries gets the exact error a user should see, and changes nothing.

CNI: the built `iamlink` plugin is executed directly (no libcni in between, so any stdin and
environment can be crafted) inside the bench's node namespace, next to a real pod made through
the real chain; each case is a valid ADD of a new container on that pod's namespace with one
thing wrong, and must print the CNI error JSON {cniVersion, code, msg, details} with the spec's
code and exit non-zero, leaving the store and the nftables rule set exactly as they were.
HTTP: raw bytes on sockets opened inside real pod namespaces, through the real nftables
interception, to the built iamlinkd; each case asserts the status and a fragment of the reason
(or that the connection is closed, where no answer is the right one), and iamlinkd must answer
an ordinary request right after.
Emulated: STS by moto, the node's metadata service by the fake upstream.
"""

import hashlib
import json
import os
import secrets
import subprocess
import time

import pytest

from harness import wait_until
from harness.netns_threads import NetnsThreads
from harness.rawhttp import build, exchange, request, slow_send
from harness.util import BASE_PATH, IAMLINK_PLUGIN, REFERENCE_PLUGINS, RELEASE

CREDS = "/latest/meta-data/iam/security-credentials/"
TTL = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN = "X-aws-ec2-metadata-token"
ROLES = [{"namespace": "team-a", "name": "web", "role": "web-role"},
         {"namespace": "team-a", "name": "batch", "role": "batch"}]


@pytest.fixture(scope="module")
def bench(make_module_bench):
    b = make_module_bench(pod_roles=ROLES)
    b.web = b.pods.add("team-a", "web")
    b.batch = b.pods.add("team-a", "batch")
    b.victim = b.pods.add("team-z", "victim")
    b.in_web = NetnsThreads(b.web.netns, workers=2)
    b.in_batch = NetnsThreads(b.batch.netns)
    b.callback(b.in_web.close)
    b.callback(b.in_batch.close)
    b.not_a_netns = os.path.join(b.node.workdir, "not-a-netns")
    open(b.not_a_netns, "w").close()
    # A namespace whose eth0 is a bridge: not a veth, and named nowhere in prevResult.
    b.bridge_ns = b.node.new_netns()
    b.node.exec(["ip", "link", "add", "eth0", "type", "bridge"], netns=b.bridge_ns)
    # A bridge in the node's namespace, as a bridge CNI plugin's cni0 would be.
    b.node.exec(["ip", "link", "add", "iamlinkbr0", "type", "bridge"])
    return b


# ---------------------------------------------------------------------------------------------
# CNI

def base_conf(bench, version="1.0.0", pod=None):
    return {"cniVersion": version, "name": "iamlink-test", "type": "iamlink", "daemonAddress": "198.18.0.1:8181",
            "storeDir": bench.store_dir, "prevResult": (pod or bench.victim).result}


def base_env(bench, command="ADD", pod=None):
    pod = pod or bench.victim
    return {"CNI_COMMAND": command, "CNI_CONTAINERID": secrets.token_hex(32), "CNI_NETNS": pod.netns_path,
            "CNI_IFNAME": "eth0", "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=team-z;K8S_POD_NAME=new;K8S_POD_UID=u1",
            "CNI_PATH": f"{REFERENCE_PLUGINS}:{RELEASE}"}


def run_plugin(bench, env, stdin):
    env = {k: v for k, v in env.items() if v is not None}
    env.update(PATH=BASE_PATH, LANG="C.UTF-8")
    return subprocess.run(["ip", "netns", "exec", bench.node.name, IAMLINK_PLUGIN], input=stdin, env=env,
                          capture_output=True, timeout=30)


def node_state(bench):
    """The store's records and slot links, and the rule set, to compare before and after."""
    store = {}
    for sub in ("records", "slots"):
        d = os.path.join(bench.store_dir, sub)
        for n in sorted(os.listdir(d)):
            p = os.path.join(d, n)
            store[f"{sub}/{n}"] = os.readlink(p) if os.path.islink(p) else hashlib.sha256(open(p, "rb").read()).hexdigest()
    rules = bench.node.exec(["nft", "list", "table", "inet", "iamlink"]).stdout
    return store, rules


def conf(**changes):
    """A case's netconf: the base with keys changed (None removes a key)."""
    def make(bench):
        c = base_conf(bench, changes.get("cniVersion", "1.0.0"))
        for k, v in changes.items():
            if v is None:
                c.pop(k, None)
            else:
                c[k] = v(bench) if callable(v) else v
        return json.dumps(c).encode()
    return make


def env(**changes):
    def make(bench, command):
        e = base_env(bench, command)
        for k, v in changes.items():
            e[k] = v(bench) if callable(v) else v
        return e
    return make


# id: (CNI_COMMAND, environment changes, stdin, code, message fragment, cniVersion of the error)
CNI_CASES = {
    "no-prevResult": ("ADD", env(), conf(prevResult=None), 7, "must run chained", "1.0.0"),
    "prevResult-not-a-result": ("ADD", env(), conf(prevResult={"interfaces": "eth0", "ips": 5}), 7,
                                "prevResult cannot be read", "1.0.0"),
    "prevResult-a-string": ("ADD", env(), conf(prevResult="198.18.64.2/24"), 7, "prevResult cannot be read", "1.0.0"),
    "unknown-cniVersion": ("ADD", env(), conf(cniVersion="9.9.9"), 1, "not supported", "1.1.0"),
    "no-cniVersion": ("ADD", env(), conf(cniVersion=None), 7, "lacks cniVersion", "1.1.0"),
    "cniVersion-a-number": ("ADD", env(), conf(cniVersion=1.0), 7, "lacks cniVersion", "1.1.0"),
    "no-CNI_COMMAND": ("ADD", env(CNI_COMMAND=None), conf(), 4, "CNI_COMMAND is not set", "1.0.0"),
    "unknown-CNI_COMMAND": ("ADD", env(CNI_COMMAND="FROB"), conf(), 4, "unknown CNI_COMMAND", "1.0.0"),
    "no-CNI_CONTAINERID": ("ADD", env(CNI_CONTAINERID=None), conf(), 4, "CNI_CONTAINERID", "1.0.0"),
    "no-CNI_IFNAME": ("ADD", env(CNI_IFNAME=None), conf(), 4, "CNI_IFNAME", "1.0.0"),
    "no-CNI_NETNS": ("ADD", env(CNI_NETNS=None), conf(), 4, "CNI_NETNS", "1.0.0"),
    "CNI_ARGS-without-namespace": ("ADD", env(CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAME=new;K8S_POD_UID=u1"), conf(),
                                   4, "K8S_POD_NAMESPACE or K8S_POD_NAME", "1.0.0"),
    "CNI_ARGS-without-name": ("ADD", env(CNI_ARGS="K8S_POD_NAMESPACE=team-z;K8S_POD_UID=u1"), conf(), 4,
                              "K8S_POD_NAMESPACE or K8S_POD_NAME", "1.0.0"),
    "no-CNI_ARGS": ("ADD", env(CNI_ARGS=None), conf(), 4, "K8S_POD_NAMESPACE or K8S_POD_NAME", "1.0.0"),
    "CNI_ARGS-malformed-entry": ("ADD", env(CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAMESPACE=team-z;broken;K8S_POD_NAME=new"),
                                 conf(), 4, "is not KEY=VALUE", "1.0.0"),
    "container-id-with-path": ("ADD", env(CNI_CONTAINERID="../../etc/passwd"), conf(), 4, "iamlink store", "1.0.0"),
    "netns-a-regular-file": ("ADD", env(CNI_NETNS=lambda b: b.not_a_netns), conf(), 3,
                             "cannot enter network namespace", "1.0.0"),
    "netns-missing": ("ADD", env(CNI_NETNS="/var/run/netns/iamlink-no-such-netns"), conf(), 3,
                      "cannot enter network namespace", "1.0.0"),
    "interface-not-veth-not-in-prevResult": (
        "ADD", env(CNI_NETNS=lambda b: f"/var/run/netns/{b.bridge_ns}"),
        conf(prevResult={"cniVersion": "1.0.0", "interfaces": [{"name": "eth0", "sandbox": "x"}],
                         "ips": [{"address": "198.18.65.2/24", "gateway": "198.18.65.1", "interface": 0}]}),
        100, "cannot find the host side of pod interface eth0", "1.0.0"),
    "prevResult-names-a-bridge": (
        "ADD", env(CNI_NETNS=lambda b: f"/var/run/netns/{b.bridge_ns}"),
        conf(prevResult={"cniVersion": "1.0.0", "interfaces": [{"name": "iamlinkbr0"}, {"name": "eth0", "sandbox": "x"}],
                         "ips": [{"address": "198.18.65.2/24", "gateway": "198.18.65.1", "interface": 1}]}),
        100, "host interface iamlinkbr0 named in prevResult is a bridge, not a veth", "1.0.0"),
    "no-such-interface": ("ADD", env(CNI_IFNAME="eth7"), conf(), 100, "no interface eth7", "1.0.0"),
    "stdin-over-1-MiB": ("ADD", env(), lambda b: b"{" + b" " * (1 << 20) + b"}", 6, "larger than 1 MiB", "1.1.0"),
    "stdin-not-utf8": ("ADD", env(), lambda b: b'{"cniVersion": "1.0.0", "name": "\xff\xfe"}', 6, "not UTF-8", "1.0.0"),
    "stdin-not-json": ("ADD", env(), lambda b: b'{"cniVersion": "1.0.0",', 6, "not valid JSON", "1.1.0"),
    "stdin-empty": ("ADD", env(), lambda b: b"", 6, "not valid JSON", "1.1.0"),
    "stdin-a-json-array": ("ADD", env(), lambda b: b"[1, 2]", 7, "lacks cniVersion", "1.1.0"),
    "daemonAddress-not-ip-port": ("ADD", env(), conf(daemonAddress="iamlinkd.local:8181"), 7, "daemonAddress", "1.0.0"),
    "daemonAddress-ipv6": ("ADD", env(), conf(daemonAddress="[fd00::1]:8181"), 7, "daemonAddress", "1.0.0"),
    "daemonAddress-missing": ("ADD", env(), conf(daemonAddress=None), 7, "needs daemonAddress", "1.0.0"),
    "markMask-0x0": ("ADD", env(), conf(markMask="0x0"), 7, "invalid iamlink network configuration", "1.0.0"),
    "markMask-not-hex": ("ADD", env(), conf(markMask="0xzz"), 7, "invalid iamlink network configuration", "1.0.0"),
    "credentialsAddress-not-ip": ("ADD", env(), conf(credentialsAddress="169.254.170.x"), 7, "credentialsAddress",
                                  "1.0.0"),
    "GC-without-valid-attachments": ("GC", env(), conf(cniVersion="1.1.0"), 7, "cni.dev/valid-attachments", "1.1.0"),
    "GC-at-1.0.0": ("GC", env(), conf(**{"cni.dev/valid-attachments": []}), 1, "GC needs cniVersion 1.1.0", "1.0.0"),
    "STATUS-at-0.4.0": ("STATUS", env(), conf(cniVersion="0.4.0"), 1, "STATUS needs cniVersion 1.1.0", "0.4.0"),
    "CHECK-at-0.3.1": ("CHECK", env(), conf(cniVersion="0.3.1"), 1, "CHECK needs cniVersion 0.4.0", "0.3.1"),
    "CHECK-without-prevResult": ("CHECK", env(), conf(prevResult=None), 7, "must run chained", "1.0.0"),
    "DEL-without-CNI_CONTAINERID": ("DEL", env(CNI_CONTAINERID=None), conf(), 4, "CNI_CONTAINERID", "1.0.0"),
}


# Where the fix is in the details rather than the message.
CNI_DETAILS = {
    "unknown-cniVersion": "supported: 0.3.0, 0.3.1, 0.4.0, 1.0.0, 1.1.0",
    "container-id-with-path": "must be 1-256 characters",
    "netns-a-regular-file": "Invalid argument",
    "netns-missing": "No such file",
    "interface-not-veth-not-in-prevResult": "not a veth",
    "stdin-not-json": "EOF while parsing",
    "markMask-0x0": "mark mask must have at least one bit set",
}


def test_cni_base_of_the_bad_input_cases_is_a_good_add(bench):
    """Each case below is this ADD with one thing wrong: the ADD itself succeeds (and DEL undoes it)."""
    pod = bench.pods.add("team-z", "control")
    try:
        e = base_env(bench, pod=pod)
        p = run_plugin(bench, e, json.dumps(base_conf(bench, pod=pod)).encode())
        assert p.returncode == 0 and json.loads(p.stdout) == pod.result, (p.stdout, p.stderr)
        assert os.path.exists(os.path.join(bench.store_dir, "records", f"{e['CNI_CONTAINERID']}.eth0.json"))
        p = run_plugin(bench, dict(e, CNI_COMMAND="DEL"), json.dumps(base_conf(bench, pod=pod)).encode())
        assert p.returncode == 0, (p.stdout, p.stderr)
    finally:
        bench.pods.delete(pod)


@pytest.mark.parametrize("case", CNI_CASES, ids=list(CNI_CASES))
def test_cni_bad_input_gets_its_error_and_changes_nothing(bench, case):
    command, make_env, make_stdin, code, fragment, version = CNI_CASES[case]
    before = node_state(bench)
    p = run_plugin(bench, make_env(bench, command), make_stdin(bench))
    out = p.stdout.decode("utf-8", "replace")
    assert p.returncode != 0, f"{case}: exit 0, stdout {out!r}"
    try:
        err = json.loads(out)
    except ValueError:
        raise AssertionError(f"{case}: stdout is not the CNI error JSON: {out!r} (stderr {p.stderr!r})")
    assert set(err) <= {"cniVersion", "code", "msg", "details"} and {"cniVersion", "code", "msg"} <= set(err), err
    assert err["code"] == code, f"{case}: code {err['code']}, expected {code}: {err}"
    assert fragment in err["msg"], f"{case}: msg {err['msg']!r} lacks {fragment!r} ({err})"
    assert err["cniVersion"] == version, f"{case}: cniVersion {err['cniVersion']!r}, expected {version!r}"
    if case in CNI_DETAILS:
        assert CNI_DETAILS[case] in err.get("details", ""), f"{case}: details lack {CNI_DETAILS[case]!r}: {err}"
    assert node_state(bench) == before, f"{case}: the store or the rule set changed"


def test_cni_add_repeated_for_the_same_container_succeeds_with_the_same_slot(bench):
    pod = bench.victim
    records = os.path.join(bench.store_dir, "records")
    mine = f"{pod.cid}.eth0.json"
    first = json.load(open(os.path.join(records, mine)))
    stdin = json.dumps(base_conf(bench)).encode()
    e = dict(base_env(bench), CNI_CONTAINERID=pod.cid, CNI_ARGS=pod.cni_args())
    p = run_plugin(bench, e, stdin)
    assert p.returncode == 0, (p.stdout, p.stderr)
    assert json.loads(p.stdout) == pod.result, "the repeated ADD did not return the previous result"
    again = json.load(open(os.path.join(records, mine)))
    assert again["slot"] == first["slot"] and again["hostInterface"] == first["hostInterface"], (first, again)
    assert again["pod"] == first["pod"], (first, again)
    assert sorted(f for f in os.listdir(records) if f.startswith(pod.cid)) == [mine]
    links = {n: os.readlink(os.path.join(bench.store_dir, "slots", n)) for n in os.listdir(os.path.join(bench.store_dir, "slots"))}
    assert [n for n, t in links.items() if t.endswith(mine)] == [str(first["slot"])], links
    rules = bench.node.exec(["nft", "list", "map", "inet", "iamlink", "pods"]).stdout
    assert rules.count(f'"{pod.host_ifname}"') == 1 and f'"{pod.host_ifname}" : jump slot-{first["slot"]}' in rules, rules


def test_cni_add_whose_prevResult_names_a_live_pods_host_interface_is_refused_and_that_pod_keeps_its_role(bench):
    """A pod whose eth0 is no veth (so the plugin falls back to prevResult), with an address and
    its gateway on-link, and a prevResult naming team-a/web's host interface: refused, naming
    the interface and its owner; web keeps its element and its role."""
    ns = bench.node.new_netns()
    bench.callback(bench.node.delete_netns, ns)
    for argv in (["ip", "link", "add", "eth0", "type", "bridge"], ["ip", "addr", "add", "198.18.65.2/24", "dev", "eth0"],
                 ["ip", "link", "set", "eth0", "up"]):
        bench.node.exec(argv, netns=ns)
    web = bench.web
    prev = {"cniVersion": "1.0.0", "interfaces": [{"name": web.host_ifname}, {"name": "eth0", "sandbox": "x"}],
            "ips": [{"address": "198.18.65.2/24", "gateway": "198.18.65.1", "interface": 1}]}
    before = node_state(bench)
    p = run_plugin(bench, dict(base_env(bench), CNI_NETNS=f"/var/run/netns/{ns}"),
                   json.dumps(dict(base_conf(bench), prevResult=prev)).encode())
    out = p.stdout.decode("utf-8", "replace")
    assert p.returncode != 0, f"exit 0: {out}"
    err = json.loads(out)
    assert err["code"] == 100, err
    for fragment in (f"host interface {web.host_ifname}", "team-a/web", web.cid):
        assert fragment in err["msg"], f"{fragment!r} missing: {err}"
    assert node_state(bench) == before, "the store or the rule set changed"
    assert_still_serving(bench)


# ---------------------------------------------------------------------------------------------
# HTTP

def token_of(threads, ttl="300"):
    r = threads.call(request, "PUT", "/latest/api/token", [(TTL, ttl)])
    assert r.status == 200, r
    return r.text


def get(path, *headers, **options):
    return lambda bench: bench.in_web.call(request, "GET", path, list(headers), **options)


def raw(data, timeout=5.0):
    return lambda bench: bench.in_web.call(exchange, data, timeout=timeout)


def with_token(token_from, path=CREDS):
    return lambda bench: bench.in_web.call(request, "GET", path, [(TOKEN, token_from(bench))])


def put_token(*headers):
    return lambda bench: bench.in_web.call(request, "PUT", "/latest/api/token", list(headers))


CLOSED = "closed"  # the right answer is no answer: the connection closed without a status

# id: (request, acceptable statuses (or CLOSED), reason fragment or None)
HTTP_CASES = {
    "forged-token": (with_token(lambda b: "forged"), {401}, "token invalid"),
    "forged-token-with-valid-shape": (with_token(lambda b: f"{int(time.time()) + 300}.{'0' * 64}"), {401},
                                      "token invalid"),
    "empty-token": (with_token(lambda b: ""), {401}, "token invalid"),
    "non-ascii-token": (raw(build("GET", CREDS, [(TOKEN, "t\u00f6k\u00e9n")])), {401}, "token invalid"),
    "another-pods-token": (with_token(lambda b: token_of(b.in_batch)), {401}, "token invalid for this pod"),
    "ttl-0": (put_token((TTL, "0")), {400}, "1-21600"),
    "ttl-21601": (put_token((TTL, "21601")), {400}, "1-21600"),
    "ttl-missing": (put_token(), {400}, "1-21600"),
    "ttl-not-a-number": (put_token((TTL, "1e3")), {400}, "1-21600"),
    "x-forwarded-for-on-put": (put_token((TTL, "60"), ("X-Forwarded-For", "198.18.64.99")), {403},
                               "may not be forwarded"),
    "dot-dot-traversal": (get(CREDS + "../../user-data"), {404}, "not this pod's role"),
    "encoded-dot-dot-traversal": (get(CREDS + "%2e%2e/%2e%2e/user-data"), {404}, "not this pod's role"),
    "encoded-dot-dot-from-allowed-path": (get("/latest/meta-data/placement/region/%2e%2e/%2e%2e/iam/info"), {404},
                                          "not served"),
    "percent-encoded-role-name": (get(CREDS + "web%2Drole"), {404}, "not this pod's role"),
    "role-name-with-trailing-slash": (get(CREDS + "web-role/"), {404}, "not this pod's role"),
    "node-role-by-name": (get(CREDS + "iamlink-node-role"), {404}, "not this pod's role"),
    "user-data": (get("/latest/user-data"), {404}, "not served"),
    "post": (lambda b: b.in_web.call(request, "POST", CREDS, body=b"x"), {405}, "method not allowed"),
    "delete": (lambda b: b.in_web.call(request, "DELETE", CREDS), {405}, "method not allowed"),
    "patch": (lambda b: b.in_web.call(request, "PATCH", "/latest/api/token", [(TTL, "60")]), {405},
              "method not allowed"),
    "options": (lambda b: b.in_web.call(request, "OPTIONS", "*"), {405}, "method not allowed"),
    "put-elsewhere": (lambda b: b.in_web.call(request, "PUT", CREDS, [(TTL, "60")]), {405}, "PUT only for the token"),
    "http-1.0-without-host": (raw(build("GET", CREDS, version="HTTP/1.0", host=None, close=False)), {200}, "web-role"),
    "garbage-request-line": (raw(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n"), {400, CLOSED}, None),
    "request-line-without-version": (raw(b"GET /latest/meta-data/iam/security-credentials/\r\n\r\n"), {400, CLOSED},
                                     None),
    "nul-in-header": (raw(build("GET", CREDS, [("X-Evil", "a\x00b")])), {400, CLOSED}, None),
    "conflicting-content-lengths": (raw(b"PUT /latest/api/token HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n"
                                        b"Content-Length: 2\r\n" + TTL.encode() + b": 60\r\n\r\nab"), {400, CLOSED},
                                    None),
    "header-of-1-MB": (raw(build("GET", CREDS, [("X-Big", "a" * 1_000_000)]), timeout=10), {431, 400, CLOSED}, None),
}


def assert_still_serving(bench):
    r = bench.in_web.call(request, "GET", CREDS + "web-role")
    assert r.status == 200 and json.loads(r.body)["AccessKeyId"], f"iamlinkd after a bad request: {r}"
    assert bench.daemon.running, bench.daemon.log_tail()


@pytest.mark.parametrize("case", HTTP_CASES, ids=list(HTTP_CASES))
def test_http_bad_input_gets_its_status_and_iamlinkd_keeps_serving(bench, case):
    send, statuses, fragment = HTTP_CASES[case]
    r = send(bench)
    got = CLOSED if r.status is None and r.closed else r.status
    assert got in statuses, f"{case}: expected {statuses}, got {r}"
    if fragment is not None:
        assert fragment in r.text, f"{case}: reason {r.text!r} lacks {fragment!r}"
    assert not bench.upstream.leaked(r.text) and "node-secret-user-data" not in r.text, r
    assert_still_serving(bench)


def test_header_of_100_KB_is_refused_and_iamlinkd_keeps_serving(bench):
    r = bench.in_web.call(exchange, build("GET", CREDS, [("X-Big", "a" * 100_000)]), timeout=10)
    got = CLOSED if r.status is None and r.closed else r.status
    assert got in (431, CLOSED), f"a 100 KB header must be refused (iamlinkd's head limit is 16 KiB): {r}"
    assert_still_serving(bench)


def test_expired_token_is_refused_as_expired(bench):
    t = token_of(bench.in_web, ttl="1")

    def expired():
        r = bench.in_web.call(request, "GET", CREDS, [(TOKEN, t)])
        assert r.status in (200, 401), r
        return r if r.status == 401 else None

    r = wait_until(expired, 5, "a token with a TTL of 1 s to expire", interval=0.1)
    assert "token expired" in r.text, r
    assert_still_serving(bench)


SLOW_BYTE = 0.25     # seconds between a slowloris client's bytes: ~20 s for its whole request head
HEADER_TIMEOUT = 5   # iamlinkd's limit on a request head


def test_slowloris_is_cut_after_the_header_timeout_and_others_are_served_meanwhile(bench):
    head = build("GET", CREDS, [("X-Padding", "p" * 40)])
    assert len(head) * SLOW_BYTE > 3 * HEADER_TIMEOUT
    slow = bench.in_web.submit(slow_send, head, SLOW_BYTE, limit=4 * HEADER_TIMEOUT)
    served = []
    while not slow.done():
        r = bench.in_batch.call(request, "GET", CREDS + "batch")
        served.append((r.status, r.elapsed))
        time.sleep(0.01)  # about 100 requests a second: under the pod's rate limit
    closed_after, sent, answer = slow.result()
    assert closed_after is not None, f"iamlinkd kept a slowloris connection open ({sent} of {len(head)} bytes sent)"
    assert HEADER_TIMEOUT - 0.5 <= closed_after <= HEADER_TIMEOUT + 3, \
        f"closed {closed_after:.1f}s after connect ({sent} bytes sent), expected about {HEADER_TIMEOUT}s"
    assert sent < len(head), "the whole request was sent before the close"
    assert not answer.startswith(b"HTTP/1.1 200"), answer
    assert len(served) >= 20 and {s for s, _ in served} == {200}, f"another pod meanwhile: {served[:10]}..."
    assert max(e for _, e in served) < 1.0, f"slowest answer to another pod {max(e for _, e in served):.2f}s"
    assert_still_serving(bench)

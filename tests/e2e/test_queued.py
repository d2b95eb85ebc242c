"""A connection whose pod's iamlink DEL ran is never answered for the pod that takes its slot next.

The pod's interface is still up (iamlink's DEL runs before ptp's; a DEL may be retried on a live
sandbox), so a process of the old pod can hold a connection made before its DEL and speak on it
after another pod took the slot: while iamlinkd was not accepting (stopped here with SIGSTOP; the
kernel completes handshakes into the listen queue), or with the handshake's last ACK held back
(the server side is then a request socket, dated by nothing yet). The first bytes come after the
new pod's ADD.

Real parts: namespaces and veths, ptp + host-local + the built iamlink plugin through libcni, the
nftables interception, the built iamlinkd; the old pod's client is a plain socket in its
namespace. Emulated: STS by moto.
"""

import json
import os
import signal
import socket
import time

import pytest

from conftest import record_of
from harness import is_assumed_role, wait_until
from harness.netns_threads import NetnsThreads
from harness.rawhttp import METADATA, build, error_kind

CREDS = "/latest/meta-data/iam/security-credentials/"
DAEMON_PORT = 8181


def connect(threads):
    """A TCP connection to the metadata address from the pod the threads live in; the kernel
    completes the handshake whether or not iamlinkd accepts."""
    return threads.call(socket.create_connection, METADATA, timeout=10)


def server_side(bench, pod, state):
    """The node's sockets on iamlinkd's port in `state` (ss's name) whose peer is `pod`."""
    out = bench.node.exec(["ss", "-tnH", "state", state, "sport", f"= :{DAEMON_PORT}", "dst", pod.ip]).stdout
    return out.strip()


def talk(sock, data, timeout=10.0):
    """Sends `data` on `sock` and reads until the server closes, resets, or `timeout` passes
    without a byte. Returns (bytes received, how it ended)."""
    received, ended = b"", "timeout"
    sock.settimeout(timeout)
    try:
        sock.sendall(data)
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                ended = "closed"
                break
            received += chunk
    except OSError as e:
        ended = error_kind(e)
    finally:
        sock.close()
    return received, ended


def answers(received):
    """The (status, body) of each HTTP answer in `received`, in order."""
    out, rest = [], received
    while rest.startswith(b"HTTP/1."):
        head, _, rest = rest.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        length = next((int(v) for k, _, v in (line.partition(":") for line in lines[1:])
                       if k.strip().lower() == "content-length"), len(rest))
        out.append((int(lines[0].split(" ")[1]), rest[:length].decode("utf-8", "replace")))
        rest = rest[length:]
    return out


def assert_not_answered_for(bench, received, ended, new_pod, what):
    """Nothing in `received` is an answer: no status 200, no credentials (the new pod's or
    anyone's), nothing of the node's."""
    got = answers(received)
    arns = [bench.moto.caller_arn(json.loads(body)) for _, body in got if '"AccessKeyId"' in body]
    assert all(status != 200 for status, _ in got) and b"AccessKeyId" not in received, (
        f"{what} was answered after {new_pod} took its slot: {[s for s, _ in got]}, credentials of {arns}, "
        f"ended {ended}: {received[:600]!r}")
    assert not bench.upstream.leaked(received.decode("utf-8", "replace")), received


def get(path, headers=()):
    return build("GET", path, headers, close=False)


# What the old pod sends once the slot is the new pod's: the new pod's role by name, and what an
# SDK would send on a kept connection (listing, token, credentials with it).
ONE_REQUEST = get(CREDS + "batch")
SEVERAL_REQUESTS = (get(CREDS) + get(CREDS + "batch")
                    + build("PUT", "/latest/api/token", [("X-aws-ec2-metadata-token-ttl-seconds", "300")], close=False)
                    + build("GET", CREDS + "batch", close=True))


def del_web_and_add_batch_on_its_slot(bench, web):
    slot = record_of(bench, web)["slot"]
    gone = bench.pods.del_iamlink_only(web)
    assert gone.returncode == 0, f"{gone.stdout} {gone.stderr}"
    batch = bench.pods.add("team-a", "batch")
    assert record_of(bench, batch)["slot"] == slot, "the lowest free slot, web's, was not reused"
    return batch


def assert_batch_has_its_role(bench, batch):
    mine = batch.imds("creds")
    assert mine["ok"] and mine["role"] == "batch", mine
    assert is_assumed_role(bench.moto.caller_arn(mine["creds"]), "batch"), mine


@pytest.mark.parametrize("requests", ["one after iamlinkd continues", "several before it continues"])
def test_connection_queued_before_its_pods_del_and_silent_until_the_next_add_is_never_answered_for_that_pod(
        make_bench, requests):
    bench = make_bench()
    web = bench.pods.add("team-a", "web")
    several = requests.startswith("several")
    with NetnsThreads(web.netns) as in_web:
        pid = bench.daemon.proc.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            sock = connect(in_web)
            assert sock.getpeername() == METADATA
            wait_until(lambda: server_side(bench, web, "established"), 10, "web's connection in iamlinkd's listen queue")
            batch = del_web_and_add_batch_on_its_slot(bench, web)
            if several:
                # In the socket before iamlinkd runs again, which reads them all at accept. A
                # connection already reset refuses them; what it answers is read below either way.
                try:
                    sock.sendall(SEVERAL_REQUESTS)
                except OSError as e:
                    print(f"sending on web's connection: {error_kind(e)}")
        finally:
            os.kill(pid, signal.SIGCONT)
        received, ended = talk(sock, b"" if several else ONE_REQUEST)
    assert_not_answered_for(bench, received, ended, batch, "web's connection, queued before its DEL")
    assert_batch_has_its_role(bench, batch)


# By the connection's original destination: the pod's own DNAT (nat output, before this filter)
# has rewritten the packets' destination to iamlinkd's pod port already.
HOLD_ACKS = """table inet hold {
  chain out { type filter hook output priority 0; ct original ip daddr 169.254.169.254 tcp flags & syn != syn drop; }
}
"""


def test_handshake_whose_last_ack_is_held_back_across_the_slots_reuse_is_never_answered_for_the_next_pod(
        make_bench):
    """The SYN carried web's slot; its handshake's last ACK (and everything after it) is held
    back in web's namespace until batch holds the slot. The server's socket is then created by
    web's first data segment, after batch's record, with the SYN's mark."""
    bench = make_bench()
    web = bench.pods.add("team-a", "web")
    bench.node.exec(["nft", "-f", "-"], netns=web.netns, input=HOLD_ACKS)
    with NetnsThreads(web.netns) as in_web:
        sock = connect(in_web)
        wait_until(lambda: server_side(bench, web, "syn-recv"), 10, "web's half-open connection at iamlinkd's port")
        assert not server_side(bench, web, "established")
        batch = del_web_and_add_batch_on_its_slot(bench, web)
        bench.node.exec(["nft", "delete", "table", "inet", "hold"], netns=web.netns)
        received, ended = talk(sock, ONE_REQUEST)
    assert_not_answered_for(bench, received, ended, batch, "web's connection, opened before its DEL")
    assert_batch_has_its_role(bench, batch)


def test_kept_connection_gets_nothing_after_its_pods_del(make_bench):
    """An accepted keep-alive connection answered for web before web's DEL: its next request,
    after batch took the slot, is not answered."""
    bench = make_bench()
    web = bench.pods.add("team-a", "web")
    with NetnsThreads(web.netns) as in_web:
        sock = connect(in_web)
        sock.settimeout(10)
        sock.sendall(get(CREDS))
        first = b""
        deadline = time.monotonic() + 10
        while b"\r\n\r\nweb" not in first and time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            first += chunk
        assert first.startswith(b"HTTP/1.1 200") and first.endswith(b"web"), first
        batch = del_web_and_add_batch_on_its_slot(bench, web)
        received, ended = talk(sock, ONE_REQUEST)
    assert_not_answered_for(bench, received, ended, batch, "web's kept connection")
    assert_batch_has_its_role(bench, batch)

"""The plugin tells iamlinkd about each pod over the daemon's local socket (start the STS call at
ADD; remove the entry at DEL on the daemon's open netlink socket). A daemon that is stopped or
hung never fails or holds up ADD and DEL beyond their bounds, and a message on that socket can
never make the daemon serve a pod the store does not hold.

Real parts: namespaces and veths, ptp + host-local + the built iamlink plugin through libcni
(`cnirt`), nftables, the built iamlinkd; the AWS CLI in the pods. Emulated: STS by moto, the
node's metadata service by the fake upstream.
"""

import json
import os
import signal
import socket
import subprocess
import time

from harness import role_of_arn
from harness.imds_client import CREDS_PATH

CREDS = CREDS_PATH


def post(sock_path, path, timeout=5.0):
    """(status, parsed JSON body) of `POST path` on the daemon's local socket."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(sock_path)
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: iamlinkd\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while len(data) < 65536:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    finally:
        s.close()
    head, _, body = data.decode().partition("\r\n\r\n")
    status = int(head.split(" ")[1])
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body


def get_status(bench):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(api_socket(bench))
    s.sendall(b"GET /v1/status HTTP/1.1\r\nHost: iamlinkd\r\nConnection: close\r\n\r\n")
    data = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    s.close()
    return json.loads(data.decode().partition("\r\n\r\n")[2])


def api_socket(bench):
    return os.path.join(bench.store_dir, "iamlinkd.sock")


def map_entries(bench):
    p = bench.node.exec(["nft", "-j", "list", "map", "inet", "iamlink", "pods"], check=False)
    if p.returncode != 0:
        return {}
    for item in json.loads(p.stdout)["nftables"]:
        if "map" in item:
            return {e[0]: e[1]["jump"]["target"] for e in item["map"].get("elem", [])}
    return {}


def timed(fn):
    t0 = time.monotonic()
    out = fn()
    return out, time.monotonic() - t0


def assert_own_role(pod, role):
    rc, out, err = pod.caller_arn()
    assert rc == 0 and role_of_arn(out) == role, f"{pod}: rc {rc} {out!r} {err!r}"


def test_add_and_del_are_quick_while_iamlinkd_is_stopped_and_the_pod_gets_its_own_role_when_it_starts(make_bench):
    bench = make_bench()
    # A wait the plugin must not spend on a daemon that is not there.
    bench.pods.set_netconf(waitForCredentials="5s")
    earlier = bench.pods.add("team-a", "batch")
    bench.daemon.stop()

    web, add_s = timed(lambda: bench.pods.add("team-a", "web"))
    assert add_s < 2.5, f"ADD took {add_s:.2f}s with iamlinkd stopped"
    assert web.host_ifname in map_entries(bench), "the pod is intercepted before ADD returns"
    r = web.imds("request", "GET", CREDS, "--timeout", "2")
    assert r.get("error") == "refused", f"while iamlinkd is down: {r}"

    _, del_s = timed(lambda: bench.pods.delete(earlier))
    assert del_s < 2.5, f"DEL took {del_s:.2f}s with iamlinkd stopped"
    assert earlier.host_ifname not in map_entries(bench), "the plugin removed the entry itself"

    bench.daemon.start()
    assert_own_role(web, "web")


def test_add_and_del_keep_their_bounds_while_iamlinkd_hangs(make_bench):
    bench = make_bench()
    bench.pods.set_netconf(waitForCredentials="300ms")
    earlier = bench.pods.add("team-a", "batch")
    os.kill(bench.daemon.proc.pid, signal.SIGSTOP)
    try:
        web, add_s = timed(lambda: bench.pods.add("team-a", "web"))
        assert add_s < 2.5, f"ADD took {add_s:.2f}s with iamlinkd hung"
        _, del_s = timed(lambda: bench.pods.delete(earlier))
        assert del_s < 2.5, f"DEL took {del_s:.2f}s with iamlinkd hung"
        entries = map_entries(bench)
        assert web.host_ifname in entries and earlier.host_ifname not in entries, entries
    finally:
        os.kill(bench.daemon.proc.pid, signal.SIGCONT)
    assert_own_role(web, "web")


def test_a_pod_with_a_role_finds_its_credentials_cached_when_add_returns(make_bench):
    bench = make_bench()
    web = bench.pods.add("team-a", "web")
    status = get_status(bench)
    assert status["credentialsUsable"] >= 1, status
    norole, add_s = timed(lambda: bench.pods.add("team-c", "norole"))
    assert add_s < 2.5, f"a pod without a role waited {add_s:.2f}s"
    assert_own_role(web, "web")


def test_a_message_on_the_local_socket_cannot_make_iamlinkd_serve_a_pod_the_store_does_not_hold(make_bench):
    bench = make_bench()
    web = bench.pods.add("team-a", "web")
    batch = bench.pods.add("team-a", "batch")
    bench.pods.delete(batch, remove_netns=False)
    before = get_status(bench)
    sock = api_socket(bench)
    gone_key = f"{batch.cid}.eth0"
    # Messages naming a deleted pod, made-up keys and path tricks: nothing is read but the store.
    for key in (gone_key, "0" * 64 + ".eth0", "..%2Flock", ".eth0"):
        status, body = post(sock, f"/v1/pods/{key}/prefetch?wait_ms=200")
        assert status == 404, (key, status, body)
        status, body = post(sock, f"/v1/pods/{key}/release?deadline_ns={2**62}")
        assert status == 404, (key, status, body)
    after = get_status(bench)
    assert after["cacheEntries"] == before["cacheEntries"] and after["records"] == before["records"], (before, after)
    # The deleted pod is answered by nobody; the live pod keeps its role and its entry.
    r = batch.imds("creds", "--timeout", "2")
    assert not r["ok"], f"{batch} after DEL: {r}"
    assert web.host_ifname in map_entries(bench)
    assert_own_role(web, "web")
    bench.node.delete_netns(batch.netns)


def test_only_root_may_send_pod_events(make_bench):
    bench = make_bench()
    web = bench.pods.add("team-a", "web")
    sock = api_socket(bench)
    # Open the permissions (which alone keep others out: the store is 0700, the socket 0600) to
    # show that the kernel's peer check holds too; every directory above is made searchable.
    opened = {sock: 0o666}
    d = bench.store_dir
    while d != "/":
        opened[d] = os.stat(d).st_mode | 0o711
        d = os.path.dirname(d)
    modes = {path: os.stat(path).st_mode & 0o7777 for path in opened}
    try:
        for path, mode in opened.items():
            os.chmod(path, mode & 0o7777)
        code = (
            "import os,socket,sys\n"
            "os.setgid(65534); os.setuid(65534)\n"
            "s=socket.socket(socket.AF_UNIX); s.settimeout(5); s.connect(sys.argv[1])\n"
            "s.sendall(('POST /v1/pods/%s/release?deadline_ns=%d HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n'"
            " % (sys.argv[2], 2**62)).encode())\n"
            "print(s.recv(4096).decode().split(' ')[1])\n")
        p = subprocess.run(["python3", "-c", code, sock, f"{web.cid}.eth0"], capture_output=True, text=True, timeout=30)
        assert p.returncode == 0 and p.stdout.strip() == "403", (p.stdout, p.stderr)
    finally:
        for path, mode in modes.items():
            os.chmod(path, mode)
    assert web.host_ifname in map_entries(bench), "a non-root message removed nothing"
    assert_own_role(web, "web")

"""FakeUpstream: the node's "real" metadata service, serving the node role."""

import datetime
import http.client
import json
import os

from .moto import NODE_ROLE
from .util import Fatal, BASE_PATH, FAKE_IMDS_SERVER, PYTHON, json_lines, stop_process, tail, wait_until

__all__ = ["FakeUpstream", "NODE_ROLE"]


class FakeUpstream:
    """fake_imds_server.py on 169.254.169.254:80, with moto credentials of the node role.

    It runs in a namespace of its own behind a veth, as the real service sits behind the node's
    ENI: pods reach it only through the node's forwarding path (routing, the FORWARD hook), never
    by local delivery, so a leak through that path is visible.
    """

    HOST = "169.254.169.254"
    PORT = 80
    NODE_SIDE = "198.18.1.1"
    UPSTREAM_SIDE = "198.18.1.2"

    def __init__(self, node, moto, start=True):
        self.node = node
        self.moto = moto
        self.netns = node.new_netns("iamlink-pod-imds")
        node.exec(["ip", "link", "add", "imds0", "type", "veth", "peer", "name", "eth0", "netns", self.netns])
        node.exec(["ip", "addr", "add", f"{self.NODE_SIDE}/30", "dev", "imds0"])
        node.exec(["ip", "link", "set", "imds0", "up"])
        node.exec(["ip", "route", "add", f"{self.HOST}/32", "via", self.UPSTREAM_SIDE, "dev", "imds0"])
        for argv in (["ip", "link", "set", "lo", "up"], ["ip", "addr", "add", f"{self.HOST}/32", "dev", "lo"],
                     ["ip", "addr", "add", f"{self.UPSTREAM_SIDE}/30", "dev", "eth0"],
                     ["ip", "link", "set", "eth0", "up"],
                     ["ip", "route", "add", "default", "via", self.NODE_SIDE]):
            node.exec(argv, netns=self.netns)
        self.log_path = os.path.join(node.workdir, "upstream-requests.jsonl")
        self.stderr_path = os.path.join(node.workdir, "upstream.log")
        self.creds_path = os.path.join(node.workdir, "node-role-creds.json")
        self.region_path = os.path.join(node.workdir, "upstream-region")
        self.node_role_arn = moto.create_node_role(NODE_ROLE)
        c = moto.assume_role(NODE_ROLE, session="i-0fakeiamlinknode", duration=43200)
        exp = c["Expiration"]
        if isinstance(exp, datetime.datetime):
            exp = exp.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.creds = dict(c, Expiration=exp)
        with open(self.creds_path, "w") as f:
            json.dump(self.creds, f)
        self.proc = None
        # (client address, CLOCK_MONOTONIC seconds): a test's declared window in which that client
        # reaching the node's role is the point, not a leak (a pod before anything of iamlink runs).
        self.expected = []
        if start:
            self.start()

    def start(self, timeout=20):
        err = open(self.stderr_path, "ab")
        self.proc = self.node.spawn(
            [PYTHON, FAKE_IMDS_SERVER, "--listen", f"{self.HOST}:{self.PORT}",
             "--creds", self.creds_path, "--log", self.log_path, "--region-file", self.region_path],
            netns=self.netns, env={"PATH": BASE_PATH, "LANG": "C.UTF-8"}, stdout=err, stderr=err)
        err.close()

        def ready():
            if self.proc.poll() is not None:
                raise Fatal(f"fake upstream exited {self.proc.returncode}:\n{tail(self.stderr_path)}")
            return self.node.call(self._region) == "us-east-1"

        wait_until(ready, timeout, "fake upstream on 169.254.169.254:80", interval=0.05)

    def set_region(self, region):
        """The region the node's metadata names from now on; "": none (placement/region is 404)."""
        with open(self.region_path, "w") as f:
            f.write(region)

    def _region(self):
        try:
            conn = http.client.HTTPConnection(self.HOST, self.PORT, timeout=1)
            conn.request("GET", "/latest/meta-data/placement/region")
            body = conn.getresponse().read().decode()
            conn.close()
            return body
        except OSError:
            return None

    def stop(self):
        if self.proc is not None:
            stop_process(self.proc, timeout=5)
            self.node.forget(self.proc)
            self.proc = None

    def requests(self):
        """Every request the fake upstream answered, as dicts (method, path, client, status)."""
        return json_lines(self.log_path)

    def credential_requests(self):
        """Requests for the node's credentials: none may come from anybody in the bench."""
        return [r for r in self.requests() if "/iam/" in r["path"]]

    def expect_before(self, client, t):
        """Credential requests from `client` answered before `t` (time.monotonic()) are what the
        test shows on purpose; the bench's invariant leaves them out, the test says why."""
        self.expected.append((client, t))

    def unexpected_credential_requests(self):
        return [r for r in self.credential_requests()
                if not any(r["client"] == c and r.get("t", float("inf")) < t for c, t in self.expected)]

    def leaked(self, text):
        """True when `text` carries the node role's identity or keys."""
        return bool(text) and (self.creds["AccessKeyId"] in text or NODE_ROLE in text)

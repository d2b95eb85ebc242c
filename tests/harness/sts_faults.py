"""StsFaultProxy: sts_fault_proxy.py inside the node, between iamlinkd and moto, switched by tests."""

import http.client
import json
import os

from .moto import role_arn
from .util import BASE_PATH, PYTHON, Fatal, stop_process, tail, wait_until

FAULT_PROXY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sts_fault_proxy.py")


class StsFaultProxy:
    """Listens on 198.18.0.2:5001 (give `endpoint` to iamlinkd as `sts.endpoint`), forwards to
    moto on 198.18.0.2:5000, and takes commands on 127.0.0.1:5002 in the node (reached through
    the node's worker thread, so from nowhere else)."""

    HOST = "198.18.0.2"
    PORT = 5001
    CONTROL = ("127.0.0.1", 5002)

    def __init__(self, node, moto, start=True):
        self.node = node
        self.moto = moto
        self.endpoint = f"http://{self.HOST}:{self.PORT}"
        self.log_path = os.path.join(node.workdir, "sts-fault-proxy.log")
        self.proc = None
        if start:
            self.start()

    def start(self, timeout=20):
        log = open(self.log_path, "ab")
        self.proc = self.node.spawn(
            [PYTHON, FAULT_PROXY, "--listen", f"{self.HOST}:{self.PORT}",
             "--control", "%s:%d" % self.CONTROL, "--upstream", f"{self.moto.HOST}:{self.moto.PORT}"],
            env={"PATH": BASE_PATH, "LANG": "C.UTF-8"}, stdout=log, stderr=log)
        log.close()

        def ready():
            if self.proc.poll() is not None:
                raise Fatal(f"STS fault proxy exited {self.proc.returncode}:\n{tail(self.log_path)}")
            return self.node.can_connect(self.HOST, self.PORT) and self.node.can_connect(*self.CONTROL)

        wait_until(ready, timeout, "STS fault proxy on 198.18.0.2:5001", interval=0.05)
        return self

    def stop(self):
        if self.proc is not None:
            stop_process(self.proc, timeout=5)
            self.node.forget(self.proc)
            self.proc = None

    def _control(self, method, path, body=None):
        def call():
            conn = http.client.HTTPConnection(*self.CONTROL, timeout=10)
            try:
                conn.request(method, path, body=json.dumps(body) if body is not None else None,
                             headers={"Content-Type": "application/json"})
                r = conn.getresponse()
                data = json.loads(r.read() or b"{}")
                if r.status != 200:
                    raise RuntimeError(f"STS fault proxy {method} {path}: {r.status} {data}")
                return data
            finally:
                conn.close()

        return self.node.call(call)

    @staticmethod
    def _arn(role):
        return role if role in ("*", None) or role.startswith("arn:") else role_arn(role)

    def fault(self, mode, role="*", **params):
        """Puts `mode` (pass, slow, status, throttle, deny, close, refuse) in force for `role`
        (a role name, an ARN, or "*" for every role without a fault of its own)."""
        self._control("POST", "/fault", dict(params, mode=mode, role=self._arn(role)))

    def rewrite_expiry(self, role, expires_in):
        """moto's credentials for `role` will say they expire `expires_in` seconds after issue."""
        self._control("POST", "/rewrite", {"role": self._arn(role), "expires_in": expires_in})

    def reset(self):
        """Every fault back to pass-through (expiry rewrites stay)."""
        self._control("POST", "/reset", {})

    def calls(self, role=None, session=None, since=None):
        """AssumeRole calls seen, optionally only of `role`, `session`, after monotonic `since`."""
        out = [c for c in self._control("GET", "/calls")["calls"] if c["action"] == "AssumeRole"]
        if role is not None:
            out = [c for c in out if c["role"] == self._arn(role)]
        if session is not None:
            out = [c for c in out if c["session"] == session]
        if since is not None:
            out = [c for c in out if c["t"] >= since]
        return out

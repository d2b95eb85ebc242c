"""An STS stand-in that fails on command: a proxy between iamlinkd (`sts.endpoint`) and moto,
run inside the bench's node. Standard library only.

    python3 sts_fault_proxy.py --listen 198.18.0.2:5001 --control 127.0.0.1:5002 \
        --upstream 198.18.0.2:5000

Every request on --listen is classified (AssumeRole with its RoleArn and RoleSessionName, or
another action), recorded, and then treated by the fault in force for its role (else the
default fault):
    pass                       forwarded to moto unchanged (but see `expires_in`)
    slow      seconds=N        forwarded after N seconds (sooner if the fault is changed)
    status    status=500|503   answered with that status and STS's error XML
    throttle                   400 with the STS error XML, code Throttling
    deny                       403 with the STS error XML, code AccessDenied
    close                      the connection is closed without an answer
    refuse                     the listener is closed: new connections are refused
A role's `expires_in` (seconds) rewrites the Expiration of moto's AssumeRole answers for it, so
that credentials are due for refresh, or nearly expired, as soon as they are issued.

Control (HTTP on --control, which iamlinkd never reaches), JSON bodies:
    POST /fault   {"role": "*" | RoleArn, "mode": ..., "seconds": N, "status": N}
    POST /rewrite {"role": RoleArn, "expires_in": N | null}
    POST /reset   every fault back to pass (rewrites stay)
    GET  /calls   {"calls": [{"t", "action", "role", "session", "fault", "status", "attempt"}]}
                  t is CLOCK_MONOTONIC at arrival, comparable with the test's time.monotonic();
                  attempt is the SDK's number of the try (its `amz-sdk-request` header), 1 first.
"""

import argparse
import datetime
import http.client
import http.server
import json
import re
import socket
import struct
import threading
import time
import urllib.parse
import uuid

from http_server import ThreadingServer

MODES = ("pass", "slow", "status", "throttle", "deny", "close", "refuse")
STS_NS = "https://sts.amazonaws.com/doc/2011-06-15/"


def error_xml(kind, code, message):
    return (f'<ErrorResponse xmlns="{STS_NS}"><Error><Type>{kind}</Type><Code>{code}</Code>'
            f'<Message>{message}</Message></Error><RequestId>{uuid.uuid4()}</RequestId>'
            f'</ErrorResponse>').encode()


class State:
    def __init__(self, upstream):
        self.upstream = upstream
        self.lock = threading.Lock()
        self.faults = {"*": {"mode": "pass"}}
        self.rewrites = {}
        self.calls = []
        self.changed = threading.Condition(self.lock)
        self.generation = 0
        self.data_server = None
        self.listen = None

    def fault_for(self, role):
        with self.lock:
            return dict(self.faults.get(role) or self.faults["*"]), self.generation

    def set_fault(self, role, fault):
        with self.lock:
            if fault.get("mode") == "pass" and role != "*":
                self.faults.pop(role, None)
            else:
                self.faults[role] = fault
            self.generation += 1
            self.changed.notify_all()
        self.apply_listener()

    def reset(self):
        with self.lock:
            self.faults = {"*": {"mode": "pass"}}
            self.generation += 1
            self.changed.notify_all()
        self.apply_listener()

    def wait_change(self, generation, seconds):
        """Waits up to `seconds` or until a fault changes."""
        deadline = time.monotonic() + seconds
        with self.lock:
            while self.generation == generation:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self.changed.wait(left)

    def refusing(self):
        with self.lock:
            return any(f.get("mode") == "refuse" for f in self.faults.values())

    def apply_listener(self):
        """Closes the data listener while any fault is `refuse`, reopens it otherwise."""
        refuse = self.refusing()
        if refuse and self.data_server is not None:
            server, self.data_server = self.data_server, None
            server.shutdown()
            server.server_close()
        elif not refuse and self.data_server is None:
            self.data_server = start_server(self.listen, DataHandler, self)

    def record(self, entry):
        with self.lock:
            self.calls.append(entry)

    def forward(self, method, path, headers, body):
        host, port = self.upstream.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers)
            r = conn.getresponse()
            return r.status, r.getheaders(), r.read()
        finally:
            conn.close()


def rewrite_expiration(body, seconds):
    new = (datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=seconds))
    stamp = new.strftime("%Y-%m-%dT%H:%M:%SZ")
    return re.sub(rb"<Expiration>[^<]*</Expiration>", f"<Expiration>{stamp}</Expiration>".encode(), body)


class DataHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "sts-fault-proxy"

    def log_message(self, fmt, *args):
        pass

    def _answer(self, status, body, ctype="text/xml", headers=()):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _handle(self):
        state = self.server.state
        t = time.monotonic()
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        form = urllib.parse.parse_qs(body.decode("utf-8", "replace"))
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        action = (form.get("Action") or query.get("Action") or ["?"])[0]
        role = (form.get("RoleArn") or [""])[0]
        session = (form.get("RoleSessionName") or [""])[0]
        fault, generation = state.fault_for(role)
        mode = fault.get("mode", "pass")
        # The SDK numbers its own retries of one call: "attempt=2; max=3".
        attempt = re.search(r"attempt=(\d+)", self.headers.get("amz-sdk-request") or "")
        entry = {"t": t, "action": action, "role": role, "session": session, "fault": mode, "status": None,
                 "attempt": int(attempt.group(1)) if attempt else None}
        state.record(entry)
        if mode == "slow":
            state.wait_change(generation, float(fault.get("seconds", 5)))
            fault, _ = state.fault_for(role)  # a fault set meanwhile applies to this call too
            mode = fault.get("mode", "pass")
            if mode == "slow":
                mode = "pass"
        if mode in ("close", "refuse"):
            entry["status"] = "closed"
            self.close_connection = True
            try:
                # Linger 0: the close is a reset, as from a load balancer that gave up.
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
            return
        if mode == "status":
            status = int(fault.get("status", 500))
            code = "ServiceUnavailable" if status == 503 else "InternalFailure"
            entry["status"] = status
            return self._answer(status, error_xml("Receiver", code, f"injected {status}"))
        if mode == "throttle":
            entry["status"] = 400
            return self._answer(400, error_xml("Sender", "Throttling", "Rate exceeded"))
        if mode == "deny":
            entry["status"] = 403
            msg = (f"User: arn:aws:iam::123456789012:user/iamlinkd is not authorized to perform: "
                   f"sts:AssumeRole on resource: {role}")
            return self._answer(403, error_xml("Sender", "AccessDenied", msg))
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
        try:
            status, rheaders, rbody = state.forward(self.command, self.path, headers, body)
        except OSError as e:
            entry["status"] = "upstream-error"
            return self._answer(502, f"sts-fault-proxy: moto unreachable: {e}".encode(), "text/plain")
        with state.lock:
            expires_in = state.rewrites.get(role)
        if action == "AssumeRole" and status == 200 and expires_in is not None:
            rbody = rewrite_expiration(rbody, expires_in)
        entry["status"] = status
        keep = [(k, v) for k, v in rheaders
                if k.lower() not in ("content-length", "connection", "transfer-encoding", "server", "date",
                                     "content-type")]
        ctype = dict((k.lower(), v) for k, v in rheaders).get("content-type", "text/xml")
        self._answer(status, rbody, ctype, keep)

    do_POST = do_GET = _handle


class ControlHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        pass

    def _json(self, status, obj):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        state = self.server.state
        if self.path == "/calls":
            with state.lock:
                return self._json(200, {"calls": list(state.calls)})
        return self._json(404, {"error": "no such control path"})

    def do_POST(self):
        state = self.server.state
        length = int(self.headers.get("Content-Length") or 0)
        try:
            req = json.loads(self.rfile.read(length) or b"{}")
        except ValueError as e:
            return self._json(400, {"error": str(e)})
        if self.path == "/fault":
            mode = req.get("mode")
            if mode not in MODES:
                return self._json(400, {"error": f"mode must be one of {MODES}"})
            state.set_fault(req.get("role") or "*", {k: v for k, v in req.items() if k != "role"})
            return self._json(200, {"ok": True})
        if self.path == "/rewrite":
            with state.lock:
                if req.get("expires_in") is None:
                    state.rewrites.pop(req["role"], None)
                else:
                    state.rewrites[req["role"]] = int(req["expires_in"])
            return self._json(200, {"ok": True})
        if self.path == "/reset":
            state.reset()
            return self._json(200, {"ok": True})
        return self._json(404, {"error": "no such control path"})


def start_server(addr, handler, state):
    host, port = addr.rsplit(":", 1)
    server = ThreadingServer((host, int(port)), handler)
    server.state = state
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen", required=True)
    ap.add_argument("--control", required=True)
    ap.add_argument("--upstream", required=True)
    a = ap.parse_args()
    state = State(a.upstream)
    state.listen = a.listen
    state.data_server = start_server(a.listen, DataHandler, state)
    control = start_server(a.control, ControlHandler, state)
    print("ready", flush=True)
    threading.Event().wait()  # until killed
    control.shutdown()


if __name__ == "__main__":
    main()

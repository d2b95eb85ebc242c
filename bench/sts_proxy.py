"""A counting proxy between iamlinkd's `sts.endpoint` and moto, run inside the bench's node.

moto does not count calls. This proxy forwards every request to moto unchanged and records each
AssumeRole it sees: RoleArn, RoleSessionName, the AccessKeyId moto answered, and CLOCK_MONOTONIC
times of arrival and answer (the clock cnibench stamps its requests with). A *gate* can hold
AssumeRole calls (counted on arrival, forwarded when the gate opens) so that a burst of requests
finds every cache entry cold with its STS call in flight. Standard library only.

    python3 sts_proxy.py --listen 198.18.0.4:5000 --upstream 198.18.0.2:5000

Control (same listener, never reached by iamlinkd's SDK, which only POSTs to /):
    GET  /__bench/calls          -> {"calls": [...], "other": N}
    POST /__bench/gate?open=0|1  -> closes / opens the gate
    POST /__bench/reset          -> forgets recorded calls
"""

import argparse
import http.client
import http.server
import json
import re
import threading
import time
import urllib.parse

GATE_MAX_SECONDS = 60  # a held call is forwarded after this even if nobody opens the gate


class State:
    def __init__(self, upstream):
        self.upstream = upstream
        self.lock = threading.Lock()
        self.calls = []
        self.other = 0
        self.gate = threading.Event()
        self.gate.set()
        self.local = threading.local()

    def conn(self):
        c = getattr(self.local, "conn", None)
        if c is None:
            host, port = self.upstream.rsplit(":", 1)
            c = self.local.conn = http.client.HTTPConnection(host, int(port), timeout=30)
        return c

    def forward(self, method, path, headers, body):
        for attempt in range(2):
            c = self.conn()
            try:
                c.request(method, path, body=body, headers=headers)
                r = c.getresponse()
                data = r.read()
                return r.status, r.getheaders(), data
            except (http.client.HTTPException, OSError):
                c.close()
                self.local.conn = None
                if attempt:
                    raise


HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "iamlink-bench-sts-proxy"

    def log_message(self, fmt, *args):
        pass

    def _reply(self, status, body, ctype="application/json", headers=()):
        data = body if isinstance(body, bytes) else body.encode()
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _control(self):
        st = self.server.state
        url = urllib.parse.urlsplit(self.path)
        q = urllib.parse.parse_qs(url.query)
        if url.path == "/__bench/calls":
            with st.lock:
                out = {"calls": list(st.calls), "other": st.other, "gate_open": st.gate.is_set()}
            return self._reply(200, json.dumps(out))
        if url.path == "/__bench/gate":
            if q.get("open", ["1"])[0] == "1":
                st.gate.set()
            else:
                st.gate.clear()
            return self._reply(200, json.dumps({"gate_open": st.gate.is_set()}))
        if url.path == "/__bench/reset":
            with st.lock:
                st.calls.clear()
                st.other = 0
            return self._reply(200, "{}")
        return self._reply(404, "{}")

    def _proxy(self):
        st = self.server.state
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        form = urllib.parse.parse_qs(body.decode("utf-8", "replace")) if body else {}
        action = form.get("Action", [""])[0]
        record = None
        if action == "AssumeRole":
            record = {"role": form.get("RoleArn", [""])[0], "session": form.get("RoleSessionName", [""])[0],
                      "arrived": time.monotonic(), "gated": not st.gate.is_set()}
            with st.lock:
                st.calls.append(record)
            st.gate.wait(GATE_MAX_SECONDS)
            record["forwarded"] = time.monotonic()
        else:
            with st.lock:
                st.other += 1
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
        try:
            status, rheaders, data = st.forward(self.command, self.path, headers, body)
        except Exception as e:
            if record is not None:
                record.update(status=502, error=str(e), answered=time.monotonic())
            return self._reply(502, str(e), ctype="text/plain")
        if record is not None:
            m = re.search(rb"<AccessKeyId>([^<]+)</AccessKeyId>", data)
            record.update(status=status, akid=m.group(1).decode() if m else None, answered=time.monotonic())
        ctype = next((v for k, v in rheaders if k.lower() == "content-type"), "text/xml")
        rheaders = [(k, v) for k, v in rheaders
                    if k.lower() not in HOP | {"content-length", "content-type", "server", "date"}]
        return self._reply(status, data, ctype=ctype, headers=rheaders)

    def do_GET(self):
        if self.path.startswith("/__bench/"):
            return self._control()
        return self._proxy()

    def do_POST(self):
        if self.path.startswith("/__bench/"):
            return self._control()
        return self._proxy()


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen", required=True)
    ap.add_argument("--upstream", required=True)
    a = ap.parse_args()
    host, port = a.listen.rsplit(":", 1)
    srv = Server((host, int(port)), Handler)
    srv.state = State(a.upstream)
    srv.serve_forever()


if __name__ == "__main__":
    main()

"""A recording HTTPS proxy for tests: CONNECT host:port is logged (one JSON line per tunnel),
answered 200, and the tunnel's TLS terminated with a test CA's certificate, the decrypted bytes
passed to moto. A second listener stands for an STS VPC endpoint reached without the proxy
(TLS terminated the same way, logged as "direct"). Run in the node namespace by
tests/harness/recording_proxy.py."""

import argparse
import json
import select
import socket
import socketserver
import ssl
import threading


def pipe(a, b, idle=60):
    """Copies bytes both ways until either side closes (TLS-buffered bytes first)."""
    socks = [a, b]
    while True:
        ready = [s for s in socks if isinstance(s, ssl.SSLSocket) and s.pending()]
        if not ready:
            ready, _, _ = select.select(socks, [], [], idle)
            if not ready:
                return
        for s in ready:
            try:
                data = s.recv(65536)
            except ssl.SSLWantReadError:
                continue
            except OSError:
                return
            if not data:
                return
            (b if s is a else a).sendall(data)


class Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def record(server, entry):
    with server.log_lock:
        server.log.write(json.dumps(entry) + "\n")
        server.log.flush()


def forward(server, client):
    upstream = socket.create_connection(server.forward, timeout=10)
    try:
        pipe(client, upstream)
    finally:
        upstream.close()


class ProxyHandler(socketserver.BaseRequestHandler):
    def handle(self):
        head = b""
        while b"\r\n\r\n" not in head and len(head) < 65536:
            chunk = self.request.recv(4096)
            if not chunk:
                return
            head += chunk
        line = head.split(b"\r\n", 1)[0].decode("latin-1")
        method, target = (line.split(" ") + ["", ""])[:2]
        if method != "CONNECT":
            record(self.server, {"via": "proxy", "method": method, "target": target})
            self.request.sendall(b"HTTP/1.1 501 Not Implemented\r\nContent-Length: 0\r\n\r\n")
            return
        host, _, port = target.rpartition(":")
        record(self.server, {"via": "proxy", "method": "CONNECT", "host": host, "port": int(port or 0)})
        self.request.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        try:
            tls = self.server.tls.wrap_socket(self.request, server_side=True)
        except (ssl.SSLError, OSError) as e:
            record(self.server, {"via": "proxy", "host": host, "tls_error": str(e)})
            return
        forward(self.server, tls)


class DirectHandler(socketserver.BaseRequestHandler):
    def handle(self):
        try:
            tls = self.server.tls.wrap_socket(self.request, server_side=True)
        except (ssl.SSLError, OSError) as e:
            record(self.server, {"via": "direct", "tls_error": str(e)})
            return
        record(self.server, {"via": "direct", "host": self.server.server_address[0]})
        forward(self.server, tls)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen", required=True, help="host:port of the proxy")
    ap.add_argument("--direct", required=True, help="host:port of the stand-in VPC endpoint")
    ap.add_argument("--forward", required=True, help="host:port of moto")
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--log", required=True)
    a = ap.parse_args()
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(a.cert, a.key)
    log, lock = open(a.log, "a"), threading.Lock()
    servers = []
    for listen, handler in ((a.listen, ProxyHandler), (a.direct, DirectHandler)):
        host, port = listen.rsplit(":", 1)
        s = Server((host, int(port)), handler)
        f_host, f_port = a.forward.rsplit(":", 1)
        s.forward, s.tls, s.log, s.log_lock = (f_host, int(f_port)), tls, log, lock
        servers.append(s)
    threading.Thread(target=servers[1].serve_forever, daemon=True).start()
    servers[0].serve_forever()


if __name__ == "__main__":
    main()

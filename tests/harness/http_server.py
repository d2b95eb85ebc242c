"""The harness's threading HTTP server (standard library only; scripts import it as a sibling)."""

import http.server
import json
import socketserver


class ThreadingServer(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer without the reverse DNS lookup of its listen address.

    HTTPServer.server_bind calls socket.getfqdn(host) only to fill `server_name`. In a test
    namespace whose default route leads nowhere, that lookup waits for the resolver's timeouts
    (10 s) before the server listens; every bench paid it once.
    """

    daemon_threads = True

    def server_bind(self):
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


def serve(listen, handler, **attrs):
    """Serves `handler` on "host:port" forever, `attrs` set on the server for it; prints
    {"listening": listen} first (the benches' logs start with it)."""
    host, port = listen.rsplit(":", 1)
    server = ThreadingServer((host, int(port)), handler)
    for name, value in attrs.items():
        setattr(server, name, value)
    print(json.dumps({"listening": listen}), flush=True)
    server.serve_forever()

"""HTTP/1.x on a raw socket, byte for byte, for requests no client library would send.

Run these on a NetnsThreads worker of a pod so that the connection comes from that pod.
Standard library only.
"""

import dataclasses
import socket
import time

METADATA = ("169.254.169.254", 80)


@dataclasses.dataclass
class Reply:
    status: int = None          # None: no status line came back
    reason: str = ""
    headers: dict = dataclasses.field(default_factory=dict)  # lower-case names
    body: bytes = b""
    closed: bool = False        # the server closed the connection (EOF or reset)
    error: str = None           # refused, reset, timeout, ... when the exchange failed
    elapsed: float = 0.0        # seconds from connect to the end of the exchange
    raw: bytes = b""

    @property
    def text(self):
        return self.body.decode("utf-8", "replace")

    def __str__(self):
        return (f"Reply(status={self.status} reason={self.reason!r} body={self.text[:200]!r} "
                f"closed={self.closed} error={self.error} elapsed={self.elapsed:.2f}s)")


def build(method, path, headers=(), version="HTTP/1.1", host="169.254.169.254", close=True, body=b""):
    """A request's bytes; `headers` are (name, value) pairs sent as given."""
    lines = [f"{method} {path} {version}"]
    if host is not None:
        lines.append(f"Host: {host}")
    lines += [f"{k}: {v}" for k, v in headers]
    if close:
        lines.append("Connection: close")
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def error_kind(e):
    if isinstance(e, ConnectionRefusedError):
        return "refused"
    if isinstance(e, (ConnectionResetError, BrokenPipeError)):
        return "reset"
    if isinstance(e, (socket.timeout, TimeoutError)):
        return "timeout"
    return f"{type(e).__name__}: {e}"


def _parse(reply):
    head, sep, rest = reply.raw.partition(b"\r\n\r\n")
    if not sep:
        return False
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        reply.error = reply.error or f"not an HTTP response: {lines[0]!r}"
        return True
    reply.status = int(parts[1])
    reply.reason = parts[2] if len(parts) > 2 else ""
    for line in lines[1:]:
        k, _, v = line.partition(":")
        reply.headers[k.strip().lower()] = v.strip()
    length = reply.headers.get("content-length")
    if length is not None and length.isdigit():
        reply.body = rest[:int(length)]
        return len(rest) >= int(length)
    reply.body = rest
    return False  # no length: the body ends when the server closes


def exchange(data, addr=METADATA, timeout=5.0, pieces=None):
    """Connects, sends `data` (or, with `pieces`, each (bytes, pause seconds) in turn) and reads
    one answer: until it is complete, the server closes, or `timeout` passes without a byte."""
    reply = Reply()
    t0 = time.monotonic()
    try:
        sock = socket.create_connection(addr, timeout=timeout)
    except OSError as e:
        reply.error = error_kind(e)
        reply.elapsed = time.monotonic() - t0
        return reply
    with sock:
        try:
            if pieces is None:
                sock.sendall(data)
            else:
                for chunk, pause in pieces:
                    sock.sendall(chunk)
                    if pause:
                        time.sleep(pause)  # the client's pace is the input under test
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    reply.closed = True
                    break
                reply.raw += chunk
                if _parse(reply):
                    break
        except OSError as e:
            kind = error_kind(e)
            if kind == "reset":
                reply.closed = True
            reply.error = kind
        if reply.raw and reply.status is None:
            _parse(reply)
    reply.elapsed = time.monotonic() - t0
    return reply


def request(method, path, headers=(), timeout=5.0, addr=METADATA, **build_options):
    return exchange(build(method, path, headers, **build_options), addr=addr, timeout=timeout)


def slow_send(data, interval, addr=METADATA, limit=30.0):
    """Sends `data` one byte every `interval` seconds, as a slowloris client does, until the
    server closes the connection or all is sent; then waits (at most `limit` seconds in all)
    for the server's answer or close. Returns (seconds from connect to the close, bytes sent,
    answer bytes); the seconds are None when the server never closed."""
    t0 = time.monotonic()
    sent = 0
    answer = b""
    with socket.create_connection(addr, timeout=limit) as sock:
        try:
            for i in range(len(data)):
                if time.monotonic() - t0 > limit:
                    return None, sent, answer
                sock.sendall(data[i:i + 1])
                sent += 1
                # Between bytes, look for the server's close without blocking the pace.
                sock.settimeout(interval)
                try:
                    chunk = sock.recv(65536)
                    if not chunk:
                        return time.monotonic() - t0, sent, answer
                    answer += chunk
                except (socket.timeout, TimeoutError):
                    pass
            sock.settimeout(max(0.1, limit - (time.monotonic() - t0)))
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    return time.monotonic() - t0, sent, answer
                answer += chunk
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - t0, sent, answer
        except (socket.timeout, TimeoutError):
            return None, sent, answer

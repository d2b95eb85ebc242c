"""A metadata-service client run inside a pod (standard library only), printing JSON.

    imds_client.py request METHOD PATH [-H 'Name: value']... [common options]
        one raw request -> {"status", "headers", "body"} or {"error"} ("connect-timeout" when
        the handshake did not complete, "timeout" when an answer did not come)
    imds_client.py creds [--v1] [--ttl N] [common options]
        what an SDK does: token PUT (unless --v1), role listing, that role's credentials
        -> {"ok", "role", "creds", "steps": [...]} or {"ok": false, "error" | "status", ...}
    imds_client.py loop [--seconds S] [--max-answers N] [common options]
        IMDSv2 role listing + credentials in a loop until S seconds, N answers or SIGTERM, one
        new connection per request; prints one summary: answers counted per (listed role,
        AccessKeyId) with the full credentials of each key (to resolve it with STS), answers
        without credentials, and errors by kind; with --timeline also every outcome in order, as
        runs [first, last, outcome, count] (CLOCK_MONOTONIC seconds, as time.monotonic()); with
        --timeline-roles an answer with credentials is "ok:<listed role>" there, not "ok"; with
        --say-first it writes "first outcome" on stderr once it has one.
    common options: --host 169.254.169.254 --port 80 --source IP --timeout SECONDS
"""

import argparse
import http.client
import json
import signal
import socket
import sys
import time

CREDS_PATH = "/latest/meta-data/iam/security-credentials/"


class ConnectTimeout(socket.timeout):
    """The TCP handshake did not complete in time (no SYN-ACK came back)."""


class Client:
    def __init__(self, host, port, source, timeout):
        self.host, self.port, self.timeout = host, port, timeout
        self.source = (source, 0) if source else None

    def request(self, method, path, headers=None):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout,
                                          source_address=self.source)
        try:
            try:
                conn.connect()
            except socket.timeout as e:
                raise ConnectTimeout(str(e)) from e
            conn.request(method, path, headers=headers or {})
            r = conn.getresponse()
            body = r.read().decode("utf-8", "replace")
            return {"status": r.status, "headers": dict(r.getheaders()), "body": body}
        finally:
            conn.close()


def error_kind(e):
    if isinstance(e, ConnectTimeout):
        return "connect-timeout"
    if isinstance(e, ConnectionRefusedError):
        return "refused"
    if isinstance(e, (socket.timeout, TimeoutError)):
        return "timeout"
    if isinstance(e, ConnectionResetError):
        return "reset"
    if isinstance(e, OSError) and e.errno is not None:
        return f"oserror-{e.errno}"
    return type(e).__name__


def safe(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        return {"error": error_kind(e), "detail": str(e)}


def get_token(client, ttl):
    r = client.request("PUT", "/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": str(ttl)})
    return r


def creds(client, v1, ttl):
    steps = []
    headers = {}
    if not v1:
        r = safe(get_token, client, ttl)
        steps.append(dict(r, step="token"))
        if r.get("status") != 200:
            return {"ok": False, "steps": steps, **{k: r.get(k) for k in ("status", "error")}}
        headers["X-aws-ec2-metadata-token"] = r["body"]
    r = safe(client.request, "GET", CREDS_PATH, headers)
    steps.append(dict(r, step="listing"))
    if r.get("status") != 200:
        return {"ok": False, "steps": steps, **{k: r.get(k) for k in ("status", "error")}}
    role = r["body"].strip().splitlines()[0] if r["body"].strip() else ""
    r = safe(client.request, "GET", CREDS_PATH + role, headers)
    steps.append(dict(r, step="credentials"))
    if r.get("status") != 200:
        return {"ok": False, "role": role, "steps": steps, **{k: r.get(k) for k in ("status", "error")}}
    try:
        doc = json.loads(r["body"])
    except ValueError:
        return {"ok": False, "role": role, "steps": steps, "error": "bad-json"}
    return {"ok": True, "role": role, "creds": doc, "steps": steps}


class Stop(BaseException):
    """Raised by the SIGTERM handler so that a request blocked on a vanished interface ends now."""


class Loop:
    def __init__(self, client, seconds, max_answers, timeline=False, interval=0.0, roles=False, say_first=False):
        self.client = client
        self.say_first = say_first
        self.roles = roles  # the timeline says which role each answer listed
        self.interval = interval
        self.timeline = [] if timeline else None
        self.deadline = time.monotonic() + seconds
        self.max_answers = max_answers
        self.stop = False
        self.answers = 0
        self.no_credentials = 0  # listing answered 404: the pod has no role
        self.errors = {}
        self.statuses = {}
        self.keys = {}  # AccessKeyId -> {"roles": {role: count}, "creds": {...}}
        self.token = None
        self.token_expires = 0.0

    def error(self, kind):
        self.errors[kind] = self.errors.get(kind, 0) + 1
        if kind != "RuntimeError":  # a failed token request: in the timeline as its status
            self.mark(kind)

    def status(self, kind):
        self.statuses[kind] = self.statuses.get(kind, 0) + 1
        self.mark(kind)

    def mark(self, outcome):
        if self.timeline is not None:
            t = time.monotonic()
            if self.timeline and self.timeline[-1][2] == outcome:
                self.timeline[-1][1] = t
                self.timeline[-1][3] += 1
            else:
                self.timeline.append([t, t, outcome, 1])
        if self.say_first:
            self.say_first = False
            sys.stderr.write("first outcome\n")  # --say-first: the caller knows the client asks
            sys.stderr.flush()

    def headers(self):
        if self.token is None or time.monotonic() > self.token_expires:
            r = get_token(self.client, 300)
            if r["status"] != 200:
                self.status(f"token-{r['status']}")
                raise RuntimeError(f"token-{r['status']}")
            self.token, self.token_expires = r["body"], time.monotonic() + 240
        return {"X-aws-ec2-metadata-token": self.token}

    def once(self):
        h = self.headers()
        r = self.client.request("GET", CREDS_PATH, h)
        if r["status"] == 404:
            self.answers += 1
            self.no_credentials += 1
            self.mark("no-credentials")
            return
        if r["status"] == 401:
            self.token = None
        if r["status"] != 200:
            self.status(f"listing-{r['status']}")
            return
        role = r["body"].strip()
        r = self.client.request("GET", CREDS_PATH + role, h)
        if r["status"] != 200:
            self.status(f"credentials-{r['status']}")
            return
        doc = json.loads(r["body"])
        akid = doc["AccessKeyId"]
        entry = self.keys.get(akid)
        if entry is None:
            entry = self.keys[akid] = {"roles": {}, "creds": {k: doc.get(k) for k in
                                       ("AccessKeyId", "SecretAccessKey", "Token", "Expiration")}}
        entry["roles"][role] = entry["roles"].get(role, 0) + 1
        self.answers += 1
        self.mark(f"ok:{role}" if self.roles else "ok")

    def run(self):
        try:
            while not self.stop and self.answers < self.max_answers and time.monotonic() < self.deadline:
                started = time.monotonic()
                try:
                    self.once()
                except Exception as e:
                    self.error(error_kind(e))
                    if not isinstance(e, (RuntimeError,)):
                        self.token = None
                # A pacing interval (one request per `interval`), not synchronisation.
                time.sleep(max(0.0, started + self.interval - time.monotonic()))
        except Stop:
            pass  # the request in flight is not counted
        out = {"answers": self.answers, "no_credentials": self.no_credentials, "errors": self.errors,
               "statuses": self.statuses, "keys": self.keys}
        if self.timeline is not None:
            out["timeline"] = self.timeline
        return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("command", choices=["request", "creds", "loop"])
    ap.add_argument("args", nargs="*")
    ap.add_argument("-H", "--header", action="append", default=[])
    ap.add_argument("--host", default="169.254.169.254")
    ap.add_argument("--port", type=int, default=80)
    ap.add_argument("--source")
    ap.add_argument("--timeout", type=float, default=3.0)
    ap.add_argument("--v1", action="store_true")
    ap.add_argument("--ttl", type=int, default=21600)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--max-answers", type=int, default=1_000_000)
    ap.add_argument("--timeline", action="store_true")
    ap.add_argument("--say-first", action="store_true", help="loop: a line on stderr after the first outcome")
    ap.add_argument("--timeline-roles", action="store_true", help="loop: the listed role in each \"ok\" of the timeline")
    ap.add_argument("--interval", type=float, default=0.0, help="loop: seconds from one request's start to the next")
    a = ap.parse_args()
    client = Client(a.host, a.port, a.source, a.timeout)
    if a.command == "request":
        method, path = a.args
        headers = dict(h.split(":", 1) for h in a.header)
        headers = {k.strip(): v.strip() for k, v in headers.items()}
        out = safe(client.request, method, path, headers)
    elif a.command == "creds":
        out = creds(client, a.v1, a.ttl)
    else:
        loop = Loop(client, a.seconds, a.max_answers, timeline=a.timeline, interval=a.interval,
                    roles=a.timeline_roles, say_first=a.say_first)

        def on_term(signum, frame):
            if not loop.stop:
                loop.stop = True
                raise Stop()

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_term)
        out = loop.run()
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()

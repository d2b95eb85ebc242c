"""A stand-in for the real instance metadata service, run inside the node namespace.

It serves a *node role* whose credentials are real (moto) credentials, so a leak of the node's
identity to a pod shows up as the node role's ARN. Every request is appended to a JSON-lines log
so tests can see who reached it. Standard library only.

    python3 fake_imds_server.py --listen 169.254.169.254:80 --creds FILE --log FILE
"""

import argparse
import datetime
import http.server
import json
import os
import posixpath
import secrets
import threading
import time

from http_server import ThreadingServer

ROLE = "iamlink-node-role"


def rfc3339(t):
    return t.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fake-imds"

    def log_message(self, fmt, *args):
        pass

    def _record(self, status):
        entry = {"method": self.command, "path": self.path, "client": self.client_address[0],
                 "status": status, "token": bool(self.headers.get("X-aws-ec2-metadata-token")),
                 "xff": self.headers.get("X-Forwarded-For"), "t": time.monotonic()}  # t: CLOCK_MONOTONIC
        with self.server.log_lock:
            self.server.log.write(json.dumps(entry) + "\n")
            self.server.log.flush()

    def _send(self, status, body, ctype="text/plain", headers=()):
        data = body.encode() if isinstance(body, str) else body
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)
        self._record(status)

    def do_PUT(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        if self.path != "/latest/api/token":
            return self._send(404, "Not Found")
        if self.headers.get("X-Forwarded-For"):
            return self._send(403, "Forbidden")
        try:
            ttl = int(self.headers.get("X-aws-ec2-metadata-token-ttl-seconds", ""))
        except ValueError:
            return self._send(400, "Bad Request")
        if not 1 <= ttl <= 21600:
            return self._send(400, "Bad Request")
        token = "fake-upstream-" + secrets.token_urlsafe(24)
        self.server.tokens.add(token)
        return self._send(200, token, headers=[("X-aws-ec2-metadata-token-ttl-seconds", str(ttl))])

    def do_GET(self):
        token = self.headers.get("X-aws-ec2-metadata-token")
        if token is not None and token not in self.server.tokens:
            return self._send(401, "Unauthorized")
        # Like a real node with IMDSv1 enabled: GETs without a token are answered too, so a leak
        # through any path is visible.
        creds = self.server.creds
        now = rfc3339(datetime.datetime.now(datetime.timezone.utc))
        p = self.path.split("?", 1)[0]
        # Resolve dot segments like a typical web server would, so that a proxy which checks a
        # path's prefix but forwards it raw is caught leaking.
        trailing = p.endswith("/")
        p = posixpath.normpath(p) + ("/" if trailing and p != "/" else "")
        doc = {
            "/latest/meta-data/placement/region": ("us-east-1", "text/plain"),
            "/latest/meta-data/placement/availability-zone": ("us-east-1a", "text/plain"),
            "/latest/dynamic/instance-identity/document": (json.dumps({
                "accountId": "123456789012", "region": "us-east-1", "availabilityZone": "us-east-1a",
                "instanceId": "i-0fakeiamlinknode", "instanceType": "m5.large",
                "privateIp": "198.18.0.1", "imageId": "ami-0fake"}), "application/json"),
            "/latest/user-data": ("#!/bin/sh\necho node-secret-user-data\n", "text/plain"),
            "/latest/meta-data/instance-id": ("i-0fakeiamlinknode", "text/plain"),
            "/latest/meta-data/iam/security-credentials/": (ROLE, "text/plain"),
            "/latest/meta-data/iam/security-credentials": (ROLE, "text/plain"),
            f"/latest/meta-data/iam/security-credentials/{ROLE}": (json.dumps({
                "Code": "Success", "LastUpdated": now, "Type": "AWS-HMAC",
                "AccessKeyId": creds["AccessKeyId"], "SecretAccessKey": creds["SecretAccessKey"],
                "Token": creds["Token"], "Expiration": creds["Expiration"]}), "application/json"),
            # The instance's own identity credentials (what the EC2 agents use), the node's too.
            "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance": (json.dumps({
                "Code": "Success", "LastUpdated": now, "Type": "AWS-HMAC",
                "AccessKeyId": creds["AccessKeyId"], "SecretAccessKey": creds["SecretAccessKey"],
                "Token": creds["Token"], "Expiration": creds["Expiration"]}), "application/json"),
            "/latest/meta-data/iam/info": (json.dumps({
                "Code": "Success", "LastUpdated": now,
                "InstanceProfileArn": "arn:aws:iam::123456789012:instance-profile/" + ROLE,
                "InstanceProfileId": "AIPAFAKEIAMLINKNODE"}), "application/json"),
        }
        if p == "/latest/meta-data/placement/region" and os.path.exists(self.server.region_file):
            # A test's region for the node (FakeUpstream.set_region); empty: this node has none.
            with open(self.server.region_file) as f:
                region = f.read().strip()
            return self._send(200, region, "text/plain") if region else self._send(404, "Not Found")
        if p in doc:
            body, ctype = doc[p]
            return self._send(200, body, ctype)
        return self._send(404, "Not Found")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen", default="169.254.169.254:80")
    ap.add_argument("--creds", required=True, help="JSON file: AccessKeyId, SecretAccessKey, Token, Expiration")
    ap.add_argument("--log", required=True)
    ap.add_argument("--region-file", default="", help="when it exists: the region placement/region answers")
    a = ap.parse_args()
    host, port = a.listen.rsplit(":", 1)
    server = ThreadingServer((host, int(port)), Handler)
    with open(a.creds) as f:
        server.creds = json.load(f)
    server.tokens = set()
    server.region_file = a.region_file
    server.log = open(a.log, "a")
    server.log_lock = threading.Lock()
    server.serve_forever()


if __name__ == "__main__":
    main()

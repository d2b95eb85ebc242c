"""A strict STS in front of moto for AssumeRoleWithWebIdentity: moto validates nothing (not the
token, not the role's trust policy), so this shim does what STS does and forwards only what STS
would accept. Run inside the bench's node:

    python3 sts_web_identity_shim.py --listen 198.18.0.2:5003 --upstream 198.18.0.2:5000 \
        --issuer https://oidc.example/id/X --jwks jwks.json --keys gateway-keys.json

For AssumeRoleWithWebIdentity it checks the token's RS256 signature against the issuer's JWKS,
`iss`, `exp` and `nbf`, then reads the role from moto's IAM (GetRole) and requires a trust
statement that allows `sts:AssumeRoleWithWebIdentity` to the issuer's federated principal, whose
`StringEquals` conditions on `<provider>:sub` and `<provider>:aud` the token's claims meet. Then
it forwards the request to moto signed with the gateway's keys (moto, with IAM enforcement on,
answers no unsigned request). Anything else is forwarded unchanged. One JSON line per web
identity call on stdout: {"role", "sub", "aud", "jti", "outcome", "reason"}.
"""

import argparse
import http.client
import http.server
import json
import sys
import time
import urllib.parse
import uuid

import botocore.auth
import botocore.awsrequest
import botocore.credentials
import boto3

import jwks
from http_server import serve

STS_NS = "https://sts.amazonaws.com/doc/2011-06-15/"


class Refused(Exception):
    def __init__(self, status, code, message):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def as_list(v):
    return v if isinstance(v, list) else [v]


class Shim:
    def __init__(self, args):
        self.upstream = args.upstream
        self.issuer = args.issuer
        self.provider = args.issuer.split("://", 1)[1]
        self.keys = jwks.load(args.jwks)
        with open(args.keys) as f:
            keys = json.load(f)
        self.creds = botocore.credentials.Credentials(keys["AccessKeyId"], keys["SecretAccessKey"])
        self.iam = boto3.client("iam", endpoint_url=f"http://{self.upstream}", region_name="us-east-1",
                                aws_access_key_id=keys["AccessKeyId"], aws_secret_access_key=keys["SecretAccessKey"])

    def verify(self, token, role_arn):
        """The token's claims, or Refused as STS would answer."""
        try:
            claims = jwks.signed_claims(token, self.keys)
        except ValueError as e:
            raise Refused(400, "InvalidIdentityToken", str(e))
        if claims.get("iss") != self.issuer:
            raise Refused(400, "InvalidIdentityToken", f"issuer {claims.get('iss')!r} is not trusted")
        now = time.time()
        if not isinstance(claims.get("exp"), int) or claims["exp"] <= now:
            raise Refused(400, "ExpiredTokenException", "Token expired")
        if claims.get("nbf", 0) > now + 5:
            raise Refused(400, "InvalidIdentityToken", "token not yet valid")
        self.trusts(role_arn, claims)
        return claims

    def trusts(self, role_arn, claims):
        name = role_arn.rsplit("/", 1)[-1]
        try:
            role = self.iam.get_role(RoleName=name)["Role"]
        except self.iam.exceptions.NoSuchEntityException:
            raise Refused(403, "AccessDenied", f"no role {role_arn}")
        if role["Arn"] != role_arn:
            raise Refused(403, "AccessDenied", f"no role {role_arn}")
        doc = role["AssumeRolePolicyDocument"]
        doc = json.loads(urllib.parse.unquote(doc)) if isinstance(doc, str) else doc
        auds = as_list(claims.get("aud"))
        federated = f"arn:aws:iam::{role_arn.split(':')[4]}:oidc-provider/{self.provider}"
        for s in doc.get("Statement", []):
            if s.get("Effect") != "Allow" or "sts:AssumeRoleWithWebIdentity" not in as_list(s.get("Action")):
                continue
            if federated not in as_list((s.get("Principal") or {}).get("Federated")):
                continue
            cond = (s.get("Condition") or {}).get("StringEquals") or {}
            sub_ok = all(claims.get("sub") in as_list(v) for k, v in cond.items() if k == f"{self.provider}:sub")
            aud_ok = all(any(a in as_list(v) for a in auds) for k, v in cond.items() if k == f"{self.provider}:aud")
            if sub_ok and aud_ok:
                return
        raise Refused(403, "AccessDenied", "Not authorized to perform sts:AssumeRoleWithWebIdentity")

    def forward(self, method, path, headers, body, sign=False):
        host, port = self.upstream.rsplit(":", 1)
        if sign:
            req = botocore.awsrequest.AWSRequest(method=method, url=f"http://{self.upstream}{path}", data=body,
                                                 headers={"Content-Type": "application/x-www-form-urlencoded"})
            botocore.auth.SigV4Auth(self.creds, "sts", "us-east-1").add_auth(req)
            headers = dict(req.headers.items())
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers)
            r = conn.getresponse()
            return r.status, r.getheader("Content-Type") or "text/xml", r.read()
        finally:
            conn.close()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        pass

    def answer(self, status, ctype, body):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        shim = self.server.shim
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        form = dict(urllib.parse.parse_qsl(body.decode(errors="replace")))
        # The Host header stays: it is part of what the caller signed.
        headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
        if form.get("Action") != "AssumeRoleWithWebIdentity":
            self.answer(*shim.forward("POST", self.path, headers, body))
            return
        role, line = form.get("RoleArn", ""), {}
        try:
            claims = shim.verify(form.get("WebIdentityToken", ""), role)
            line = {"role": role, "sub": claims.get("sub"), "aud": claims.get("aud"), "jti": claims.get("jti"),
                    "outcome": "forwarded"}
            self.answer(*shim.forward("POST", self.path, headers, body, sign=True))
        except Refused as e:
            line = {"role": role, "outcome": e.code, "reason": e.message}
            kind = "Sender"
            xml = (f'<ErrorResponse xmlns="{STS_NS}"><Error><Type>{kind}</Type><Code>{e.code}</Code>'
                   f'<Message>{e.message}</Message></Error><RequestId>{uuid.uuid4()}</RequestId></ErrorResponse>')
            self.answer(e.status, "text/xml", xml.encode())
        finally:
            print(json.dumps(line), flush=True)

    do_GET = do_POST


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--listen", required=True)
    p.add_argument("--upstream", required=True)
    p.add_argument("--issuer", required=True)
    p.add_argument("--jwks", required=True)
    p.add_argument("--keys", required=True)
    args = p.parse_args()
    serve(args.listen, Handler, shim=Shim(args))


if __name__ == "__main__":
    sys.exit(main())

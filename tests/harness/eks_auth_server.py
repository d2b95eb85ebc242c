"""A fake EKS Auth service: AssumeRoleForPodIdentity on its real route and wire format.

This is a test server. No EKS exists in the test environment and moto has no eks-auth service, so
this server speaks what the real one speaks (the botocore/smithy model `eks-auth` 2023-11-26,
rest-json) and does what it does, as far as a caller can tell:

    POST /clusters/{clusterName}/assume-role-for-pod-identity   body {"token": "<JWT>"}

- the request must be SigV4-signed for service `eks-auth` by a principal allowed
  `eks-auth:AssumeRoleForPodIdentity` (moto cannot evaluate eks-auth permissions, so this server
  holds that allow-list: access key id -> secret key, the keys file);
- the token's RS256 signature is verified against the fake issuer's JWKS, `iss`, `aud` =
  `pods.eks.amazonaws.com`, `exp`, `nbf`;
- the association comes from a table (cluster, namespace, service account -> role ARN), read anew
  for every call so that a test can change it;
- the role's trust policy (read from moto's IAM) must allow the service principal
  `pods.eks.amazonaws.com` `sts:AssumeRole` and `sts:TagSession`;
- credentials come from moto: AssumeRole of that role as a gateway user, with EKS's session tags
  (eks-cluster-arn, eks-cluster-name, kubernetes-namespace, kubernetes-service-account,
  kubernetes-pod-name, kubernetes-pod-uid; transitive) and EKS's session name
  (`eks-<cluster>-<pod>-<uuid>`, cut to 64);
- the answer: `subject`, `audience`, `podIdentityAssociation`, `assumedRoleUser`,
  `credentials{accessKeyId, secretAccessKey, sessionToken, expiration}` (epoch seconds); errors as
  the real service's: `{"message": ...}` with `x-amzn-ErrorType` (AccessDeniedException,
  InvalidTokenException, ExpiredTokenException, ResourceNotFoundException, ...) and the model's
  status codes.

Run inside the bench's node:

    python3 eks_auth_server.py --listen 198.18.0.2:5004 --upstream 198.18.0.2:5000 \
        --issuer https://oidc.example/id/X --jwks jwks.json --config eks-auth.json

`--config` JSON: {"account", "region", "gateway": {AccessKeyId, SecretAccessKey},
"allowed": {access key id: secret}, "associations": [{cluster, namespace, serviceAccount, roleArn}]}.
One JSON line per call on stdout: {"cluster", "sub", "pod", "jti", "caller", "role", "outcome", "reason"}.
"""

import argparse
import datetime
import hashlib
import hmac
import http.server
import json
import re
import sys
import time
import urllib.parse
import uuid

import boto3

import jwks
from http_server import serve

AUDIENCE = "pods.eks.amazonaws.com"
ROUTE = re.compile(r"^/clusters/([0-9A-Za-z][A-Za-z0-9\-_]{0,99})/assume-role-for-pod-identity$")
# The model's status code of each error.
STATUS = {"AccessDeniedException": 400, "ExpiredTokenException": 400, "InvalidParameterException": 400,
          "InvalidRequestException": 400, "InvalidTokenException": 400, "ResourceNotFoundException": 404,
          "InternalServerException": 500, "InvalidSignatureException": 403, "UnrecognizedClientException": 403}
SIGV4 = re.compile(r"^AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([^/]+)/([^/]+)/aws4_request, "
                   r"SignedHeaders=([^,]+), Signature=([0-9a-f]{64})$")


class Refused(Exception):
    def __init__(self, code, message):
        super().__init__(message)
        self.code, self.message = code, message


def as_list(v):
    return v if isinstance(v, list) else [v]


def sigv4_caller(method, path, query, headers, body, secrets, region):
    """The access key id of a valid SigV4 signature for service eks-auth by an allowed key."""
    auth = headers.get("authorization", "")
    m = SIGV4.match(auth)
    if not m:
        raise Refused("InvalidSignatureException", "the request is not SigV4-signed")
    akid, date, scope_region, service, signed, signature = m.groups()
    if service != "eks-auth":
        raise Refused("InvalidSignatureException", f"signed for service {service!r}, not 'eks-auth'")
    if scope_region != region:
        raise Refused("InvalidSignatureException", f"signed for region {scope_region!r}, not {region!r}")
    secret = secrets.get(akid)
    if secret is None:
        raise Refused("AccessDeniedException", f"{akid} is not authorized to perform: eks-auth:AssumeRoleForPodIdentity")
    amz_date = headers.get("x-amz-date", "")
    try:
        when = datetime.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=datetime.timezone.utc)
    except ValueError:
        raise Refused("InvalidSignatureException", "no valid X-Amz-Date")
    if abs(time.time() - when.timestamp()) > 300 or not amz_date.startswith(date):
        raise Refused("InvalidSignatureException", "signature expired or dated otherwise")
    names = signed.split(";")
    if "host" not in names:
        raise Refused("InvalidSignatureException", "host is not signed")
    canonical_headers = "".join(f"{n}:{' '.join(headers.get(n, '').split())}\n" for n in names)
    params = sorted(urllib.parse.parse_qsl(query, keep_blank_values=True))
    canonical_query = "&".join(f"{urllib.parse.quote(k, safe='-_.~')}={urllib.parse.quote(v, safe='-_.~')}"
                               for k, v in params)
    canonical = "\n".join([method, path, canonical_query, canonical_headers, signed, hashlib.sha256(body).hexdigest()])
    scope = f"{date}/{scope_region}/{service}/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = ("AWS4" + secret).encode()
    for part in (date, scope_region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    expected = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, signature):
        raise Refused("InvalidSignatureException", "the request signature does not match")
    return akid


class EksAuth:
    def __init__(self, args):
        self.upstream = args.upstream
        self.issuer = args.issuer
        self.config_path = args.config
        self.keys = jwks.load(args.jwks)
        gateway = self.config()["gateway"]
        session = dict(endpoint_url=f"http://{self.upstream}", region_name="us-east-1",
                       aws_access_key_id=gateway["AccessKeyId"], aws_secret_access_key=gateway["SecretAccessKey"])
        self.iam = boto3.client("iam", **session)
        self.sts = boto3.client("sts", **session)

    def config(self):
        """Read anew for every call: the tests change associations while the server runs."""
        with open(self.config_path) as f:
            return json.load(f)

    def claims(self, token):
        try:
            claims = jwks.signed_claims(token, self.keys)
        except ValueError as e:
            raise Refused("InvalidTokenException", str(e))
        if claims.get("iss") != self.issuer:
            raise Refused("InvalidTokenException", f"the token's issuer {claims.get('iss')!r} is not the cluster's")
        if AUDIENCE not in as_list(claims.get("aud")):
            raise Refused("InvalidTokenException", f"the token's audience is not {AUDIENCE}")
        now = time.time()
        if not isinstance(claims.get("exp"), int) or claims["exp"] <= now:
            raise Refused("ExpiredTokenException", "the token has expired")
        if claims.get("nbf", 0) > now + 5:
            raise Refused("InvalidTokenException", "the token is not valid yet")
        if not str(claims.get("sub", "")).startswith("system:serviceaccount:"):
            raise Refused("InvalidTokenException", "the token's subject is not a service account")
        return claims

    def trusts(self, role_arn):
        """The role's trust policy allows pods.eks.amazonaws.com sts:AssumeRole and sts:TagSession."""
        name = role_arn.rsplit("/", 1)[-1]
        try:
            role = self.iam.get_role(RoleName=name)["Role"]
        except self.iam.exceptions.NoSuchEntityException:
            raise Refused("AccessDeniedException", f"the association's role {role_arn} does not exist")
        doc = role["AssumeRolePolicyDocument"]
        doc = json.loads(urllib.parse.unquote(doc)) if isinstance(doc, str) else doc
        allowed = set()
        for s in doc.get("Statement", []):
            if s.get("Effect") == "Allow" and AUDIENCE in as_list((s.get("Principal") or {}).get("Service")):
                allowed.update(as_list(s.get("Action")))
        if not {"sts:AssumeRole", "sts:TagSession"} <= allowed:
            raise Refused("AccessDeniedException",
                          f"the trust policy of {role_arn} does not allow {AUDIENCE} sts:AssumeRole and sts:TagSession")

    def assume(self, cluster, claims):
        conf = self.config()
        bound = claims.get("kubernetes.io") or {}
        namespace, sa = claims["sub"].split(":", 3)[2:4]
        association = next((a for a in conf["associations"] if a["cluster"] == cluster
                            and a["namespace"] == namespace and a["serviceAccount"] == sa), None)
        if association is None:
            raise Refused("ResourceNotFoundException",
                          f"no Pod Identity association for service account {namespace}/{sa} in cluster {cluster}")
        role_arn = association["roleArn"]
        self.trusts(role_arn)
        pod = bound.get("pod") or {}
        cluster_arn = f"arn:aws:eks:{conf['region']}:{conf['account']}:cluster/{cluster}"
        tags = {"eks-cluster-arn": cluster_arn, "eks-cluster-name": cluster, "kubernetes-namespace": namespace,
                "kubernetes-service-account": sa, "kubernetes-pod-name": pod.get("name", ""),
                "kubernetes-pod-uid": pod.get("uid", "")}
        session = f"eks-{cluster}-{pod.get('name', '')}-{uuid.uuid4()}"[:64]
        out = self.sts.assume_role(RoleArn=role_arn, RoleSessionName=session, DurationSeconds=3600,
                                   Tags=[{"Key": k, "Value": v} for k, v in tags.items()],
                                   TransitiveTagKeys=list(tags))
        c, user = out["Credentials"], out["AssumedRoleUser"]
        association_id = "a-" + hashlib.sha256(f"{cluster}/{namespace}/{sa}".encode()).hexdigest()[:17]
        return {
            "subject": {"namespace": namespace, "serviceAccount": sa},
            "audience": AUDIENCE,
            "podIdentityAssociation": {"associationArn": f"{cluster_arn.replace(':cluster/', ':podidentityassociation/')}/{association_id}",
                                       "associationId": association_id},
            "assumedRoleUser": {"arn": user["Arn"], "assumeRoleId": user["AssumedRoleId"]},
            "credentials": {"sessionToken": c["SessionToken"], "secretAccessKey": c["SecretAccessKey"],
                            "accessKeyId": c["AccessKeyId"], "expiration": int(c["Expiration"].timestamp())},
        }


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        pass

    def answer(self, status, body, error_type=None):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("x-amzn-RequestId", str(uuid.uuid4()))
        if error_type:
            self.send_header("x-amzn-ErrorType", error_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        eks = self.server.eks
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        url = urllib.parse.urlsplit(self.path)
        line = {}
        try:
            m = ROUTE.match(url.path)
            if not m:
                raise Refused("ResourceNotFoundException", f"no route {url.path}")
            cluster = m.group(1)
            conf = eks.config()
            headers = {k.lower(): v for k, v in self.headers.items()}
            line["caller"] = sigv4_caller("POST", url.path, url.query, headers, body, conf["allowed"], conf["region"])
            try:
                token = json.loads(body or b"{}").get("token")
            except (ValueError, AttributeError):
                raise Refused("InvalidRequestException", "the body is not JSON")
            if not isinstance(token, str) or not token:
                raise Refused("InvalidParameterException", "token is required")
            line["cluster"] = cluster
            claims = eks.claims(token)
            line.update(sub=claims.get("sub"), jti=claims.get("jti"),
                        pod=((claims.get("kubernetes.io") or {}).get("pod") or {}).get("name"))
            answer = eks.assume(cluster, claims)
            line.update(role=answer["assumedRoleUser"]["arn"], outcome="issued")
            self.answer(200, answer)
        except Refused as e:
            line.update(outcome=e.code, reason=e.message)
            self.answer(STATUS.get(e.code, 400), {"message": e.message}, e.code)
        except Exception as e:  # noqa: BLE001 - the real service answers 500, never hangs up
            line.update(outcome="InternalServerException", reason=repr(e))
            self.answer(500, {"message": "internal error"}, "InternalServerException")
        finally:
            print(json.dumps(line), flush=True)

    def do_GET(self):
        self.answer(404, {"message": "no route"}, "ResourceNotFoundException")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--listen", required=True)
    p.add_argument("--upstream", required=True)
    p.add_argument("--issuer", required=True)
    p.add_argument("--jwks", required=True)
    p.add_argument("--config", required=True)
    args = p.parse_args()
    serve(args.listen, Handler, eks=EksAuth(args))


if __name__ == "__main__":
    sys.exit(main())

"""moto_server inside the node, standing in for IAM and STS.

The bench's roles are made from the documents in deploy/iam/, so that the IAM setup the README
tells operators to apply is the one every end-to-end test runs against: pod roles live under the
path `/iamlink/` and trust the node role (pod-role-trust-policy.json); the node role carries
node-role-permissions.json. moto does not enforce IAM policies unless asked to (see
tests/e2e/test_iam_docs.py, which does ask).
"""

import base64
import http.client
import json
import os
import re
import threading
import urllib.parse

import boto3
import botocore.config

from .util import Fatal, BASE_PATH, REPO, stop_process, tail, tool, wait_until

ACCOUNT = "123456789012"
TEST_KEYS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SECURITY_TOKEN": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
# The node role stands in for the nodes' instance profile role: the harness assumes it with moto's
# test keys to make the "instance" credentials the fake upstream serves.
NODE_ROLE = "iamlink-node-role"
TRUST_ANYONE = json.dumps({
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:root"},
                   "Action": ["sts:AssumeRole", "sts:TagSession"]}],
})
IAM_DOCS = os.path.join(REPO, "deploy", "iam")
# The path node-role-permissions.json lets the node role assume; iamlinkd's [roles] base_arn.
POD_ROLE_PATH = "/iamlink/"
BASE_ARN = f"arn:aws:iam::{ACCOUNT}:role{POD_ROLE_PATH}"
NODE_ROLE_ARN = f"arn:aws:iam::{ACCOUNT}:role/{NODE_ROLE}"
NODE_POLICY_NAME = "iamlink-assume-pod-roles"
_PLACEHOLDER = re.compile(r"\b(ACCOUNT_ID|NODE_ROLE_NAME|EXTERNAL_ID|REGION|CLUSTER_NAME)\b")


def role_arn(name):
    """The ARN of the bench's pod role `name` (what iamlinkd's base_arn + name gives)."""
    return BASE_ARN + name


def iam_document(filename, **values):
    """deploy/iam/<filename> with its placeholders filled in, as JSON text.

    Placeholders: ACCOUNT_ID (default: moto's account), NODE_ROLE_NAME (default: the bench's node
    role), EXTERNAL_ID, REGION, CLUSTER_NAME (no default). A placeholder left without a value is an error.
    """
    values = {"ACCOUNT_ID": ACCOUNT, "NODE_ROLE_NAME": NODE_ROLE, **values}
    with open(os.path.join(IAM_DOCS, filename)) as f:
        text = f.read()

    def fill(m):
        if m.group(1) not in values:
            raise KeyError(f"deploy/iam/{filename}: no value for placeholder {m.group(1)}")
        return values[m.group(1)]

    text = _PLACEHOLDER.sub(fill, text)
    try:
        json.loads(text)
    except ValueError as e:
        raise ValueError(f"deploy/iam/{filename} is not JSON: {e}") from None
    return text


class Moto:
    """`moto_server -H 198.18.0.2 -p 5000` in the node; boto3 calls to it run inside the node."""

    HOST = "198.18.0.2"
    PORT = 5000

    def __init__(self, node, start=True):
        self.node = node
        self.endpoint = f"http://{self.HOST}:{self.PORT}"
        self.log_path = os.path.join(node.workdir, "moto.log")
        self.proc = None
        self.roles = {}  # name -> create_role arguments, to make them again after a restart
        self.arns = {}
        self._clients = {}
        self._session = None
        self._session_lock = threading.Lock()
        if start:
            self.start()

    def start(self, timeout=60):
        if self.running:
            return
        log = open(self.log_path, "ab")
        # Off until a test starts it (start_recording): moto's record of the requests it received.
        env = {"PATH": BASE_PATH, "LANG": "C.UTF-8", "HOME": self.node.workdir,
               "MOTO_RECORDER_FILEPATH": os.path.join(self.node.workdir, "moto-recording.jsonl")}
        self.proc = self.node.spawn([tool("moto_server"), "-H", self.HOST, "-p", str(self.PORT)],
                                    env=env, stdout=log, stderr=log)
        log.close()

        def ready():
            if self.proc.poll() is not None:
                raise Fatal(f"moto_server exited {self.proc.returncode}:\n{tail(self.log_path)}")
            return self.node.call(self._http_ok)

        wait_until(ready, timeout, "moto_server on 198.18.0.2:5000", interval=0.1)
        # State is lost with the process: a restarted moto needs its roles again.
        for name, spec in list(self.roles.items()):
            self._create_role(name, **spec)

    def _http_ok(self):
        try:
            conn = http.client.HTTPConnection(self.HOST, self.PORT, timeout=1)
            conn.request("GET", "/moto-api/data.json")
            status = conn.getresponse().status
            conn.close()
            return status == 200
        except OSError:
            return False

    @property
    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self):
        if self.proc is not None:
            stop_process(self.proc, timeout=10)
            self.node.forget(self.proc)
            self.proc = None

    # -- moto's record of the requests it received -----------------------------------------
    def _moto_api(self, method, path):
        def call():
            conn = http.client.HTTPConnection(self.HOST, self.PORT, timeout=5)
            conn.request(method, path)
            r = conn.getresponse()
            body = r.read().decode()
            conn.close()
            assert r.status == 200, f"{method} {path}: {r.status} {body}"
            return body
        return self.node.call(call)

    def start_recording(self):
        """From now on moto records every request it receives (the earlier ones are forgotten)."""
        self._moto_api("POST", "/moto-api/recorder/reset-recording")
        self._moto_api("POST", "/moto-api/recorder/start-recording")

    def recorded(self, action):
        """The `action` requests (STS's query protocol) moto received since start_recording, in
        order: each its parameters as a dict, `Tags` as {key: value}, `TransitiveTagKeys` as a
        list, and `SignedBy`: the access key that signed it."""
        calls = []
        for line in self._moto_api("GET", "/moto-api/recorder/download-recording").splitlines():
            entry = json.loads(line)
            body = entry.get("body") or ""
            if entry.get("body_encoded"):
                body = base64.b64decode(body).decode()
            params = dict(urllib.parse.parse_qsl(body, keep_blank_values=True))
            if params.get("Action") != action:
                continue
            tags, transitive, out = {}, [], {}
            for k, v in params.items():
                m = re.fullmatch(r"Tags\.member\.(\d+)\.(Key|Value)", k)
                if m:
                    tags.setdefault(m.group(1), {})[m.group(2)] = v
                elif k.startswith("TransitiveTagKeys.member."):
                    transitive.append(v)
                else:
                    out[k] = v
            out["Tags"] = {t["Key"]: t.get("Value", "") for t in tags.values()}
            out["TransitiveTagKeys"] = sorted(transitive)
            auth = {k.lower(): v for k, v in entry.get("headers", {}).items()}.get("authorization", "")
            m = re.search(r"Credential=([^/]+)/", auth)
            out["SignedBy"] = m.group(1) if m else None
            calls.append(out)
        return calls

    # -- AWS calls (all made from inside the node) ----------------------------------------
    def client(self, service, creds=None):
        creds = creds or {"AccessKeyId": "testing", "SecretAccessKey": "testing", "Token": "testing"}
        # One session for every client: it loads the service models once (a new session per client
        # costs ~150 ms, which adds up when every key a test saw is resolved with its own client).
        # Sessions are not thread-safe: clients are made under a lock.
        with self._session_lock:
            if self._session is None:
                self._session = boto3.session.Session()
            return self._session.client(
                service, endpoint_url=self.endpoint, region_name="us-east-1",
                aws_access_key_id=creds["AccessKeyId"], aws_secret_access_key=creds["SecretAccessKey"],
                aws_session_token=creds.get("Token"),
                config=botocore.config.Config(retries={"max_attempts": 2}, connect_timeout=5, read_timeout=20),
            )

    def set_auth(self, count):
        """moto's INITIAL_NO_AUTH_ACTION_COUNT: "0" authorizes every request against IAM from now
        on, "inf" none."""

        def post():
            conn = http.client.HTTPConnection(self.HOST, self.PORT, timeout=10)
            conn.request("POST", "/moto-api/reset-auth", body=count.encode())
            r = conn.getresponse()
            body = r.read()
            conn.close()
            assert r.status == 200, (r.status, body)

        self.node.call(post)

    def create_role(self, name, trust=None, path=POD_ROLE_PATH):
        """Create pod role `name` (idempotent) under `path` with the trust policy of
        deploy/iam/pod-role-trust-policy.json, or `trust` (JSON text); returns its ARN."""
        self.roles[name] = {"trust": trust, "path": path}
        return self._create_role(name, trust=trust, path=path)

    def create_node_role(self, name=NODE_ROLE):
        """Create the node role (idempotent) with deploy/iam/node-role-permissions.json as its
        inline policy; returns its ARN."""
        self.roles[name] = {"node": True}
        return self._create_role(name, node=True)

    def _create_role(self, name, trust=None, path=POD_ROLE_PATH, node=False):
        iam = self.client("iam")
        if node:
            trust, path = TRUST_ANYONE, "/"
        elif trust is None:
            trust = iam_document("pod-role-trust-policy.json")

        def create():
            try:
                arn = iam.create_role(RoleName=name, Path=path, AssumeRolePolicyDocument=trust,
                                      MaxSessionDuration=43200)["Role"]["Arn"]
            except iam.exceptions.EntityAlreadyExistsException:
                arn = iam.get_role(RoleName=name)["Role"]["Arn"]
            if node:
                iam.put_role_policy(RoleName=name, PolicyName=NODE_POLICY_NAME,
                                    PolicyDocument=iam_document("node-role-permissions.json"))
            return arn

        self.arns[name] = self.node.call(create)
        return self.arns[name]

    def assume_role(self, name, session="iamlink-bench", duration=3600, creds=None, **params):
        """AssumeRole of role `name` (a role of ours, a pod role name or an ARN) with moto's test
        keys or `creds`; `params` go to the call as they are (ExternalId=...)."""
        arn = name if name.startswith("arn:") else self.arns.get(name, role_arn(name))
        sts = self.client("sts", creds)
        out = self.node.call(lambda: sts.assume_role(RoleArn=arn, RoleSessionName=session,
                                                     DurationSeconds=duration, **params))
        c = out["Credentials"]
        return {"AccessKeyId": c["AccessKeyId"], "SecretAccessKey": c["SecretAccessKey"],
                "Token": c["SessionToken"], "Expiration": c["Expiration"]}

    def caller_arn(self, creds):
        """`sts get-caller-identity` with these credentials: the ARN moto attributes them to."""
        sts = self.client("sts", creds)
        return self.node.call(lambda: sts.get_caller_identity()["Arn"])

"""moto_server inside the node, standing in for IAM and STS."""

import http.client
import json
import os

import boto3
import botocore.config

from .util import Fatal, BASE_PATH, stop_process, tail, tool, wait_until

ACCOUNT = "123456789012"
TEST_KEYS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SECURITY_TOKEN": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
TRUST_ANYONE = json.dumps({
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:root"},
                   "Action": ["sts:AssumeRole", "sts:TagSession"]}],
})


def role_arn(name):
    return f"arn:aws:iam::{ACCOUNT}:role/{name}"


class Moto:
    """`moto_server -H 198.18.0.2 -p 5000` in the node; boto3 calls to it run inside the node."""

    HOST = "198.18.0.2"
    PORT = 5000

    def __init__(self, node, start=True):
        self.node = node
        self.endpoint = f"http://{self.HOST}:{self.PORT}"
        self.log_path = os.path.join(node.workdir, "moto.log")
        self.proc = None
        self.roles = []
        self._clients = {}
        if start:
            self.start()

    def start(self, timeout=60):
        if self.running:
            return
        log = open(self.log_path, "ab")
        env = {"PATH": BASE_PATH, "LANG": "C.UTF-8", "HOME": self.node.workdir}
        self.proc = self.node.spawn([tool("moto_server"), "-H", self.HOST, "-p", str(self.PORT)],
                                    env=env, stdout=log, stderr=log)
        log.close()

        def ready():
            if self.proc.poll() is not None:
                raise Fatal(f"moto_server exited {self.proc.returncode}:\n{tail(self.log_path)}")
            return self.node.call(self._http_ok)

        wait_until(ready, timeout, "moto_server on 198.18.0.2:5000", interval=0.1)
        # State is lost with the process: a restarted moto needs its roles again.
        for name in list(self.roles):
            self._create_role(name)

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

    # -- AWS calls (all made from inside the node) ----------------------------------------
    def client(self, service, creds=None):
        creds = creds or {"AccessKeyId": "testing", "SecretAccessKey": "testing", "Token": "testing"}
        return boto3.session.Session().client(
            service, endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id=creds["AccessKeyId"], aws_secret_access_key=creds["SecretAccessKey"],
            aws_session_token=creds.get("Token"),
            config=botocore.config.Config(retries={"max_attempts": 2}, connect_timeout=5, read_timeout=20),
        )

    def create_role(self, name):
        """Create IAM role `name` (idempotent); returns its ARN."""
        if name not in self.roles:
            self.roles.append(name)
        return self._create_role(name)

    def _create_role(self, name):
        iam = self.client("iam")

        def create():
            try:
                return iam.create_role(RoleName=name, AssumeRolePolicyDocument=TRUST_ANYONE,
                                       MaxSessionDuration=43200)["Role"]["Arn"]
            except iam.exceptions.EntityAlreadyExistsException:
                return iam.get_role(RoleName=name)["Role"]["Arn"]

        return self.node.call(create)

    def assume_role(self, name, session="iamlink-bench", duration=3600):
        sts = self.client("sts")
        out = self.node.call(lambda: sts.assume_role(RoleArn=role_arn(name), RoleSessionName=session,
                                                     DurationSeconds=duration))
        c = out["Credentials"]
        return {"AccessKeyId": c["AccessKeyId"], "SecretAccessKey": c["SecretAccessKey"],
                "Token": c["SessionToken"], "Expiration": c["Expiration"]}

    def caller_arn(self, creds):
        """`sts get-caller-identity` with these credentials: the ARN moto attributes them to."""
        sts = self.client("sts", creds)
        return self.node.call(lambda: sts.get_caller_identity()["Arn"])

"""A bench in which the node holds no role: token mode's end-to-end setting.

moto enforces IAM on every request (`/moto-api/reset-auth` 0, as INITIAL_NO_AUTH_ACTION_COUNT=0);
iamlinkd's own identity is an IAM user with no policy at all (no `sts:AssumeRole`); STS is the
strict web identity shim (`sts_web_identity_shim.py`) in front of moto; pods' projected tokens are
signed by a fake OIDC issuer and laid out under a tmpfs as kubelet lays them out. With
`pod_identity`, the fake EKS Auth (`eks_auth_server.py`) runs too: its allow-list of
`eks-auth:AssumeRoleForPodIdentity` holds iamlinkd's principal, and it answers from an
association table the tests edit.
"""

import json
import os
import uuid

from .moto import ACCOUNT, BASE_ARN, IAM_DOCS
from .oidc import (IRSA_AUDIENCE, IRSA_VOLUME, POD_IDENTITY_AUDIENCE, POD_IDENTITY_VOLUME, Issuer, KubeletPods,
                   projected_volume)
from .util import BASE_PATH, PYTHON, Fatal, stop_process, tail, wait_until

SHIM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sts_web_identity_shim.py")
EKS_AUTH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "eks_auth_server.py")
CLUSTER = "e2e-cluster"
# The projected file of EKS's volume (REFERENCE.md).
POD_IDENTITY_PATH = "eks-pod-identity-token"
EKS_GATEWAY_USER = "eks-auth-gateway"
EKS_GATEWAY_POLICY = json.dumps({"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Action": ["sts:AssumeRole", "sts:TagSession", "iam:GetRole"], "Resource": "*"}]})
NODE_USER = "iamlink-node-no-role"
GATEWAY_USER = "sts-web-identity-gateway"
GATEWAY_POLICY = json.dumps({"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Action": ["sts:AssumeRoleWithWebIdentity", "iam:GetRole"], "Resource": "*"}]})


class TokenBench:
    """Turns a Bench made with start_daemon=False and kubernetes={} into a token-mode bench and
    starts iamlinkd. `roles`: {name: (namespace, service_account)} web identity roles."""

    HOST, PORT = "198.18.0.2", 5003
    EKS_PORT = 5004

    def __init__(self, bench, roles, daemon_kubernetes=None, roles_extra=None, pod_identity_roles=()):
        self.bench = bench
        self.node = bench.node
        self.issuer = Issuer()
        self.kubelet = KubeletPods(self.node.workdir)
        bench.callback(self.kubelet.close)
        moto = bench.moto
        self.node_keys = self._user(NODE_USER, policy=None)
        gateway_keys = self._user(GATEWAY_USER, policy=GATEWAY_POLICY)
        for name, (namespace, sa) in roles.items():
            self.create_role(name, namespace, sa)
        jwks = self.issuer.write_jwks(os.path.join(self.node.workdir, "jwks.json"))
        keys = os.path.join(self.node.workdir, "gateway-keys.json")
        with open(keys, "w") as f:
            json.dump(gateway_keys, f)
        self.log_path = os.path.join(self.node.workdir, "sts-shim.log")
        log = open(self.log_path, "ab")
        self.proc = self.node.spawn([PYTHON, SHIM, "--listen", f"{self.HOST}:{self.PORT}",
                                     "--upstream", f"{moto.HOST}:{moto.PORT}", "--issuer", self.issuer.url,
                                     "--jwks", jwks, "--keys", keys],
                                    env={"PATH": BASE_PATH, "LANG": "C.UTF-8", "HOME": self.node.workdir},
                                    stdout=log, stderr=log)
        log.close()
        bench.callback(self.stop)
        bench.extra_logs.append(("strict STS shim", self.log_path))

        def ready():
            if self.proc.poll() is not None:
                raise Fatal(f"STS shim exited {self.proc.returncode}:\n{tail(self.log_path)}")
            return self.node.can_connect(self.HOST, self.PORT)

        wait_until(ready, 20, "STS shim on 198.18.0.2:5003")
        if pod_identity_roles:
            self._start_eks_auth(pod_identity_roles, jwks)
        self.bench.moto.set_auth("0")  # from now on moto authorizes every request against IAM
        daemon = bench.daemon
        daemon.aws_keys = {"AWS_ACCESS_KEY_ID": self.node_keys["AccessKeyId"],
                           "AWS_SECRET_ACCESS_KEY": self.node_keys["SecretAccessKey"],
                           "AWS_DEFAULT_REGION": "us-east-1"}
        daemon.sts["endpoint"] = f"http://{self.HOST}:{self.PORT}"
        kube = daemon.settings["kubernetes"]
        kube["kubelet_pods_dir"] = self.kubelet.root
        kube.update(daemon_kubernetes or {})
        daemon.roles_extra.update(roles_extra or {})
        daemon.start()

    def _start_eks_auth(self, roles, jwks):
        """The fake EKS Auth on 198.18.0.2:5004, `roles` created with the Pod Identity trust
        policy (deploy/iam), no association yet; iamlinkd pointed at it, in cluster CLUSTER."""
        gateway = self._user(EKS_GATEWAY_USER, policy=EKS_GATEWAY_POLICY)
        for name in roles:
            self.create_pod_identity_role(name)
        self.eks_config_path = os.path.join(self.node.workdir, "eks-auth.json")
        self.eks_config = {"account": ACCOUNT, "region": "us-east-1", "gateway": gateway,
                           "allowed": {self.node_keys["AccessKeyId"]: self.node_keys["SecretAccessKey"]},
                           "associations": []}
        self._write_eks_config()
        self.eks_log_path = os.path.join(self.node.workdir, "eks-auth.log")
        log = open(self.eks_log_path, "ab")
        self.eks_proc = self.node.spawn([PYTHON, EKS_AUTH, "--listen", f"{self.HOST}:{self.EKS_PORT}",
                                         "--upstream", f"{self.bench.moto.HOST}:{self.bench.moto.PORT}",
                                         "--issuer", self.issuer.url, "--jwks", jwks, "--config",
                                         self.eks_config_path],
                                        env={"PATH": BASE_PATH, "LANG": "C.UTF-8", "HOME": self.node.workdir},
                                        stdout=log, stderr=log)
        log.close()
        self.bench.callback(self._stop_eks_auth)
        self.bench.extra_logs.append(("fake EKS Auth", self.eks_log_path))

        def ready():
            if self.eks_proc.poll() is not None:
                raise Fatal(f"fake EKS Auth exited {self.eks_proc.returncode}:\n{tail(self.eks_log_path)}")
            return self.node.can_connect(self.HOST, self.EKS_PORT)

        wait_until(ready, 20, "fake EKS Auth on 198.18.0.2:5004")
        daemon = self.bench.daemon
        daemon.settings["eks_auth"] = {"endpoint": f"http://{self.HOST}:{self.EKS_PORT}"}
        daemon.sts["cluster_name"] = CLUSTER

    def _write_eks_config(self):
        tmp = self.eks_config_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.eks_config, f)
        os.rename(tmp, self.eks_config_path)

    def _stop_eks_auth(self):
        if getattr(self, "eks_proc", None) is not None:
            stop_process(self.eks_proc, timeout=5)
            self.node.forget(self.eks_proc)
            self.eks_proc = None

    def associate(self, namespace, service_account, role, cluster=CLUSTER):
        """An EKS Pod Identity association, as `aws eks create-pod-identity-association` makes one."""
        self.eks_config["associations"].append({"cluster": cluster, "namespace": namespace,
                                                "serviceAccount": service_account, "roleArn": BASE_ARN + role})
        self._write_eks_config()

    def eks_calls(self):
        """The fake EKS Auth's calls: [{"cluster", "sub", "pod", "jti", "caller", "role", "outcome", "reason"?}]."""
        with open(self.eks_log_path) as f:
            lines = [json.loads(x) for x in f if x.startswith("{")]
        return [x for x in lines if "outcome" in x]

    def create_pod_identity_role(self, name):
        """A role under the pod-role path that trusts EKS Pod Identity
        (deploy/iam/pod-identity-role-trust-policy.json, which the fake EKS Auth requires), plus
        the fake's gateway user as a principal of the same statement: moto evaluates trust
        policies and cannot act as the service principal pods.eks.amazonaws.com, so the gateway
        stands in for it (and moto 5 fails on a statement whose principal is a service only)."""
        with open(os.path.join(IAM_DOCS, "pod-identity-role-trust-policy.json")) as f:
            trust = json.load(f)
        for statement in trust["Statement"]:
            statement["Principal"]["AWS"] = f"arn:aws:iam::{ACCOUNT}:user/{EKS_GATEWAY_USER}"
        return self.bench.moto.create_role(name, trust=json.dumps(trust))

    def _user(self, name, policy):
        iam = self.bench.moto.client("iam")

        def make():
            iam.create_user(UserName=name)
            if policy:
                iam.put_user_policy(UserName=name, PolicyName="p", PolicyDocument=policy)
            k = iam.create_access_key(UserName=name)["AccessKey"]
            return {"AccessKeyId": k["AccessKeyId"], "SecretAccessKey": k["SecretAccessKey"]}

        return self.node.call(make)

    def create_role(self, name, namespace, service_account):
        """A role under the pod-role path that trusts the issuer for this service account only:
        deploy/iam/irsa-role-trust-policy.json, filled in."""
        path = os.path.join(IAM_DOCS, "irsa-role-trust-policy.json")
        with open(path) as f:
            text = f.read()
        for placeholder, value in (("ACCOUNT_ID", ACCOUNT), ("OIDC_PROVIDER", self.issuer.provider),
                                   ("NAMESPACE", namespace), ("SERVICE_ACCOUNT", service_account)):
            text = text.replace(placeholder, value)
        return self.bench.moto.create_role(name, trust=json.dumps(json.loads(text)))

    def stop(self):
        if self.proc is not None:
            stop_process(self.proc, timeout=5)
            self.node.forget(self.proc)
            self.proc = None

    def shim_calls(self):
        """The shim's web identity calls: [{"role", "sub", "aud", "outcome", "reason"?}]."""
        with open(self.log_path) as f:
            lines = [json.loads(x) for x in f if x.startswith("{")]
        return [x for x in lines if "outcome" in x]

    # -- pods ---------------------------------------------------------------------------------
    def irsa_pod(self, namespace, name, service_account, role, volume=IRSA_VOLUME, audience=IRSA_AUDIENCE,
                 token=True, sa_annotations=None):
        """An IRSA pod as the webhook makes it: its service account annotated with the role, the
        projected volume in its spec, AWS_ROLE_ARN in its env; kubelet wrote the token."""
        bench, uid = self.bench, str(uuid.uuid4())
        kube = bench.kube
        try:
            kube.create_namespace(namespace)
        except AssertionError:
            pass
        annotations = {"eks.amazonaws.com/role-arn": BASE_ARN + role, **(sa_annotations or {})}
        try:
            kube.create_service_account(namespace, service_account, annotations=annotations)
        except AssertionError:
            pass
        kube.create_pod(namespace, name, node=self.node.name, service_account=service_account, uid=uid,
                        volumes=[projected_volume(volume, audience)])
        pod = bench.pods.add(namespace, name, uid=uid)
        pod.service_account = service_account
        if token:
            self.kubelet.write(uid, self.issuer.token(pod, service_account, audience, node=self.node.name),
                               volume=volume)
        return pod

    def pod_identity_pod(self, namespace, name, service_account, token=True, volume=POD_IDENTITY_VOLUME,
                         extra_volumes=()):
        """A pod as EKS's webhook makes it for Pod Identity: the projected token of audience
        pods.eks.amazonaws.com in its spec (its service account carries no annotation); kubelet
        wrote the token."""
        bench, uid = self.bench, str(uuid.uuid4())
        kube = bench.kube
        for make in (lambda: kube.create_namespace(namespace),
                     lambda: kube.create_service_account(namespace, service_account)):
            try:
                make()
            except AssertionError:
                pass
        volumes = [projected_volume(volume, POD_IDENTITY_AUDIENCE, path=POD_IDENTITY_PATH)] + list(extra_volumes)
        kube.create_pod(namespace, name, node=self.node.name, service_account=service_account, uid=uid,
                        volumes=volumes)
        pod = bench.pods.add(namespace, name, uid=uid)
        pod.service_account = service_account
        if token:
            self.write_pod_identity_token(pod, self.pod_identity_token(pod), volume=volume)
        return pod

    def pod_identity_token(self, pod, service_account=None, **claims):
        return self.issuer.token(pod, service_account or pod.service_account, POD_IDENTITY_AUDIENCE,
                                 node=self.node.name, **claims)

    def write_pod_identity_token(self, pod, token, volume=POD_IDENTITY_VOLUME):
        self.kubelet.write(pod.uid, token, volume=volume, path=POD_IDENTITY_PATH)

    def pod_identity_token_file(self, pod, volume=POD_IDENTITY_VOLUME):
        """The file's path as kubelet keeps it: what AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE names."""
        return os.path.join(self.kubelet.volume_dir(pod.uid, volume), POD_IDENTITY_PATH)

"""A fake OIDC issuer and kubelet's projected token volumes, for token mode (IRSA, Pod Identity).

`Issuer` signs RS256 tokens shaped like kube-apiserver's bound service-account tokens (`iss`,
`sub`, `aud`, `exp`, `iat`, `nbf`, `kubernetes.io{namespace, pod, serviceaccount, node}`) and
writes its JWKS to a file the strict STS shim reads. `KubeletPods` lays tokens out as kubelet's
atomic writer does, on a tmpfs of the test's: `<root>/<uid>/volumes/kubernetes.io~projected/
<volume>/<path> -> ..data/<path>`, `..data -> ..<timestamp>/`, rotation by renaming a new
`..data` link over the old one.
"""

import base64
import json
import os
import subprocess
import time
import uuid

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

IRSA_AUDIENCE = "sts.amazonaws.com"
IRSA_VOLUME = "aws-iam-token"
POD_IDENTITY_AUDIENCE = "pods.eks.amazonaws.com"
POD_IDENTITY_VOLUME = "eks-pod-identity-token"


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64url_int(n):
    return b64url(n.to_bytes((n.bit_length() + 7) // 8, "big"))


class Issuer:
    """An RS256 OIDC issuer: `token(...)` signs a bound service-account token."""

    def __init__(self, url="https://oidc.iamlink.test/id/E2E"):
        self.url = url
        self.kid = uuid.uuid4().hex[:16]
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    @property
    def provider(self):
        """What IAM calls the provider: the URL without its scheme (trust policy condition keys)."""
        return self.url.split("://", 1)[1]

    def jwks(self):
        pub = self._key.public_key().public_numbers()
        return {"keys": [{"kty": "RSA", "alg": "RS256", "use": "sig", "kid": self.kid,
                          "n": _b64url_int(pub.n), "e": _b64url_int(pub.e)}]}

    def write_jwks(self, path):
        with open(path, "w") as f:
            json.dump(self.jwks(), f)
        return path

    def sign(self, claims, key=None):
        header = {"alg": "RS256", "kid": self.kid, "typ": "JWT"}
        signing_input = b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(claims).encode())
        sig = (key or self._key).sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return signing_input + "." + b64url(sig)

    def token(self, pod, service_account="default", audience=IRSA_AUDIENCE, node=None, ttl=3600, now=None,
              forged=False, **overrides):
        """A token bound to `pod` (has .namespace, .name, .uid); `overrides` replace claims.
        forged=True signs with a key the JWKS does not hold."""
        now = int(now if now is not None else time.time())
        bound = {"namespace": pod.namespace,
                 "pod": {"name": pod.name, "uid": pod.uid},
                 "serviceaccount": {"name": service_account, "uid": str(uuid.uuid5(uuid.NAMESPACE_URL, service_account))},
                 "warnafter": now + int(ttl * 0.8)}
        if node:
            bound["node"] = {"name": node, "uid": str(uuid.uuid5(uuid.NAMESPACE_URL, node))}
        claims = {"aud": [audience], "exp": now + ttl, "iat": now, "nbf": now, "iss": self.url,
                  "jti": str(uuid.uuid4()), "kubernetes.io": bound,
                  "sub": f"system:serviceaccount:{pod.namespace}:{service_account}"}
        claims.update(overrides)
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048) if forged else None
        return self.sign(claims, key)


def projected_volume(volume=IRSA_VOLUME, audience=IRSA_AUDIENCE, path="token", expiration=86400):
    """The pod-spec volume the IRSA webhook (or EKS for Pod Identity) adds."""
    return {"name": volume, "projected": {"defaultMode": 420, "sources": [
        {"serviceAccountToken": {"audience": audience, "expirationSeconds": expiration, "path": path}}]}}


class KubeletPods:
    """kubelet's pods directory on a tmpfs under `parent`; close() unmounts it."""

    def __init__(self, parent):
        self.root = os.path.join(parent, "kubelet-pods")
        os.makedirs(self.root, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0750", "tmpfs", self.root], check=True)
        self._serial = 0

    def volume_dir(self, uid, volume):
        return os.path.join(self.root, uid, "volumes", "kubernetes.io~projected", volume)

    def write(self, uid, token, volume=IRSA_VOLUME, path="token"):
        """Writes (or rotates) the volume's file as kubelet's atomic writer does."""
        vdir = self.volume_dir(uid, volume)
        os.makedirs(vdir, exist_ok=True)
        self._serial += 1
        ts = time.strftime("..%Y_%m_%d_%H_%M_%S.", time.gmtime()) + str(self._serial)
        os.makedirs(os.path.join(vdir, ts))
        with open(os.path.join(vdir, ts, path), "w") as f:
            f.write(token)
        os.chmod(os.path.join(vdir, ts, path), 0o644)
        old = os.path.join(vdir, "..data")
        previous = os.readlink(old) if os.path.islink(old) else None
        tmp = os.path.join(vdir, "..data_tmp")
        os.symlink(ts, tmp)
        os.rename(tmp, old)  # the atomic swap
        link = os.path.join(vdir, path)
        if not os.path.islink(link):
            os.symlink(os.path.join("..data", path), link)
        if previous:
            subprocess.run(["rm", "-rf", os.path.join(vdir, previous)], check=True)

    def remove(self, uid, volume=IRSA_VOLUME, path="token"):
        """The file gone (the link dangles), as after a failed write."""
        vdir = self.volume_dir(uid, volume)
        target = os.path.join(vdir, os.readlink(os.path.join(vdir, "..data")), path)
        os.unlink(target)

    def close(self):
        subprocess.run(["umount", self.root], check=False)
        try:
            os.rmdir(self.root)
        except OSError:
            pass

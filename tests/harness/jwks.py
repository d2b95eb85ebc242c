"""RS256 bound-token checks against the fake issuer's JWKS file, shared by the harness's strict
token exchanges (sts_web_identity_shim.py, eks_auth_server.py); a sibling module, imported as
`jwks` by those scripts as they import `http_server`."""

import base64
import json

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa


def b64d(s):
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def load(path):
    """{kid: public key} of a JWKS file."""
    with open(path) as f:
        return {k["kid"]: rsa.RSAPublicNumbers(int.from_bytes(b64d(k["e"]), "big"),
                                               int.from_bytes(b64d(k["n"]), "big")).public_key()
                for k in json.load(f)["keys"]}


def signed_claims(token, keys):
    """The claims of `token` once its RS256 signature by one of `keys` is verified; else
    ValueError saying why (the callers answer it in their service's words)."""
    try:
        h64, p64, s64 = token.split(".")
        header, claims = json.loads(b64d(h64)), json.loads(b64d(p64))
    except (ValueError, AttributeError):
        raise ValueError("the token is not a JWT")
    key = keys.get(header.get("kid"))
    if header.get("alg") != "RS256" or key is None:
        raise ValueError("the token is signed by an unknown key")
    try:
        key.verify(b64d(s64), f"{h64}.{p64}".encode(), padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        raise ValueError("the token's signature is invalid")
    return claims

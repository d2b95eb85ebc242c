"""RecordingProxy: an HTTPS proxy in the node that records which host each tunnel was opened to
(the honest view of which STS endpoint iamlinkd calls) and answers through moto, with a test CA
iamlinkd is told to trust (`[sts] ca_bundle`). Also a stand-in STS VPC endpoint on an address of
the node, for NO_PROXY."""

import datetime
import ipaddress
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .util import BASE_PATH, PYTHON, Fatal, json_lines, stop_process, tail, wait_until

SERVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recording_proxy_server.py")


def _name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key, path):
    with open(path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))


def make_ca_and_leaf(workdir, hosts, ips):
    """A CA (ca.pem) and a server certificate it signed for `hosts` and `ips` (leaf.pem, leaf.key)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    valid = dict(not_valid_before=now - datetime.timedelta(hours=1), not_valid_after=now + datetime.timedelta(days=1))
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder(**valid).subject_name(_name("iamlink test CA")).issuer_name(_name("iamlink test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.DNSName(h) for h in hosts] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    leaf = (x509.CertificateBuilder(**valid).subject_name(_name(hosts[0])).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = {n: os.path.join(workdir, f"proxy-{n}") for n in ("ca.pem", "leaf.pem", "leaf.key")}
    with open(paths["ca.pem"], "wb") as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    with open(paths["leaf.pem"], "wb") as f:
        f.write(leaf.public_bytes(serialization.Encoding.PEM))
    _write_key(key, paths["leaf.key"])
    return paths


class RecordingProxy:
    """The proxy on 127.0.0.1:3128 of the node; the stand-in VPC endpoint on 127.0.0.1:8443."""

    HOST = "127.0.0.1"
    PORT = 3128
    DIRECT_PORT = 8443

    def __init__(self, node, moto, hosts):
        self.node = node
        self.paths = make_ca_and_leaf(node.workdir, list(hosts), [self.HOST])
        self.ca_path = self.paths["ca.pem"]
        self.url = f"http://{self.HOST}:{self.PORT}"
        self.direct_url = f"https://{self.HOST}:{self.DIRECT_PORT}"
        self.log_path = os.path.join(node.workdir, "proxy-tunnels.jsonl")
        self.stderr_path = os.path.join(node.workdir, "proxy.log")
        err = open(self.stderr_path, "ab")
        self.proc = node.spawn(
            [PYTHON, SERVER, "--listen", f"{self.HOST}:{self.PORT}", "--direct", f"{self.HOST}:{self.DIRECT_PORT}",
             "--forward", f"{moto.HOST}:{moto.PORT}", "--cert", self.paths["leaf.pem"],
             "--key", self.paths["leaf.key"], "--log", self.log_path],
            env={"PATH": BASE_PATH, "LANG": "C.UTF-8"}, stdout=err, stderr=err)
        err.close()

        def ready():
            if self.proc.poll() is not None:
                raise Fatal(f"recording proxy exited {self.proc.returncode}:\n{tail(self.stderr_path)}")
            return all(node.can_connect(self.HOST, p) for p in (self.PORT, self.DIRECT_PORT))

        wait_until(ready, 10, "recording proxy in the node", interval=0.05)

    def tunnels(self):
        """Every tunnel or direct connection so far, in order."""
        return json_lines(self.log_path) if os.path.exists(self.log_path) else []

    def stop(self):
        if self.proc is not None:
            stop_process(self.proc, timeout=5)
            self.node.forget(self.proc)
            self.proc = None

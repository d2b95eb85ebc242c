"""Daemon: iamlinkd from target/release, configured and run inside the node."""

import http.client
import json
import os
import signal

from .moto import BASE_ARN, TEST_KEYS
from .util import Fatal, BASE_PATH, IAMLINKD, json_lines, stop_process, tail, wait_until

DEFAULT_PROXY_ALLOW = [
    "/latest/meta-data/placement/region",
    "/latest/meta-data/placement/availability-zone",
    "/latest/dynamic/instance-identity/document",
]


def _toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a TOML basic string (newlines escaped too)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"no TOML for {v!r}")


def to_toml(top, sts, roles_base, pod_roles, default_role=None, associations=(), roles_extra=None):
    """The daemon's config file. A dict among `top`'s values is a table of its own (`[limits]`);
    `roles_extra`: more [roles] keys (legacy_assume_role = false, say)."""
    tables = {k: v for k, v in top.items() if isinstance(v, dict)}
    lines = [f"{k} = {_toml_value(v)}" for k, v in top.items() if v is not None and k not in tables]
    lines += ["", "[sts]"] + [f"{k} = {_toml_value(v)}" for k, v in sts.items() if v is not None]
    for name, table in tables.items():
        lines += ["", f"[{name}]"] + [f"{k} = {_toml_value(v)}" for k, v in table.items() if v is not None]
    lines += ["", "[roles]"] + ([f"base_arn = {_toml_value(roles_base)}"] if roles_base else [])
    if default_role:
        lines.append(f"default = {_toml_value(default_role)}")
    lines += [f"{k} = {_toml_value(v)}" for k, v in (roles_extra or {}).items()]
    for entry in pod_roles:
        lines += ["", "[[roles.pod]]"]
        lines += [f"{k} = {_toml_value(entry[k])}" for k in ("namespace", "name", "role") if entry.get(k)]
    for entry in associations:
        lines += ["", "[[roles.association]]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in entry.items() if v is not None]
    return "\n".join(lines) + "\n"


class Daemon:
    """iamlinkd with a config of the bench's: listen 198.18.0.1:8181, STS at moto.

    `pod_roles`: a list of {"namespace", "name" (optional), "role"} as in `[[roles.pod]]`;
    `associations`: {"namespace", "service_account", "role", ...} as in `[[roles.association]]`
    (every key of the dict is written).
    `settings`: top-level keys overriding the defaults (e.g. imdsv1=False), a dict value being a
    table (e.g. limits={"burst": 10}); `sts`: [sts] keys. `wrapper`: argv run in front of iamlinkd
    (e.g. a private mount namespace), ending with something that execs its arguments.
    """

    LISTEN_HOST = "198.18.0.1"
    LISTEN_PORT = 8181
    # Metrics and probes on the node's address, as the DaemonSet binds them (iamlinkd's default
    # is loopback): reachable from the node, and from pods through the node's address.
    METRICS_PORT = 9101

    def __init__(self, node, moto, store_dir, pod_roles, default_role=None, settings=None, sts=None,
                 binary=IAMLINKD, wrapper=None, associations=()):
        self.node = node
        self.moto = moto
        self.store_dir = store_dir
        self.pod_roles = list(pod_roles)
        self.default_role = default_role
        self.associations = list(associations)
        # [roles] base_arn; None: unset (with [kubernetes], iamlinkd discovers its account's).
        self.roles_base = BASE_ARN
        self.binary = binary
        self.wrapper = list(wrapper or [])
        self.settings = {
            "listen": f"{self.LISTEN_HOST}:{self.LISTEN_PORT}",
            "metrics_listen": f"{self.LISTEN_HOST}:{self.METRICS_PORT}",
            "store_dir": store_dir,
            "imdsv1": True,
            "upstream": "http://169.254.169.254",
            "proxy_allow": DEFAULT_PROXY_ALLOW,
            "audit_log": os.path.join(node.workdir, "audit.jsonl"),
        }
        self.settings.update(settings or {})
        self.sts = {"endpoint": moto.endpoint, "region": "us-east-1"}
        self.sts.update(sts or {})
        self.config_path = os.path.join(node.workdir, "iamlinkd.toml")
        self.log_path = os.path.join(node.workdir, "iamlinkd.log")
        self.proc = None
        self.starts = 0
        # The daemon's own AWS identity (environment keys); token-mode benches give it a
        # principal without sts:AssumeRole.
        self.aws_keys = dict(TEST_KEYS)
        # More [roles] keys.
        self.roles_extra = {}
        # More environment (a proxy's HTTPS_PROXY, AWS_REGION...).
        self.extra_env = {}

    def write_config(self):
        text = to_toml(self.settings, self.sts, self.roles_base, self.pod_roles,
                       self.default_role, self.associations, self.roles_extra)
        with open(self.config_path, "w") as f:
            f.write(text)
        return text

    def environment(self):
        env = {"PATH": BASE_PATH, "LANG": "C.UTF-8", "HOME": self.node.workdir,
               "RUST_BACKTRACE": "1", "RUST_LOG": os.environ.get("IAMLINK_RUST_LOG", "info"),
               # The daemon's own identity: moto's test keys, never the node's metadata service
               # (and no ~/.aws: HOME is the bench's work directory).
               "AWS_EC2_METADATA_DISABLED": "true",
               "NODE_NAME": self.node.name}
        env.update(self.aws_keys)
        env.update(self.extra_env)
        return env

    def start(self, wait=True, timeout=30):
        if self.running:
            raise RuntimeError("iamlinkd already running")
        if not os.access(self.binary, os.X_OK):
            raise FileNotFoundError(f"{self.binary} is not built: run scripts/setup")
        self.write_config()
        self.starts += 1
        log = open(self.log_path, "ab")
        log.write(f"---- iamlinkd start #{self.starts} ----\n".encode())
        log.flush()
        self.proc = self.node.spawn(self.wrapper + [self.binary, "--config", self.config_path],
                                    env=self.environment(), stdout=log, stderr=log)
        log.close()
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout=30):
        def ready():
            if self.proc.poll() is not None:
                raise Fatal(f"iamlinkd exited {self.proc.returncode}:\n{self.log_tail()}")
            return self.node.can_connect(self.LISTEN_HOST, self.LISTEN_PORT)

        wait_until(ready, timeout, "iamlinkd listening on 198.18.0.1:8181", interval=0.05)

    @property
    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout=10):
        """SIGTERM, then SIGKILL after `timeout`; returns the exit status."""
        return self._end(signal.SIGTERM, timeout)

    def kill(self):
        return self._end(signal.SIGKILL, 5)

    def _end(self, sig, timeout):
        if self.proc is None:
            return None
        rc = stop_process(self.proc, timeout=timeout, sig=sig)
        self.node.forget(self.proc)
        self.proc = None
        return rc

    def restart(self, **kwargs):
        self.stop()
        return self.start(**kwargs)

    def reconfigure(self, settings=None, pod_roles=None, default_role=None):
        """Stop, change the config, start again."""
        self.stop()
        if settings:
            self.settings.update(settings)
        if pod_roles is not None:
            self.pod_roles = list(pod_roles)
        if default_role is not None:
            self.default_role = default_role
        return self.start()

    def metrics_get(self, path, timeout=2):
        """(status, body) of GET path on the metrics listener, from inside the node."""
        host, port = self.settings["metrics_listen"].rsplit(":", 1)

        def get():
            conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
            try:
                conn.request("GET", path)
                r = conn.getresponse()
                return r.status, r.read().decode()
            finally:
                conn.close()

        return self.node.call(get)

    def log_text(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def audit_lines(self):
        """The audit log's JSON lines (credential answers and refusals), oldest first."""
        return json_lines(self.settings["audit_log"])

    def log_tail(self, lines=40):
        return tail(self.log_path, lines)

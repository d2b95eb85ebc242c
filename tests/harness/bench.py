"""Bench: a node with moto, the fake upstream, iamlinkd and a pod factory, torn down as one."""

import contextlib
import os

from .daemon import Daemon
from .kube_api import KubeApi
from .moto import Moto
from .netns import Node
from .pods import Pods
from .upstream import FakeUpstream
from .util import tail


class Bench(contextlib.ExitStack):
    """Everything a test needs, built in order and closed in reverse (also on failure).

    pod_roles: [{"namespace", "name"?, "role"}] for iamlinkd's config; every role named there is
    created in moto. start_daemon=False leaves iamlinkd stopped (bootstrap tests).
    pods_options: passed to Pods (subnet, range_start, range_end, with_iamlink, netconf).
    daemon_sts: [sts] keys for iamlinkd (e.g. an endpoint other than moto's).
    associations: [{"namespace", "service_account", "role"}] for iamlinkd's config (roles created in moto).
    kubernetes: a dict of [kubernetes] keys: an emulated API server (`bench.kube`, a KubeApi) is made
    before iamlinkd, which reads it through a kubeconfig; kube_api_up=False leaves it stopped.
    """

    def __init__(self, pod_roles=(), default_role=None, start_daemon=True, daemon_settings=None,
                 pods_options=None, with_daemon=True, daemon_sts=None, associations=(), kubernetes=None,
                 kube_api_up=True):
        super().__init__()
        self.pod_roles = list(pod_roles)
        self.default_role = default_role
        self.start_daemon = start_daemon
        self.daemon_settings = daemon_settings
        self.pods_options = pods_options or {}
        self.with_daemon = with_daemon
        self.daemon_sts = daemon_sts
        self.associations = list(associations)
        self.kubernetes = kubernetes
        self.kube_api_up = kube_api_up
        self.kube = None
        # (label, path) of logs of parts a test adds to the bench (containerd), for failure reports.
        self.extra_logs = []
        self.node = self.moto = self.upstream = self.daemon = self.pods = None

    def __enter__(self):
        super().__enter__()
        try:
            self.node = self.enter_context(Node())
            self.store_dir = os.path.join(self.node.workdir, "store")
            os.makedirs(self.store_dir, exist_ok=True)
            self.moto = Moto(self.node)
            self.callback(self.moto.stop)
            named = {e["role"] for e in self.pod_roles + self.associations}
            for role in sorted(named | ({self.default_role} - {None})):
                self.moto.create_role(role)
            self.upstream = FakeUpstream(self.node, self.moto)
            self.callback(self.upstream.stop)
            settings = dict(self.daemon_settings or {})
            if self.kubernetes is not None:
                self.kube = KubeApi(self.node, start=self.kube_api_up)
                self.callback(self.kube.stop)
                settings["kubernetes"] = {"kubeconfig": self.kube.kubeconfig_path, **self.kubernetes}
            if self.with_daemon:
                self.daemon = Daemon(self.node, self.moto, self.store_dir, self.pod_roles,
                                     default_role=self.default_role, settings=settings,
                                     sts=self.daemon_sts, associations=self.associations)
                self.callback(self.daemon.stop)
                if self.start_daemon:
                    self.daemon.start()
            self.pods = Pods(self.node, self.store_dir, **self.pods_options)
            self.callback(self.pods.close)
        except BaseException:
            self.close()
            raise
        return self

    def logs(self, lines=60):
        """Tails of every log of the bench, for failure reports."""
        if self.node is None:
            return ""
        parts = []
        for label, path in (("iamlinkd", self.daemon.log_path if self.daemon else None),
                            ("iamlink CNI plugin", self.pods.plugin_log if self.pods else None),
                            ("moto", self.moto.log_path if self.moto else None),
                            ("fake upstream requests", self.upstream.log_path if self.upstream else None),
                            ("emulated Kubernetes API", self.kube.stderr_path if self.kube else None),
                            *self.extra_logs):
            if path and os.path.exists(path):
                parts.append(f"==== {label} ({path}) ====\n{tail(path, lines)}")
        return "\n".join(parts)

"""The node: a network namespace of our own that stands in for a Kubernetes node.

Nothing here touches the root network namespace. Processes run in our namespaces through
`ip netns exec`; the harness's own sockets to the node (boto3 to moto, readiness probes) are made
by one worker thread that has entered the node namespace with setns(2) — network namespaces are
per thread, so the rest of the process stays where it was.
"""

import atexit
import ctypes
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading

from .util import BASE_PATH, run, stop_process

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/var/run/netns"

_libc = ctypes.CDLL(None, use_errno=True)
_live_nodes = set()
_live_lock = threading.Lock()
_signals_installed = False


def _close_live_nodes():
    with _live_lock:
        nodes = list(_live_nodes)
    for node in nodes:
        node.close()


def _exit_on_signal(signum, frame):
    # Turn SIGTERM/SIGHUP into SystemExit so that finally blocks and atexit clean up.
    raise SystemExit(128 + signum)


def _install_cleanup_hooks():
    global _signals_installed
    if _signals_installed:
        return
    _signals_installed = True
    atexit.register(_close_live_nodes)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) in (signal.SIG_DFL, None):
                signal.signal(sig, _exit_on_signal)


def _enter_netns(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)
    # Refuse to go on unless this thread really is in the namespace we made.
    if os.stat("/proc/thread-self/ns/net").st_ino != os.stat(path).st_ino:
        raise RuntimeError(f"thread did not enter {path}")


def netns_path(name):
    return os.path.join(NETNS_DIR, name)


class Node:
    """A node network namespace `iamlink-node-<random>` with the bench's addresses on lo.

    Owns everything made in it: pod namespaces (`new_netns`), processes (`spawn`) and a work
    directory. `close()` removes all of it; it runs on context exit, at interpreter exit and on
    SIGTERM/SIGHUP, and is idempotent.
    """

    # iamlinkd, moto (STS), the emulated Kubernetes API (kube_api.py). The fake metadata service has
    # a namespace of its own (upstream.py).
    LO_ADDRESSES = ("198.18.0.1/32", "198.18.0.2/32", "198.18.0.5/32")

    def __init__(self, prefix="iamlink-node", keep_workdir=None):
        _install_cleanup_hooks()
        self.name = f"{prefix}-{secrets.token_hex(4)}"
        self.path = netns_path(self.name)
        self.workdir = tempfile.mkdtemp(prefix=f"{self.name}-")
        self.keep_workdir = (
            keep_workdir if keep_workdir is not None else os.environ.get("IAMLINK_KEEP_WORKDIR") == "1"
        )
        self._procs = []
        self._netns = []  # pod namespaces, in creation order
        self._closed = False
        self._lock = threading.Lock()
        self._threads = None
        with _live_lock:
            _live_nodes.add(self)
        try:
            run(["ip", "netns", "add", self.name])
            self.exec(["ip", "link", "set", "lo", "up"])
            for addr in self.LO_ADDRESSES:
                self.exec(["ip", "addr", "add", addr, "dev", "lo"])
            from .netns_threads import NetnsThreads  # it builds on this module

            self._threads = NetnsThreads(self.name)  # fails now if the worker cannot enter the namespace
        except BaseException:
            self.close()
            raise

    # -- context manager ------------------------------------------------------------------
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- running things in the node -------------------------------------------------------
    def call(self, fn, *args, timeout=120, **kwargs):
        """Run fn(*args, **kwargs) on the worker thread that lives in the node namespace."""
        if self._closed or self._threads is None:
            raise RuntimeError(f"node {self.name} is closed")
        return self._threads.call(fn, *args, timeout=timeout, **kwargs)

    def can_connect(self, host, port, timeout=0.5):
        """True when a TCP connection to host:port from inside the node succeeds."""

        def probe():
            try:
                with socket.create_connection((host, port), timeout=timeout):
                    return True
            except OSError:
                return False

        return self.call(probe)

    def exec(self, argv, netns=None, env=None, timeout=60, check=True, input=None):
        """Run argv to completion in the node (or the given) namespace; returns CompletedProcess."""
        ns = netns or self.name
        return run(["ip", "netns", "exec", ns] + list(argv), timeout=timeout, check=check,
                   env=env if env is not None else {"PATH": BASE_PATH, "LANG": "C.UTF-8"}, input=input)

    def spawn(self, argv, netns=None, env=None, stdout=None, stderr=None, stdin=subprocess.DEVNULL):
        """Start argv in the node (or the given) namespace, tracked so that close() ends it.

        `ip netns exec` execs the command, so the Popen pid is the command itself; it leads its
        own process group so that a stop reaches its children too.
        """
        ns = netns or self.name
        with self._lock:
            if self._closed:
                raise RuntimeError(f"node {self.name} is closed")
            proc = subprocess.Popen(
                ["ip", "netns", "exec", ns] + list(argv),
                env=env if env is not None else {"PATH": BASE_PATH, "LANG": "C.UTF-8"},
                stdin=stdin, stdout=stdout, stderr=stderr, start_new_session=True,
            )
            self._procs.append(proc)
        return proc

    def forget(self, proc):
        with self._lock:
            if proc in self._procs:
                self._procs.remove(proc)

    def ip_rules(self, prefs):
        """The node's routing-policy rules (both families) at the given preferences, as `ip rule` prints them."""
        lines = []
        for family in ("-4", "-6"):
            out = self.exec(["ip", family, "rule", "show"]).stdout
            lines += [line.strip() for line in out.splitlines() if line.split(":")[0].strip() in map(str, prefs)]
        return lines

    def delete_ip_rules(self, prefs):
        """Deletes every rule at the given preferences, both families (bounded: 16 per preference)."""
        for family in ("-4", "-6"):
            for pref in prefs:
                for _ in range(16):
                    if self.exec(["ip", family, "rule", "del", "pref", str(pref)], check=False).returncode != 0:
                        break

    # -- pod namespaces -------------------------------------------------------------------
    def new_netns(self, prefix="iamlink-pod"):
        name = f"{prefix}-{secrets.token_hex(4)}"
        with self._lock:
            if self._closed:
                raise RuntimeError(f"node {self.name} is closed")
            self._netns.append(name)
        run(["ip", "netns", "add", name])
        return name

    def delete_netns(self, name):
        self._kill_netns_pids(name)
        if os.path.exists(netns_path(name)):
            run(["ip", "netns", "del", name], check=False)
        with self._lock:
            if name in self._netns:
                self._netns.remove(name)

    @staticmethod
    def _kill_netns_pids(name):
        if not os.path.exists(netns_path(name)):
            return
        p = run(["ip", "netns", "pids", name], check=False)
        for pid in p.stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass

    # -- teardown -------------------------------------------------------------------------
    def close(self):
        with self._lock:
            if self._closed:
                return
            self._closed = True
            procs, self._procs = list(self._procs), []
            namespaces, self._netns = list(self._netns), []
        errors = []
        for proc in reversed(procs):
            try:
                stop_process(proc, timeout=5)
            except Exception as e:
                errors.append(e)
        if self._threads is not None:
            self._threads.close()
        for ns in reversed(namespaces):
            try:
                self._kill_netns_pids(ns)
                if os.path.exists(netns_path(ns)):
                    run(["ip", "netns", "del", ns])
            except Exception as e:
                errors.append(e)
        try:
            self._kill_netns_pids(self.name)
            if os.path.exists(self.path):
                run(["ip", "netns", "del", self.name])
        except Exception as e:
            errors.append(e)
        if not self.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        with _live_lock:
            _live_nodes.discard(self)
        if errors:
            raise RuntimeError(f"cleanup of {self.name} had errors: {errors}")

"""The benchmark's node: the e2e harness's node namespace, moto, iamlinkd, plus what only the
benchmark needs: the counting STS proxy, the bare baseline server, two CNI chains (with and
without iamlink) and cnibench, the in-process libcni driver.

Addresses (node namespace lo, all in 198.18.0.0/15 but 169.254.169.254 as in the harness):
  198.18.0.1:8181  iamlinkd            198.18.0.2:5000  moto
  198.18.0.3:8182  bare_server         198.18.0.4:5000  STS counting proxy (iamlinkd's sts.endpoint)
  198.18.0.254:80  DNATed to the bare server by the table `inet iamlink_bench` (see latency.py)
Pods: iamlink chain 198.18.64.0/23, plain chain 198.18.66.0/23, iamlink chain without
waitForCredentials 198.18.68.0/23; all route 198.18.0.0/24 to the node. Nothing here touches
the root network namespace.
"""

import contextlib
import http.client
import io
import ipaddress
import json
import os
import queue
import resource
import shutil
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

# role_arn: the parts match STS calls against the ARNs the bench's daemon assumes.
from harness import Daemon, FakeUpstream, Moto, Node, role_arn  # noqa: E402,F401
from harness.util import BASE_PATH, PYTHON, REFERENCE_PLUGINS, RELEASE, REPO, stop_process, tail, wait_until  # noqa: E402

CNIBENCH = os.path.join(REPO, ".build", "bin", "cnibench")
# The iamlinkd and iamlink binaries under test (default: this tree's release build). Pointing it at
# another build measures a candidate change with the same bench.
UNDER_TEST = os.environ.get("IAMLINK_BENCH_RELEASE") or RELEASE
BARE_SERVER = os.path.join(UNDER_TEST, "examples", "bare_server")
STS_PROXY = os.path.join(HERE, "sts_proxy.py")

PROXY_HOST, PROXY_PORT = "198.18.0.4", 5000
BARE_HOST, BARE_PORT = "198.18.0.3", 8182
BARE_VIP = "198.18.0.254"
EXTRA_LO = ("198.18.0.3/32", "198.18.0.4/32")




class CnibenchError(RuntimeError):
    pass


class Interactive:
    """A running cnibench whose stdout lines are read as they come (burst, hold)."""

    def __init__(self, node, proc, prefix):
        self.node, self.proc, self.prefix = node, proc, prefix
        self.lines = queue.Queue()
        self.stderr = []
        threading.Thread(target=self._read, args=(proc.stdout, self.lines), daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()

    @staticmethod
    def _read(f, q):
        for line in f:
            q.put(line)
        q.put(None)

    def _read_err(self):
        for line in self.proc.stderr:
            self.stderr.append(line)

    def send(self, line):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def next(self, timeout):
        """The next JSON line; raises on EOF, timeout or an error line."""
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise CnibenchError(f"cnibench said nothing for {timeout}s; stderr: {''.join(self.stderr)[-2000:]}")
        if line is None:
            self.proc.wait(timeout=10)
            raise CnibenchError(f"cnibench exited {self.proc.returncode}: {''.join(self.stderr)[-2000:]}")
        out = json.loads(line)
        if "error" in out:
            raise CnibenchError(f"cnibench: {out['error']}")
        return out

    def finish(self, timeout):
        """Closes stdin and returns the final JSON line."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        last = None
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise CnibenchError("cnibench did not finish in time")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                break
            last = line
        self.proc.wait(timeout=30)
        if self.proc.returncode != 0 or last is None:
            raise CnibenchError(f"cnibench exited {self.proc.returncode}: {''.join(self.stderr)[-2000:]}")
        return json.loads(last)

    def close(self):
        if self.proc.poll() is None:
            stop_process(self.proc, timeout=60)
        self.node.forget(self.proc)
        self.node.remove_pod_netns(self.prefix)


class BenchNode(contextlib.ExitStack):
    """Node → moto → fake upstream → STS proxy → iamlinkd, closed in reverse (also on failure).

    `pod_roles` as in the harness's Daemon; `roles` every role to create in moto.
    """

    def __init__(self, pod_roles, roles, daemon_log=None):
        super().__init__()
        self.pod_roles = pod_roles
        self.roles = roles
        self.daemon_log = daemon_log
        self.runs = 0

    def __enter__(self):
        super().__enter__()
        try:
            # Children (iamlinkd) inherit this: 1,000 concurrent connections need the fds.
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
            self.node = self.enter_context(Node(prefix="iamlink-node"))
            self.node.remove_pod_netns = self.remove_pod_netns
            # Whatever cnibench runs leave behind (only after a SIGKILL), removed with the node.
            self.callback(self.remove_pod_netns, f"iamlink-pod-{self.node.name.rsplit('-', 1)[1]}")
            for addr in EXTRA_LO:
                self.node.exec(["ip", "addr", "add", addr, "dev", "lo"])
            # The store on tmpfs, as /run/iamlink is on a node (the work directory is on disk).
            self.store_dir = f"/dev/shm/{self.node.name}-store"
            os.makedirs(self.store_dir, mode=0o700)
            self.callback(shutil.rmtree, self.store_dir, True)
            self.moto = Moto(self.node)
            self.callback(self.moto.stop)
            for role in self.roles:
                self.moto.create_role(role)
            # The binaries under test, copied once: a rebuild of target/release during the run (the
            # tree is shared) must not change what is measured, and perf resolves symbols from them.
            self.bin_dir = os.path.join(self.node.workdir, "bin")
            os.makedirs(self.bin_dir)
            for src in (os.path.join(UNDER_TEST, "iamlinkd"), os.path.join(UNDER_TEST, "iamlink"), BARE_SERVER):
                shutil.copy2(src, self.bin_dir)
            self.bare_server = os.path.join(self.bin_dir, os.path.basename(BARE_SERVER))
            self.upstream = FakeUpstream(self.node, self.moto)
            self.callback(self.upstream.stop)
            self._start_proxy()
            self.daemon = BenchDaemon(self.node, self.moto, self.store_dir, self.pod_roles, self.daemon_log,
                                      binary=os.path.join(self.bin_dir, "iamlinkd"))
            self.callback(self.daemon.stop)
            self.daemon.start()
            self.cni_dir = os.path.join(self.node.workdir, "cni")
            os.makedirs(os.path.join(self.cni_dir, "cache"), exist_ok=True)
            self.plugin_log = os.path.join(self.node.workdir, "iamlink-cni.log")
            self.conflists = {
                "iamlink": self._conflist("iamlink", "198.18.64.0/23", with_iamlink=True),
                "plain": self._conflist("plain", "198.18.66.0/23", with_iamlink=False),
                # ADD returns without waiting for the pod's credentials (part 4 holds STS closed).
                "iamlink-nowait": self._conflist("iamlink-nowait", "198.18.68.0/23", with_iamlink=True,
                                                 netconf={"waitForCredentials": "0s"}),
            }
        except BaseException:
            self.close()
            raise
        return self

    # -- pieces ------------------------------------------------------------------------------
    def _start_proxy(self):
        log = open(os.path.join(self.node.workdir, "sts-proxy.log"), "ab")
        self.proxy = self.node.spawn([PYTHON, STS_PROXY, "--listen", f"{PROXY_HOST}:{PROXY_PORT}",
                                      "--upstream", f"{self.moto.HOST}:{self.moto.PORT}"],
                                     stdout=log, stderr=log)
        log.close()
        self.callback(self._stop_proxy)
        wait_until(lambda: self.node.can_connect(PROXY_HOST, PROXY_PORT), 20, "STS proxy listening")

    def _stop_proxy(self):
        stop_process(self.proxy, timeout=5)
        self.node.forget(self.proxy)

    def _conflist(self, name, subnet, with_iamlink, netconf=None):
        net = ipaddress.ip_network(subnet)
        plugins = [{
            "type": "ptp", "ipMasq": False,
            "ipam": {"type": "host-local",
                     "ranges": [[{"subnet": subnet, "gateway": str(net.network_address + 1)}]],
                     "dataDir": os.path.join(self.cni_dir, f"ipam-{name}"),
                     "routes": [{"dst": "198.18.0.0/24"}]},
        }]
        if with_iamlink:
            plugins.append({"type": "iamlink", "daemonAddress": f"{Daemon.LISTEN_HOST}:{Daemon.LISTEN_PORT}",
                            "storeDir": self.store_dir, "logFile": self.plugin_log,
                            **(netconf or {})})
        path = os.path.join(self.cni_dir, f"{name}.conflist")
        with open(path, "w") as f:
            json.dump({"cniVersion": "1.0.0", "name": f"bench-{name}", "plugins": plugins}, f, indent=2)
        return path

    # -- cnibench ----------------------------------------------------------------------------
    def _argv(self, mode, args, prefix):
        return [CNIBENCH, mode, "--bin-dir", f"{REFERENCE_PLUGINS}:{self.bin_dir}",
                "--cache-dir", os.path.join(self.cni_dir, "cache"), "--netns-prefix", prefix,
                "--mount-ns", f"/proc/{os.getpid()}/ns/mnt"] + [str(a) for a in args]

    def _prefix(self, mode):
        self.runs += 1
        return f"iamlink-pod-{self.node.name.rsplit('-', 1)[1]}-{mode}{self.runs}"

    def cnibench(self, mode, args, timeout, env=None):
        """Runs cnibench to completion in the node; returns its final JSON."""
        prefix = self._prefix(mode)
        proc = self.node.spawn(self._argv(mode, args, prefix), env=env or self.env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise CnibenchError(f"cnibench {mode} ran longer than {timeout}s")
        finally:
            if proc.poll() is None:  # timed out, or we are being interrupted: let it clean up
                stop_process(proc, timeout=60)
            self.node.forget(proc)
            self.remove_pod_netns(prefix)
        lines = out.decode().strip().splitlines()
        if proc.returncode != 0 or not lines:
            raise CnibenchError(f"cnibench {mode} exited {proc.returncode}: {err.decode()[-3000:]}")
        return json.loads(lines[-1])

    def cnibench_interactive(self, mode, args):
        prefix = self._prefix(mode)
        proc = self.node.spawn(self._argv(mode, args, prefix), env=self.env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.PIPE)
        proc.stdout = io.TextIOWrapper(proc.stdout, encoding="utf-8")
        proc.stderr = io.TextIOWrapper(proc.stderr, encoding="utf-8", errors="replace")
        proc.stdin = io.TextIOWrapper(proc.stdin, encoding="utf-8", write_through=True)
        return Interactive(self.node, proc, prefix)

    def env(self, extra=None):
        env = {"PATH": BASE_PATH, "LANG": "C.UTF-8", "HOME": self.node.workdir}
        env.update(extra or {})
        return env

    @staticmethod
    def remove_pod_netns(prefix):
        """Removes pod namespaces cnibench left behind (only after a SIGKILL or a crash)."""
        try:
            names = [n for n in os.listdir("/var/run/netns") if n.startswith(prefix + "-")]
        except FileNotFoundError:
            return
        for n in names[:5000]:
            subprocess.run(["ip", "netns", "del", n], capture_output=True, timeout=30)

    # -- STS proxy ---------------------------------------------------------------------------
    def _proxy_req(self, method, path):
        def call():
            c = http.client.HTTPConnection(PROXY_HOST, PROXY_PORT, timeout=10)
            try:
                c.request(method, path)
                r = c.getresponse()
                return json.loads(r.read())
            finally:
                c.close()
        return self.node.call(call)

    def sts_calls(self):
        return self._proxy_req("GET", "/__bench/calls")["calls"]

    def sts_gate(self, open_):
        return self._proxy_req("POST", f"/__bench/gate?open={1 if open_ else 0}")

    def sts_reset(self):
        return self._proxy_req("POST", "/__bench/reset")

    def wait_sts_answers(self, n, timeout, what):
        """Waits until the proxy has seen n answered AssumeRole calls; returns the calls."""
        def done():
            calls = self.sts_calls()
            return calls if sum(1 for c in calls if "answered" in c) >= n else None
        return wait_until(done, timeout, what, interval=0.2)

    # -- logs --------------------------------------------------------------------------------
    def logs(self, lines=40):
        parts = []
        for label, path in (("iamlinkd", self.daemon.log_path), ("iamlink CNI plugin", self.plugin_log),
                            ("moto", self.moto.log_path),
                            ("sts proxy", os.path.join(self.node.workdir, "sts-proxy.log"))):
            if path and os.path.exists(path):
                parts.append(f"==== {label} ({path}) ====\n{tail(path, lines)}")
        return "\n".join(parts)


class BenchDaemon(Daemon):
    """The harness's iamlinkd with STS through the counting proxy, a chosen log level and,
    when `limits` is set, that `[limits]` table (else iamlinkd's defaults)."""

    def __init__(self, node, moto, store_dir, pod_roles, log_level=None, binary=None):
        super().__init__(node, moto, store_dir, pod_roles, sts={"endpoint": f"http://{PROXY_HOST}:{PROXY_PORT}"},
                         binary=binary or os.path.join(UNDER_TEST, "iamlinkd"))
        self.log_level = log_level
        self.limits = None

    def write_config(self):
        text = super().write_config()
        if self.limits:
            text += "\n[limits]\n" + "".join(f"{k} = {v}\n" for k, v in self.limits.items())
            with open(self.config_path, "w") as f:
                f.write(text)
        return text

    def environment(self):
        env = super().environment()
        if self.log_level:  # unset: iamlinkd's own default (info: one line per credential answer or refusal)
            env["IAMLINKD_LOG"] = self.log_level
        return env

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def status(self):
        """VmRSS, VmHWM, threads of the running iamlinkd, from /proc/<pid>/status (kB)."""
        out = {}
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "Threads"):
                    out[k] = int(v.split()[0])
        return out

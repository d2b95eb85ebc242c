"""Pods made through the real CNI chain (ptp + host-local, then iamlink) driven by cnirt/libcni."""

import ipaddress
import json
import os
import secrets
import subprocess
import uuid

from .netns import netns_path
from .util import (python_plugin_bin, AWS_VPC_CNI_SHAPED, BASE_PATH, CNIRT, IAMLINK_PLUGIN, IMDS_CLIENT, PYTHON, REFERENCE_PLUGINS,
                   RELEASE, tool)

NETWORK = "iamlink-test"


def pod_env(home, extra=None):
    """A clean environment for AWS clients in a pod: no credentials anywhere but the metadata
    service (no AWS_* keys, config and credentials files that don't exist), region us-east-1."""
    env = {
        "PATH": BASE_PATH,
        "LANG": "C.UTF-8",
        "HOME": home,
        "PYTHONDONTWRITEBYTECODE": "1",
        "AWS_CONFIG_FILE": "/nonexistent/iamlink-pod/aws-config",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/iamlink-pod/aws-credentials",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    env.update(extra or {})
    return env


class CniError(RuntimeError):
    def __init__(self, cmd, pod, proc):
        self.proc = proc
        super().__init__(f"cnirt {cmd} for {pod} exited {proc.returncode}\n"
                         f"stdout: {proc.stdout.strip()}\nstderr: {proc.stderr.strip()}")


class Pod:
    def __init__(self, pods, namespace, name, uid, cid, netns, annotations=None):
        self.pods = pods
        self.annotations = annotations
        self.node = pods.node
        self.namespace = namespace
        self.name = name
        self.uid = uid
        self.cid = cid
        self.netns = netns
        self.netns_path = netns_path(netns)
        self.result = None
        self.ip = None
        self.host_ifname = None
        self.deleted = False

    def __repr__(self):
        return f"Pod({self.namespace}/{self.name} ip={self.ip} if={self.host_ifname} netns={self.netns})"

    @property
    def key(self):
        return f"{self.namespace}/{self.name}"

    def cni_args(self):
        return (f"IgnoreUnknown=1;K8S_POD_NAMESPACE={self.namespace};K8S_POD_NAME={self.name};"
                f"K8S_POD_INFRA_CONTAINER_ID={self.cid};K8S_POD_UID={self.uid}")

    def env(self, extra=None):
        return pod_env(self.pods.home, extra)

    def exec(self, argv, env=None, timeout=60, input=None):
        """Run argv in the pod's namespace with the clean AWS environment (plus `env`)."""
        return subprocess.run(["ip", "netns", "exec", self.netns] + list(argv), env=self.env(env),
                              capture_output=True, text=True, timeout=timeout, input=input)

    def spawn(self, argv, env=None, stdout=subprocess.PIPE, stderr=subprocess.PIPE):
        """Start argv in the pod's namespace; the node ends it on close."""
        return self.node.spawn(argv, netns=self.netns, env=self.env(env), stdout=stdout, stderr=stderr)

    # -- clients ----------------------------------------------------------------------------
    def aws(self, *args, timeout=60):
        """The unmodified AWS CLI in the pod, against moto."""
        return self.exec([tool("aws")] + list(args), timeout=timeout)

    def caller_arn(self, timeout=60):
        """(returncode, stdout, stderr) of `aws sts get-caller-identity --query Arn`."""
        p = self.aws("sts", "get-caller-identity", "--endpoint-url", "http://198.18.0.2:5000",
                     "--query", "Arn", "--output", "text", timeout=timeout)
        return p.returncode, p.stdout.strip(), p.stderr.strip()

    def imds(self, *args, timeout=60):
        """Run imds_client.py in the pod; returns its JSON answer."""
        p = self.exec([PYTHON, IMDS_CLIENT] + [str(a) for a in args], timeout=timeout)
        if p.returncode != 0:
            raise RuntimeError(f"imds_client {args} in {self} exited {p.returncode}: {p.stderr.strip()}")
        return json.loads(p.stdout)


class Pods:
    """Creates and deletes pods in the node through `cnirt` and a conflist of the bench's.

    `subnet`, `range_start`, `range_end` set host-local's range (the churn test uses a tiny one so
    addresses are reused at once); `subnet6` adds an IPv6 range (dual-stack pods). `with_iamlink=False` gives a ptp-only chain (bench self-tests).
    `chain="aws-vpc-cni"` puts aws_vpc_cni_shaped.py (host interfaces named after the pod, a
    leftover of that name deleted by the next ADD, aws-vpc-cni's 0.4.0 result) where ptp is, with
    the same host-local range.
    """

    def __init__(self, node, store_dir, subnet="198.18.64.0/24", range_start=None, range_end=None,
                 gateway=None, with_iamlink=True, daemon_address="198.18.0.1:8181", netconf=None, subnet6=None,
                 cnirt=CNIRT, bin_dirs=(REFERENCE_PLUGINS, RELEASE), chain="ptp"):
        self.node = node
        self.store_dir = store_dir
        self.cnirt = cnirt
        self.dir = os.path.join(node.workdir, "cni")
        if chain == "aws-vpc-cni":
            bin_dirs = tuple(bin_dirs) + (self._aws_vpc_cni_shaped_bin(),)
        elif chain != "ptp":
            raise ValueError(f"unknown chain {chain!r}")
        self.bin_dirs = ":".join(bin_dirs)
        self.cache_dir = os.path.join(self.dir, "cache")
        self.home = os.path.join(node.workdir, "pod-home")
        self.plugin_log = os.path.join(node.workdir, "iamlink-cni.log")
        os.makedirs(self.cache_dir, exist_ok=True)
        os.makedirs(self.home, exist_ok=True)
        os.makedirs(store_dir, exist_ok=True)
        net = ipaddress.ip_network(subnet)
        rng = {"subnet": str(net)}
        if range_start:
            rng["rangeStart"] = range_start
        if range_end:
            rng["rangeEnd"] = range_end
        rng["gateway"] = gateway or str(net.network_address + 1)
        self.gateway = rng["gateway"]
        ipam = {"type": "host-local", "ranges": [[rng]] + ([[{"subnet": subnet6}]] if subnet6 else []),
                "dataDir": os.path.join(self.dir, "ipam"),
                "routes": [{"dst": "198.18.0.0/24"}]}
        if chain == "ptp":
            plugins = [{"type": "ptp", "ipMasq": False, "ipam": ipam}]
        else:
            plugins = [{"type": "aws-vpc-cni-shaped", "ipam": ipam, "stateDir": os.path.join(self.dir, "aws-vpc-cni")}]
        if with_iamlink:
            # The capability makes libcni (as containerd) pass the pod's annotations in runtimeConfig.
            iamlink = {"type": "iamlink", "daemonAddress": daemon_address, "storeDir": store_dir,
                       "logFile": self.plugin_log, "capabilities": {"io.kubernetes.cri.pod-annotations": True}}
            iamlink.update(netconf or {})
            plugins.append(iamlink)
        # aws-vpc-cni's conflist is at 0.4.0 (REFERENCE.md), ours at 1.0.0.
        version = "1.0.0" if chain == "ptp" else "0.4.0"
        self.conflist = {"cniVersion": version, "name": NETWORK, "plugins": plugins}
        self.conflist_path = os.path.join(self.dir, "10-iamlink-test.conflist")
        self._write_conflist()
        self.live = []

    def _write_conflist(self):
        with open(self.conflist_path, "w") as f:
            json.dump(self.conflist, f, indent=2)

    def set_netconf(self, **keys):
        """Changes iamlink's entry in the conflist, as `iamlinkd install-cni` would on a node."""
        self.conflist["plugins"][-1].update(keys)
        self._write_conflist()

    def _aws_vpc_cni_shaped_bin(self):
        """A bin dir holding the plugin `aws-vpc-cni-shaped` (aws_vpc_cni_shaped.py run by this Python)."""
        return python_plugin_bin(os.path.join(self.dir, "bin"), "aws-vpc-cni-shaped", AWS_VPC_CNI_SHAPED)

    def cnirt_run(self, cmd, pod, netns=None, extra=(), timeout=60, conflist=None):
        """Run `cnirt cmd` for pod inside the node; netns defaults to the pod's (use "" for none)."""
        if not os.access(self.cnirt, os.X_OK):
            raise FileNotFoundError(f"{self.cnirt} is not built: run scripts/setup")
        argv = [self.cnirt, cmd, "--conflist", conflist or self.conflist_path, "--bin-dir", self.bin_dirs,
                "--netns", pod.netns_path if netns is None else netns, "--cid", pod.cid,
                "--ifname", "eth0", "--args", pod.cni_args(), "--cache-dir", self.cache_dir] + list(extra)
        if pod.annotations is not None:
            argv += ["--pod-annotations", json.dumps(pod.annotations)]
        return self.node.exec(argv, timeout=timeout, check=False)

    def add(self, namespace, name, uid=None, cid=None, annotations=None):
        """ip netns add + CNI ADD; returns the Pod (its IP and host interface from the result).
        `annotations`: the pod's annotations, passed by the runtime as containerd does; None: the
        runtime passes none (like a runtime without the capability)."""
        netns = self.node.new_netns()
        pod = Pod(self, namespace, name, uid or str(uuid.uuid4()), cid or secrets.token_hex(32), netns,
                  annotations=annotations)
        p = self.cnirt_run("add", pod)
        if p.returncode != 0:
            self.node.delete_netns(netns)
            raise CniError("add", pod, p)
        pod.result = json.loads(p.stdout)
        pod.ip = pod.result["ips"][0]["address"].split("/")[0]
        hosts = [i["name"] for i in pod.result.get("interfaces", []) if not i.get("sandbox")]
        pod.host_ifname = hosts[0] if hosts else None
        self.live.append(pod)
        return pod

    def delete(self, pod, remove_netns=True):
        """CNI DEL (with the pod's netns and libcni's cached result), then remove the netns."""
        if not pod.deleted:
            p = self.cnirt_run("del", pod)
            if p.returncode != 0:
                raise CniError("del", pod, p)
            pod.deleted = True
            if pod in self.live:
                self.live.remove(pod)
        if remove_netns:
            self.node.delete_netns(pod.netns)

    def del_iamlink_only(self, pod):
        """The DEL of the chain's last plugin (iamlink) alone, with libcni's cached result: what
        a node has between iamlink's DEL and the first plugin's (libcni runs DEL in reverse order,
        and containerd retries a DEL whose first plugin failed), when the pod's interface is still
        up. A later `delete` finishes the chain's DEL. Returns the run."""
        only = dict(self.conflist, plugins=[p for p in self.conflist["plugins"] if p["type"] == "iamlink"])
        path = os.path.join(self.dir, "iamlink-only.conflist")
        with open(path, "w") as f:
            json.dump(only, f, indent=2)
        return self.cnirt_run("del", pod, conflist=path)

    def add_iamlink_again(self, pod, command="ADD"):
        """The runtime's repeated ADD as iamlink sees it: its own conflist entry, the pod's
        result as prevResult (the plugins before it are not run again: they would refuse an
        interface that exists). Returns the run. `command="CHECK"`: iamlink's CHECK alone."""
        entry = next(p for p in self.conflist["plugins"] if p["type"] == "iamlink")
        conf = dict(entry, cniVersion=self.conflist["cniVersion"], name=NETWORK, prevResult=pod.result)
        env = {"PATH": BASE_PATH, "LANG": "C.UTF-8", "CNI_COMMAND": command, "CNI_CONTAINERID": pod.cid,
               "CNI_NETNS": pod.netns_path, "CNI_IFNAME": "eth0", "CNI_ARGS": pod.cni_args(),
               "CNI_PATH": self.bin_dirs}
        return self.node.exec([IAMLINK_PLUGIN], env=env, input=json.dumps(conf), check=False)

    def del_again(self, pod):
        """containerd's RemovePodSandbox DEL: empty CNI_NETNS and no prevResult. Returns the run."""
        return self.cnirt_run("del", pod, netns="", extra=["--no-cache"])

    def close(self):
        errors = []
        for pod in list(self.live):
            try:
                self.delete(pod)
            except Exception as e:
                errors.append(e)
                self.node.delete_netns(pod.netns)
        if errors:
            raise RuntimeError(f"pod teardown had errors: {errors}")

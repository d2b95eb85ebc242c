"""The DaemonSet of deploy/, as the chart renders it, run through containerd's CRI the way a kubelet
runs its pod on a node: one host-network sandbox, the init containers in order (each to exit 0),
then iamlinkd.

Everything comes from the rendered YAML (`helm template` of deploy/helm/iamlink with the default
values, checked to be the DaemonSet of deploy/kubernetes too): command and args, env (fieldRef
spec.nodeName is the test node's name, status.hostIP its address), securityContext (privileged, capabilities add/drop,
readOnlyRootFilesystem, runAsUser, allowPrivilegeEscalation → no_new_privs, seccompProfile),
resources (as the kubelet turns them into cgroup limits), volumeMounts of the hostPath volumes, the
ConfigMap (its data written to a directory, mounted read-only as the kubelet does) and the memory
emptyDir, probes and ports. A key the translation does not know fails (`Untranslated`): a manifest
change cannot go untested without someone deciding what it means here.

What the test changes, each in one place below and nowhere else:
- HOST_PATHS: the node's host paths are the test node's private directories;
- CONFIG_OVERRIDES: the ConfigMap's STS endpoint (moto), the pod roles' base ARN (the README's
  "Before you apply" value) and the Kubernetes API (the emulated one, through a kubeconfig added
  to the ConfigMap's data: there is no service-account token to mount);
- DAEMON_ENV: iamlinkd's own AWS identity (moto's test keys instead of the node's instance role).
"""

import http.client
import json
import os
import tomllib
import uuid

import pytest
import yaml

from .containerd import Containerd, missing_prerequisites as containerd_missing
from .moto import BASE_ARN, TEST_KEYS
from .util import REPO, run, tail, wait_until

CHART = os.path.join(REPO, "deploy", "helm", "iamlink")
MANIFEST = os.path.join(REPO, "deploy", "kubernetes", "daemonset.yaml")
HELM = os.path.join(REPO, ".build", "bin", "helm")  # where scripts/setup puts it (deploy/check's tool location)
# scripts/build-image's archive; IAMLINK_IMAGE_ARCHIVE names another (one built from a branch's binaries:
# `scripts/build-image target/image/iamlink.oci.tar`), so the shared one is never overwritten.
IMAGE_ARCHIVE = os.environ.get("IAMLINK_IMAGE_ARCHIVE") or os.path.join(REPO, ".build", "image", "iamlink.oci.tar")
NAMESPACE = "iamlink-system"
NODE_IP = "198.18.0.1"  # the node's address (on its lo): where a kubelet's probes reach a hostNetwork pod


# The downward API's fields the translation knows, each as the test node's (and pod's) value.
FIELD_VALUES = {"spec.nodeName": lambda node_name, pod_name: node_name,
                "status.hostIP": lambda node_name, pod_name: NODE_IP,
                "metadata.name": lambda node_name, pod_name: pod_name,
                "metadata.namespace": lambda node_name, pod_name: NAMESPACE}


def _field_path(env):
    return env.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")


class Untranslated(AssertionError):
    """The manifest says something this translation does not know how to run."""


def missing_prerequisites():
    return [p for p in (HELM, IMAGE_ARCHIVE) if not os.path.exists(p)]


# -- the one table of host paths -----------------------------------------------------------------
# A test must never touch this machine's own /etc/cni/net.d, /opt/cni/bin or /run/iamlink: each
# hostPath volume is the test node's private directory instead (containerd's CNI conf and bin dirs,
# the bench's store...). The plugin, which containerd runs, writes where install-cni's netconf says
# (the store and its log, host paths from the ConfigMap): those two are also bound over the real
# paths inside containerd's private mount namespace (PLUGIN_PATHS), so that plugin and daemon meet.
def host_paths(bench, containerd_dirs):
    """hostPath path → the test node's directory. `containerd_dirs`: the Containerd (or anything
    with conf_dir, bin_dir, netns_dir, cni_results)."""
    return {
        "/etc/cni/net.d": containerd_dirs.conf_dir,   # containerd's [cni] conf_dir
        "/opt/cni/bin": containerd_dirs.bin_dir,      # containerd's [cni] bin_dir
        "/var/run/netns": containerd_dirs.netns_dir,  # where containerd mounts pod network namespaces
        # libcni's cache as containerd's libcni writes it (its results/ directory's parent)
        "/var/lib/cni": os.path.dirname(containerd_dirs.cni_results),
        # kubelet's pods directory (pods' projected tokens): the bench's own
        "/var/lib/kubelet/pods": kubelet_pods_dir(bench),
        **plugin_paths(bench),
    }


def kubelet_pods_dir(bench):
    path = os.path.join(bench.node.workdir, "var-lib-kubelet-pods")
    os.makedirs(path, exist_ok=True)
    return path


def plugin_paths(bench):
    return {
        "/run/iamlink": bench.store_dir,                                # the pod store
        "/var/log/iamlink": os.path.join(bench.node.workdir, "var-log-iamlink"),  # the plugin's log
    }


# -- the one place the config is changed -----------------------------------------------------------
KUBECONFIG_KEY = "kubeconfig"  # added to the ConfigMap's data, so it is at /etc/iamlink/kubeconfig


def config_overrides(bench):
    """(table, key) → value set in the ConfigMap's iamlinkd.toml; each must be unset there."""
    return {
        ("sts", "endpoint"): bench.moto.endpoint,  # STS is moto
        ("roles", "base_arn"): BASE_ARN,           # pod roles under /iamlink/, as deploy/README.md says to set
        ("kubernetes", "kubeconfig"): f"/etc/iamlink/{KUBECONFIG_KEY}",  # the emulated API (plain HTTP)
        # The bench's pods get roles from annotations and [[roles.pod]]: legacy mode, as an
        # install from before token mode has it (the ConfigMap turns it off for new installs).
        ("roles", "legacy_assume_role"): True,
    }


# Keys the ConfigMap sets that config_overrides may change (every other override must be unset).
REPLACEABLE = {("roles", "legacy_assume_role")}


# iamlinkd's own identity: on a node the instance role, from the node's metadata service. Here the
# fake one must never be asked for credentials (the check every test ends with), so moto's keys.
DAEMON_ENV = {**TEST_KEYS, "AWS_EC2_METADATA_DISABLED": "true"}


def override_config(text, overrides):
    """`text` with each (table, key) = value inserted under [table]; checked by parsing both."""
    lines = text.splitlines()
    for (table, key), value in overrides.items():
        if key in tomllib.loads(text).get(table, {}):
            if (table, key) not in REPLACEABLE:
                raise Untranslated(f"[{table}] {key} is set in the ConfigMap: overriding it would hide a change")
            lines = [x for x in lines if not x.strip().startswith(f"{key} =")]
        at = lines.index(f"[{table}]")
        lines.insert(at + 1, f"{key} = {json.dumps(value)}")
    out = "\n".join(lines) + "\n"
    want = tomllib.loads(text)
    for (table, key), value in overrides.items():
        want.setdefault(table, {})[key] = value
    assert tomllib.loads(out) == want, "the overrides changed more than their keys"
    return out


# -- the rendered objects --------------------------------------------------------------------------
def render_chart():
    """(DaemonSet, ConfigMap) of `helm template` with the default values."""
    out = run([HELM, "template", "iamlink", CHART, "--namespace", NAMESPACE], timeout=60).stdout
    objects = [o for o in yaml.safe_load_all(out) if o]
    by_kind = {}
    for o in objects:
        by_kind.setdefault(o["kind"], []).append(o)
    (ds,), (cm,) = by_kind["DaemonSet"], by_kind["ConfigMap"]
    return ds, cm


def same_as_manifest(ds):
    """The chart's DaemonSet runs what deploy/kubernetes/daemonset.yaml runs (deploy/check compares
    every field; this is the light check that the test covers both): the same spec, but for the
    pod template's metadata (Helm's labels, the config checksum)."""
    with open(MANIFEST) as f:
        manifest = yaml.safe_load(f)

    def runnable(obj):
        spec = dict(obj["spec"])
        spec["template"] = {"spec": spec["template"]["spec"]}
        spec.pop("selector")
        return spec

    return runnable(ds) == runnable(manifest)


# -- translation: a DaemonSet's pod into CRI configs --------------------------------------------------
def _known(obj, where, keys):
    unknown = set(obj) - set(keys)
    if unknown:
        raise Untranslated(f"{where}: {sorted(unknown)} not translated into CRI (tests/harness/daemonset.py)")


def quantity(q):
    """A Kubernetes quantity as a number (cpu in cores, memory in bytes)."""
    q = str(q)
    for suffix, factor in (("Ki", 2**10), ("Mi", 2**20), ("Gi", 2**30), ("m", 1e-3)):
        if q.endswith(suffix):
            return float(q[:-len(suffix)]) * factor
    return float(q)


class PodSpec:
    """The pod template of a rendered DaemonSet, checked key by key, turned into CRI configs."""

    # Pod-level keys that are the scheduler's or the API's, not the node runtime's: accepted as
    # they are (checked to be there, so a new key still fails).
    SCHEDULING = ("priorityClassName", "tolerations", "nodeSelector")

    def __init__(self, ds, configmap, pb):
        self.pb = pb
        _known(ds, "DaemonSet", ("apiVersion", "kind", "metadata", "spec"))
        spec = ds["spec"]
        _known(spec, "DaemonSet.spec", ("selector", "updateStrategy", "template"))
        strategy = spec["updateStrategy"]
        if strategy != {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}}:
            raise Untranslated(f"updateStrategy {strategy}: the test replaces the pod (old one gone first)")
        template = spec["template"]
        _known(template, "template", ("metadata", "spec"))
        _known(template["metadata"], "template.metadata", ("labels", "annotations"))
        self.labels = template["metadata"].get("labels", {})
        self.annotations = template["metadata"].get("annotations", {})
        self.spec = pod = template["spec"]
        _known(pod, "pod spec", ("hostNetwork", "dnsPolicy", "serviceAccountName", "terminationGracePeriodSeconds",
                                 "initContainers", "containers", "volumes") + self.SCHEDULING)
        if pod.get("hostNetwork") is not True:
            raise Untranslated("the test runs the pod in the node's network namespace: hostNetwork must be true")
        # The node's resolv.conf, which is what a hostNetwork sandbox gets without cluster DNS.
        if pod.get("dnsPolicy") != "ClusterFirstWithHostNet":
            raise Untranslated(f"dnsPolicy {pod.get('dnsPolicy')}")
        # serviceAccountName: its token is the kubelet's to mount; here the kubeconfig override.
        self.grace = int(pod["terminationGracePeriodSeconds"])
        self.configmap = configmap
        self.volumes = {}
        for v in pod["volumes"]:
            kinds = set(v) - {"name"}
            if kinds == {"hostPath"}:
                _known(v["hostPath"], f"volume {v['name']}", ("path", "type"))
                if v["hostPath"].get("type") not in ("DirectoryOrCreate", "Directory"):
                    raise Untranslated(f"volume {v['name']}: hostPath type {v['hostPath'].get('type')}")
            elif kinds == {"configMap"}:
                _known(v["configMap"], f"volume {v['name']}", ("name",))
                if v["configMap"]["name"] != configmap["metadata"]["name"]:
                    raise Untranslated(f"volume {v['name']}: ConfigMap {v['configMap']['name']} is not the chart's")
            elif kinds == {"emptyDir"}:
                _known(v["emptyDir"], f"volume {v['name']}", ("medium", "sizeLimit"))
                if v["emptyDir"].get("medium") != "Memory":
                    raise Untranslated(f"volume {v['name']}: emptyDir on disk")
            else:
                raise Untranslated(f"volume {v['name']}: {sorted(kinds)}")
            self.volumes[v["name"]] = v
        self.init_containers = pod.get("initContainers", [])
        self.containers = pod["containers"]
        for c in self.init_containers + self.containers:
            self._check_container(c)
        self.privileged = any(c.get("securityContext", {}).get("privileged") for c in self.all_containers)

    @property
    def all_containers(self):
        return self.init_containers + self.containers

    def container(self, name):
        (c,) = [c for c in self.all_containers if c["name"] == name]
        return c

    @staticmethod
    def _check_container(c):
        where = f"container {c['name']}"
        _known(c, where, ("name", "image", "imagePullPolicy", "command", "args", "env", "ports", "securityContext",
                          "resources", "volumeMounts", "livenessProbe", "readinessProbe"))
        if c.get("imagePullPolicy", "IfNotPresent") not in ("IfNotPresent", "Never"):
            raise Untranslated(f"{where}: imagePullPolicy {c['imagePullPolicy']} (the image is imported, not pulled)")
        for e in c.get("env", []):
            _known(e, f"{where} env", ("name", "value", "valueFrom"))
            if "valueFrom" in e and _field_path(e) not in FIELD_VALUES:
                raise Untranslated(f"{where} env {e['name']}: {e['valueFrom']}")
        _known(c.get("securityContext", {}), f"{where} securityContext",
               ("privileged", "runAsUser", "readOnlyRootFilesystem", "allowPrivilegeEscalation", "capabilities",
                "seccompProfile"))
        sc = c.get("securityContext", {})
        _known(sc.get("capabilities", {}), f"{where} capabilities", ("add", "drop"))
        if sc.get("seccompProfile", {"type": "RuntimeDefault"}) != {"type": "RuntimeDefault"}:
            raise Untranslated(f"{where} seccompProfile {sc['seccompProfile']}")
        res = c.get("resources", {})
        _known(res, f"{where} resources", ("requests", "limits"))
        for part in res.values():
            _known(part, f"{where} resources", ("cpu", "memory"))
        for m in c.get("volumeMounts", []):
            _known(m, f"{where} volumeMount", ("name", "mountPath", "readOnly", "mountPropagation"))
            if m.get("mountPropagation", "None") not in ("None", "HostToContainer"):
                raise Untranslated(f"{where} volumeMount {m['name']}: mountPropagation {m['mountPropagation']}")
        for p in c.get("ports", []):
            _known(p, f"{where} port", ("name", "containerPort", "protocol"))
            if p.get("protocol", "TCP") != "TCP":
                raise Untranslated(f"{where} port {p}")
        for probe in ("livenessProbe", "readinessProbe"):
            if probe in c:
                _known(c[probe], f"{where} {probe}", ("httpGet", "initialDelaySeconds", "periodSeconds",
                                                      "timeoutSeconds", "failureThreshold"))
                _known(c[probe]["httpGet"], f"{where} {probe}.httpGet", ("path", "port"))

    def probe_target(self, container, probe):
        """(port, path) a kubelet's httpGet probe asks, the named port resolved."""
        get = container[probe]["httpGet"]
        port = get["port"]
        if isinstance(port, str):
            (port,) = [p["containerPort"] for p in container.get("ports", []) if p["name"] == port]
        return port, get["path"]

    # -- CRI configs --------------------------------------------------------------------------
    def namespaces(self):
        pb = self.pb
        return pb.NamespaceOption(network=pb.NODE, pid=pb.CONTAINER, ipc=pb.POD)

    def sandbox_config(self, name, uid, log_dir):
        pb = self.pb
        ports = [pb.PortMapping(protocol=pb.TCP, container_port=p["containerPort"], host_port=p["containerPort"])
                 for c in self.containers for p in c.get("ports", [])]
        return pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(name=name, uid=uid, namespace=NAMESPACE, attempt=0),
            # No hostname: the sandbox shares the node's UTS namespace (runc refuses to set one there).
            log_directory=log_dir, port_mappings=ports, annotations=self.annotations,
            labels={**self.labels, "io.kubernetes.pod.namespace": NAMESPACE, "io.kubernetes.pod.name": name,
                    "io.kubernetes.pod.uid": uid},
            # A kubelet makes the sandbox privileged when a container of the pod is.
            linux=pb.LinuxPodSandboxConfig(security_context=pb.LinuxSandboxSecurityContext(
                namespace_options=self.namespaces(), privileged=self.privileged)))

    def container_config(self, c, node_name, pod_name, volume_dirs, env_extra=None, command=None):
        """The CRI ContainerConfig of container `c` in pod `pod_name`. volume_dirs: volume name → directory
        on the node."""
        pb = self.pb
        envs = []
        for e in c.get("env", []):
            value = FIELD_VALUES[_field_path(e)](node_name, pod_name) if "valueFrom" in e else str(e["value"])
            envs.append(pb.KeyValue(key=e["name"], value=value))
        envs += [pb.KeyValue(key=k, value=v) for k, v in (env_extra or {}).items()]
        mounts = []
        for m in c.get("volumeMounts", []):
            propagation = (pb.PROPAGATION_HOST_TO_CONTAINER if m.get("mountPropagation") == "HostToContainer"
                           else pb.PROPAGATION_PRIVATE)
            readonly = bool(m.get("readOnly")) or "configMap" in self.volumes[m["name"]]  # configMaps: always
            mounts.append(pb.Mount(container_path=m["mountPath"], host_path=volume_dirs[m["name"]],
                                   readonly=readonly, propagation=propagation))
        sc = c.get("securityContext", {})
        caps = sc.get("capabilities", {})
        security = pb.LinuxContainerSecurityContext(
            capabilities=pb.Capability(add_capabilities=caps.get("add", []), drop_capabilities=caps.get("drop", [])),
            privileged=bool(sc.get("privileged")), namespace_options=self.namespaces(),
            readonly_rootfs=bool(sc.get("readOnlyRootFilesystem")),
            no_new_privs=sc.get("allowPrivilegeEscalation") is False)
        if "runAsUser" in sc:
            security.run_as_user.value = int(sc["runAsUser"])
        if "seccompProfile" in sc:
            security.seccomp.profile_type = pb.SecurityProfile.RuntimeDefault
        res = c.get("resources", {})
        requests, limits = res.get("requests", {}), res.get("limits", {})
        # As the kubelet computes them (cgroup v1): shares from the request, CFS quota and memory from the limits.
        resources = pb.LinuxContainerResources(
            cpu_shares=max(2, int(quantity(requests.get("cpu", 0)) * 1024)),
            cpu_period=100000 if "cpu" in limits else 0,
            cpu_quota=int(quantity(limits["cpu"]) * 100000) if "cpu" in limits else 0,
            memory_limit_in_bytes=int(quantity(limits.get("memory", 0))))
        return pb.ContainerConfig(
            metadata=pb.ContainerMetadata(name=c["name"], attempt=0), image=pb.ImageSpec(image=c["image"]),
            command=command or c.get("command", []), args=c.get("args", []), envs=envs, mounts=mounts,
            labels={"io.kubernetes.container.name": c["name"]}, log_path=f"{c['name']}.log",
            linux=pb.LinuxContainerConfig(resources=resources, security_context=security))


class DaemonSetPod:
    """One pod of the DaemonSet on the test node: the sandbox, its containers, their logs."""

    def __init__(self, runner, name):
        self.runner = runner
        self.name = name
        self.uid = str(uuid.uuid4())
        self.id = None
        self.deleted = False
        self.containers = {}  # name -> container id
        self.log_dir = os.path.join(runner.dir, "logs", name)
        os.makedirs(self.log_dir, exist_ok=True)

    def log(self, container, lines=40):
        return tail(os.path.join(self.log_dir, f"{container}.log"), lines)


class DaemonSetRunner:
    """Runs the rendered DaemonSet's pod (and one-off pods made from its containers) through the
    Containerd of `bench`, on the test node; see the module docstring."""

    def __init__(self, bench, containerd, ds, configmap):
        self.bench = bench
        self.ctd = containerd
        self.cri = containerd.cri
        self.spec = PodSpec(ds, configmap, self.cri.pb)
        self.ds_name = ds["metadata"]["name"]
        self.dir = os.path.join(bench.node.workdir, "daemonset")
        self.pods = []
        self.host_paths = host_paths(bench, containerd)
        self.config_dir = os.path.join(self.dir, "configmap")
        os.makedirs(self.config_dir, exist_ok=True)
        data = dict(configmap["data"])
        data["iamlinkd.toml"] = override_config(data["iamlinkd.toml"], config_overrides(bench))
        with open(bench.kube.kubeconfig_path) as f:
            data[KUBECONFIG_KEY] = f.read()
        for key, value in data.items():
            with open(os.path.join(self.config_dir, key), "w") as f:
                f.write(value)
        self.config_text = data["iamlinkd.toml"]

    def volume_dirs(self, pod):
        """volume name → the node's directory mounted for it (HOST_PATHS for hostPath volumes)."""
        out = {}
        for name, v in self.spec.volumes.items():
            if "hostPath" in v:
                path = v["hostPath"]["path"]
                if path not in self.host_paths:
                    raise Untranslated(f"hostPath {path} has no test directory (tests/harness/daemonset.py host_paths)")
                out[name] = self.host_paths[path]
                os.makedirs(out[name], exist_ok=True)  # DirectoryOrCreate
            elif "configMap" in v:
                out[name] = self.config_dir
            else:  # emptyDir medium Memory: a tmpfs of sizeLimit, made where containerd's runc sees it
                out[name] = os.path.join(self.dir, "emptydir", pod.name, name)
                os.makedirs(out[name], exist_ok=True)
                size = int(quantity(v["emptyDir"].get("sizeLimit", "64Mi")))
                run(["nsenter", "-t", str(self.ctd.holder.pid), "-m", "--", "mount", "-t", "tmpfs", "-o",
                     f"size={size},mode=1777", "tmpfs", out[name]])
        return out

    def _new_pod(self, name):
        pod = DaemonSetPod(self, name)
        self._register(pod)
        config = self.spec.sandbox_config(name, pod.uid, pod.log_dir)
        pod.sandbox_config = config
        pod.id = self.cri.run_sandbox_config(config)
        self.ctd.sandboxes[pod.id] = pod  # containerd's close stops and removes it
        pod.volumes = self.volume_dirs(pod)
        self.pods.append(pod)
        return pod

    def _register(self, pod):
        """The pod's object in the emulated API, as the DaemonSet controller makes it: its
        controller reference names the DaemonSet object, when the API holds one."""
        kube = self.bench.kube
        path = f"/apis/apps/v1/namespaces/{NAMESPACE}/daemonsets/{self.ds_name}"
        status, ds = kube._request("GET", path)
        if status != 200:
            return
        owner = {"apiVersion": "apps/v1", "kind": "DaemonSet", "name": self.ds_name, "uid": ds["metadata"]["uid"],
                 "controller": True, "blockOwnerDeletion": True}
        obj = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": pod.name, "namespace": NAMESPACE, "uid": pod.uid, "labels": self.spec.labels,
                            "ownerReferences": [owner]},
               "spec": {"nodeName": self.bench.node.name, "serviceAccountName": "iamlinkd", "hostNetwork": True,
                        "containers": [{"name": c["name"], "image": c["image"]} for c in self.spec.containers]},
               "status": {"phase": "Running"}}
        kube.api("POST", f"/api/v1/namespaces/{NAMESPACE}/pods", obj)

    def _start(self, pod, c, env_extra=None, command=None):
        config = self.spec.container_config(c, self.bench.node.name, pod.name, pod.volumes, env_extra, command)
        cid = self.cri.create_container(pod.id, config, pod.sandbox_config)
        self.ctd.containers.add(cid)
        pod.containers[c["name"]] = cid
        self.cri.start_container(cid)
        return cid

    def _run_to_exit(self, pod, c, timeout=30, **kwargs):
        cid = self._start(pod, c, **kwargs)
        pb = self.cri.pb

        def exited():
            status, _ = self.cri.container_status(cid)
            return status if status.state == pb.CONTAINER_EXITED else None

        status = wait_until(exited, timeout, f"container {c['name']} to exit")
        if status.exit_code != 0:
            raise AssertionError(f"container {c['name']} exited {status.exit_code} ({status.reason} "
                                 f"{status.message}):\n{pod.log(c['name'])}")
        return pod.log(c["name"])

    def run_pod(self, name=None, ready_timeout=30):
        """The DaemonSet's pod as a kubelet starts it: the sandbox, each init container to exit 0, in
        order, then the containers, until the readiness probe answers 200. Returns the pod."""
        pod = self._new_pod(name or f"iamlinkd-{len(self.pods)}")
        for c in self.spec.init_containers:
            self._run_to_exit(pod, c)
        for c in self.spec.containers:
            self._start(pod, c, env_extra=DAEMON_ENV)
        for c in self.spec.containers:
            if "readinessProbe" in c:
                port, path = self.spec.probe_target(c, "readinessProbe")
                wait_until(lambda: self._probe(pod, c, port, path) == 200, ready_timeout,
                           f"{c['name']} ready ({path} on port {port})", interval=0.1)
        return pod

    def _probe(self, pod, c, port, path):
        status, _ = self.cri.container_status(pod.containers[c["name"]])
        if status.state != self.cri.pb.CONTAINER_RUNNING:
            raise AssertionError(f"{c['name']} is {self.cri.pb.ContainerState.Name(status.state)} "
                                 f"(exit {status.exit_code}):\n{pod.log(c['name'])}")
        return self.http_get(port, path)[0]

    def http_get(self, port, path):
        """(status, body) of GET http://NODE_IP:port/path from the node, as a kubelet's probe."""
        def get():
            conn = http.client.HTTPConnection(NODE_IP, port, timeout=2)
            try:
                conn.request("GET", path)
                r = conn.getresponse()
                return r.status, r.read().decode("utf-8", "replace")
            finally:
                conn.close()
        return self.bench.node.call(get)

    def delete_pod(self, pod):
        """What a kubelet does for a deleted pod: each container stopped (SIGTERM, SIGKILL after
        terminationGracePeriodSeconds), then StopPodSandbox and RemovePodSandbox."""
        for cid in pod.containers.values():
            self.cri.stop_container(cid, self.spec.grace)
        self.ctd.stop_and_remove(pod)

    def run_one_off(self, name, template, command, timeout=30):
        """A one-off pod (same image) running `command` with the mounts and securityContext of
        container `template`, to exit 0; returns its log."""
        pod = self._new_pod(name)
        c = dict(self.spec.container(template), name=name)
        for probe in ("livenessProbe", "readinessProbe", "ports"):
            c.pop(probe, None)
        try:
            return self._run_to_exit(pod, c, timeout=timeout, command=command)
        finally:
            self.ctd.stop_and_remove(pod)

    def logs(self):
        return "\n".join(f"---- {pod.name}/{name} ----\n{pod.log(name)}"
                         for pod in self.pods for name in pod.containers)


def loaded_cni_plugins(cri):
    """The plugin types of the conflist containerd's CRI plugin has loaded (CRI Status, verbose)."""
    r = cri.runtime.Status(cri.pb.StatusRequest(verbose=True), timeout=30)
    config = json.loads(r.info.get("cniconfig", "{}"))
    types = []
    for net in config.get("Networks") or []:
        for p in (net.get("Config") or {}).get("Plugins") or []:
            types.append((p.get("Network") or {}).get("type"))
    return types


def ruleset(node):
    return node.exec(["nft", "list", "ruleset"]).stdout


__all__ = ["DaemonSetRunner", "IMAGE_ARCHIVE", "Untranslated", "loaded_cni_plugins", "missing_prerequisites",
           "plugin_paths", "quantity", "render_chart", "ruleset", "same_as_manifest"]


class PlainChainNode:
    """A node for the DaemonSet's tests: the bench with the node's primary CNI alone (ptp +
    host-local; no iamlinkd, no iamlink table), its containerd with the image imported, the chart's
    DaemonSet and ConfigMap. Each test module adds what its tests need."""


def plain_chain_node(make_module_bench, roles):
    """The PlainChainNode of a module (`make_module_bench`: conftest's fixture), with `roles` in moto."""
    missing = containerd_missing() + missing_prerequisites()
    if missing:
        pytest.fail("not installed or built: " + ", ".join(missing) + " (run scripts/setup)", pytrace=False)
    n = PlainChainNode()
    n.ds, n.configmap = render_chart()
    n.image = n.ds["spec"]["template"]["spec"]["containers"][0]["image"]
    n.bench = bench = make_module_bench(pod_roles=[], kubernetes={}, with_daemon=False,
                                        pods_options={"with_iamlink": False})
    for role in roles:
        bench.moto.create_role(role)
    n.ctd = Containerd(bench.node, bench.pods, plugin_tap=False, host_binds=plugin_paths(bench),
                       images=[(IMAGE_ARCHIVE, n.image)], shared_netns=True,
                       shared_dirs=[kubelet_pods_dir(bench)])
    bench.callback(n.ctd.close)
    bench.extra_logs.append(("containerd", n.ctd.log_path))
    n.conflist_path = os.path.join(n.ctd.conf_dir, "10-iamlink.conflist")
    return n

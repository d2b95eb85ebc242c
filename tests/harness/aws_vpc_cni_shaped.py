"""A CNI plugin that plumbs a pod the way aws-vpc-cni does, for chains that test iamlink behind it.

aws-vpc-cni itself cannot run here (it needs the EC2 API and its ipamd), so this stands in for
the part iamlink depends on, as the Go suite's tests/cni/iamlink/iamlink_awsvpc_test.go does:

- the host interface is named "eni" + the first 11 hex digits of sha1("<namespace>.<name>"),
  so a recreated pod (a StatefulSet's web-0) gets the same host interface name;
- ADD deletes a leftover host interface of that name first (aws-vpc-cni's
  createVethPairContext does), which takes the old pod's eth0 with it;
- the pod gets its address as a /32 and a default route via 169.254.1.1 with a static ARP
  entry for the host side's MAC; the node routes the address to the host interface;
- the result has aws-vpc-cni's 0.4.0 shape ("mac": "0", "sandbox": "0");
- DEL removes the node's route to the address and releases it; it leaves the host interface,
  which goes with the pod's network namespace (aws-vpc-cni's teardown does the same).

Emulated: ipamd. Addresses come from the reference host-local plugin (delegated IPAM, released
by container ID as ipamd does), so an address is reused by a later pod once its holder's DEL ran.
Runs in the namespace it is called in (the test node); needs `ip` (iproute2) and Python's stdlib.
"""

import hashlib
import json
import os
import subprocess
import sys

GATEWAY = "169.254.1.1"
SUPPORTED = ["0.3.0", "0.3.1", "0.4.0"]


class CniError(Exception):
    def __init__(self, code, msg, details=""):
        super().__init__(msg)
        self.code, self.msg, self.details = code, msg, details


def host_ifname(namespace, name):
    """aws-vpc-cni's host interface name for a pod."""
    return "eni" + hashlib.sha1(f"{namespace}.{name}".encode()).hexdigest()[:11]


def cni_args():
    pairs = (kv.split("=", 1) for kv in os.environ.get("CNI_ARGS", "").split(";") if "=" in kv)
    return dict(pairs)


def ip(*argv, netns=None, check=True):
    cmd = ["ip"] + (["-n", netns] if netns else []) + list(argv)
    p = subprocess.run(cmd, capture_output=True, text=True)
    if check and p.returncode != 0:
        raise CniError(11, f"{' '.join(cmd)} failed", p.stderr.strip())
    return p


def netns_name(path):
    """`ip -n` wants a name under /var/run/netns, which is where the harness makes pod namespaces."""
    if os.path.dirname(os.path.realpath(path)) not in ("/var/run/netns", "/run/netns"):
        raise CniError(4, f"netns {path} is not under /var/run/netns")
    return os.path.basename(path)


def ipam(conf, command):
    """Delegates to host-local as ptp does; returns its parsed result (ADD) or None."""
    for d in os.environ.get("CNI_PATH", "").split(":"):
        exe = os.path.join(d, conf["ipam"]["type"])
        if os.access(exe, os.X_OK):
            break
    else:
        raise CniError(11, f"IPAM plugin {conf['ipam']['type']} not found in CNI_PATH")
    stdin = json.dumps({"cniVersion": conf["cniVersion"], "name": conf["name"], "ipam": conf["ipam"]})
    p = subprocess.run([exe], input=stdin, capture_output=True, text=True,
                       env=dict(os.environ, CNI_COMMAND=command))
    if p.returncode != 0:
        raise CniError(11, f"IPAM {command} failed", (p.stdout + p.stderr).strip())
    return json.loads(p.stdout) if command == "ADD" else None


def state_path(conf):
    return os.path.join(conf["stateDir"], f"{os.environ['CNI_CONTAINERID']}.{os.environ['CNI_IFNAME']}.json")


def add(conf):
    args = cni_args()
    namespace, name = args.get("K8S_POD_NAMESPACE"), args.get("K8S_POD_NAME")
    if not namespace or not name:
        raise CniError(4, "K8S_POD_NAMESPACE and K8S_POD_NAME are required")
    host = host_ifname(namespace, name)
    pod_ns = netns_name(os.environ["CNI_NETNS"])
    ifname = os.environ["CNI_IFNAME"]
    address = ipam(conf, "ADD")["ips"][0]["address"].split("/")[0]
    # A leftover host interface of the same name belongs to a former incarnation of this pod.
    ip("link", "del", host, check=False)
    tmp = "tmp" + os.environ["CNI_CONTAINERID"][:8]
    ip("link", "add", host, "type", "veth", "peer", "name", tmp, "netns", pod_ns)
    ip("link", "set", host, "up")
    with open(f"/sys/class/net/{host}/address") as f:
        host_mac = f.read().strip()
    ip("link", "set", tmp, "name", ifname, netns=pod_ns)
    ip("link", "set", ifname, "up", netns=pod_ns)
    ip("addr", "add", f"{address}/32", "dev", ifname, netns=pod_ns)
    ip("route", "add", f"{GATEWAY}/32", "dev", ifname, "scope", "link", netns=pod_ns)
    ip("route", "add", "default", "via", GATEWAY, "dev", ifname, netns=pod_ns)
    ip("neigh", "add", GATEWAY, "lladdr", host_mac, "dev", ifname, "nud", "permanent", netns=pod_ns)
    ip("route", "replace", f"{address}/32", "dev", host, "scope", "link")
    os.makedirs(conf["stateDir"], exist_ok=True)
    with open(state_path(conf), "w") as f:
        json.dump({"address": address, "host": host}, f)
    return {
        "cniVersion": conf["cniVersion"],
        "interfaces": [{"name": host, "mac": "0"}, {"name": ifname, "mac": "0", "sandbox": "0"}],
        "ips": [{"version": "4", "address": f"{address}/32", "interface": 1}],
        "dns": {},
    }


def delete(conf):
    try:
        with open(state_path(conf)) as f:
            state = json.load(f)
    except FileNotFoundError:
        state = None  # a second DEL, or an ADD that never finished
    if state:
        # Only this pod's route: the address is still reserved for it until the release below.
        ip("route", "del", f"{state['address']}/32", "dev", state["host"], check=False)
    ipam(conf, "DEL")
    if state:
        os.remove(state_path(conf))


def main():
    command = os.environ.get("CNI_COMMAND", "")
    try:
        if command == "VERSION":
            out = {"cniVersion": "0.4.0", "supportedVersions": SUPPORTED}
        else:
            conf = json.load(sys.stdin)
            if command == "ADD":
                out = add(conf)
            elif command == "DEL":
                delete(conf)
                out = None
            elif command == "CHECK":
                out = None
            else:
                raise CniError(4, f"unknown CNI_COMMAND {command!r}")
    except CniError as e:
        json.dump({"cniVersion": "0.4.0", "code": e.code, "msg": e.msg, "details": e.details}, sys.stdout)
        return 1
    if out is not None:
        json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())

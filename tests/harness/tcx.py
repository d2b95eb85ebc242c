"""Stand-ins for eBPF dataplanes (tests/bpf/*.c) and a tcx loader for them, independent of
iamlink's own code: libbpf (ctypes) loads an object, the bpf() syscall attaches, lists and
detaches by tcx. Run as a command inside the node namespace (ifindexes are per namespace):

    tcx.py attach OBJ IFNAME head|tail   -> prints the program's id
    tcx.py list IFNAME [ingress|egress]  -> JSON list of the program names, in the order they run
    tcx.py detach IFNAME NAME            -> detaches every program of that name, prints how many
"""

import ctypes
import json
import os
import socket
import struct
import subprocess
import sys

BPF_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bpf")
SYS_BPF = 321  # x86_64
BPF_PROG_ATTACH, BPF_PROG_DETACH, BPF_PROG_GET_FD_BY_ID, BPF_OBJ_GET_INFO_BY_FD, BPF_PROG_QUERY = 8, 9, 13, 15, 16
TCX = {"ingress": 46, "egress": 47}
BPF_F_BEFORE, BPF_F_AFTER = 1 << 3, 1 << 4

# The stand-ins by the table of issue 22: file, and the program's name as the kernel reports it.
CALICO = ("calico_fib", "cali_tc_standin")
CILIUM_FIB = ("cilium_fib", "cil_fib_standin")
CILIUM_SKIP_FIB = ("cilium_skip_fib", "cil_skip_fib")


def build(standin, out_dir, **defines):
    """Compiles a stand-in with clang into out_dir; returns the object's path."""
    src = os.path.join(BPF_DIR, standin[0] + ".c")
    out = os.path.join(out_dir, standin[0] + ".o")
    argv = ["clang", "-O2", "-g", "-target", "bpf", "-I/usr/include/x86_64-linux-gnu", "-c", src, "-o", out]
    argv += [f"-D{k}={v}" for k, v in defines.items()]
    subprocess.run(argv, check=True, capture_output=True, text=True)
    return out


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _bpf(cmd, attr):
    buf = ctypes.create_string_buffer(bytes(attr), 128)
    r = _libc.syscall(ctypes.c_long(SYS_BPF), ctypes.c_long(cmd), buf, ctypes.c_uint(128))
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"bpf({cmd}): {os.strerror(e)}")
    return r, buf.raw


def _load(obj_path):
    lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
    lib.bpf_object__open_file.restype = ctypes.c_void_p
    lib.bpf_object__open_file.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
    lib.bpf_object__load.argtypes = [ctypes.c_void_p]
    lib.bpf_object__next_program.restype = ctypes.c_void_p
    lib.bpf_object__next_program.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.bpf_program__fd.argtypes = [ctypes.c_void_p]
    obj = lib.bpf_object__open_file(obj_path.encode(), None)
    if not obj:
        raise OSError(ctypes.get_errno(), f"cannot open {obj_path}")
    if lib.bpf_object__load(ctypes.c_void_p(obj)) != 0:
        raise OSError(ctypes.get_errno(), f"cannot load {obj_path}")
    prog = lib.bpf_object__next_program(ctypes.c_void_p(obj), None)
    return lib.bpf_program__fd(ctypes.c_void_p(prog))


def attach(obj_path, ifname, where):
    fd = _load(obj_path)
    flags = BPF_F_BEFORE if where == "head" else BPF_F_AFTER
    _bpf(BPF_PROG_ATTACH, struct.pack("=IIII", socket.if_nametoindex(ifname), fd, TCX["ingress"], flags))
    return prog_id(fd)


def prog_id(fd):
    info = ctypes.create_string_buffer(88)
    _bpf(BPF_OBJ_GET_INFO_BY_FD, struct.pack("=IIQ", fd, 88, ctypes.addressof(info)))
    return struct.unpack_from("=I", info.raw, 4)[0]


def prog_name(fd):
    info = ctypes.create_string_buffer(88)
    _bpf(BPF_OBJ_GET_INFO_BY_FD, struct.pack("=IIQ", fd, 88, ctypes.addressof(info)))
    return info.raw[64:80].split(b"\0", 1)[0].decode()


def fd_of(prog):
    r, _ = _bpf(BPF_PROG_GET_FD_BY_ID, struct.pack("=I", prog))
    return r


def listing(ifname, hook="ingress"):
    """[(id, name)] on the interface's tcx hook, in the order they run."""
    ids = (ctypes.c_uint32 * 64)()
    attr = struct.pack("=IIIIQI", socket.if_nametoindex(ifname), TCX[hook], 0, 0, ctypes.addressof(ids), 64)
    _, out = _bpf(BPF_PROG_QUERY, attr)
    count = struct.unpack_from("=I", out, 24)[0]
    progs = []
    for prog in ids[:count]:
        fd = fd_of(prog)
        try:
            progs.append((prog, prog_name(fd)))
        finally:
            os.close(fd)
    return progs


def detach(ifname, name):
    n = 0
    for prog, pname in listing(ifname):
        if pname == name:
            fd = fd_of(prog)
            try:
                _bpf(BPF_PROG_DETACH, struct.pack("=III", socket.if_nametoindex(ifname), fd, TCX["ingress"]))
            finally:
                os.close(fd)
            n += 1
    return n


def cni_plugin():
    """As a chained CNI plugin (`"type": "tcx-standin", "object": PATH`, before iamlink): attaches
    the object at the tail of the pod's host interface, as a dataplane that got there before
    iamlink's ADD would, and passes the previous result on."""
    conf = json.load(sys.stdin)
    if os.environ["CNI_COMMAND"] == "ADD":
        prev = conf["prevResult"]
        host = next(i["name"] for i in prev["interfaces"] if not i.get("sandbox"))
        attach(conf["object"], host, "tail")
        print(json.dumps(dict(prev, cniVersion=conf["cniVersion"])))
    elif os.environ["CNI_COMMAND"] == "VERSION":
        print(json.dumps({"cniVersion": "1.0.0", "supportedVersions": ["0.4.0", "1.0.0"]}))


def plugin_bin_dir(parent):
    """A bin dir holding the plugin `tcx-standin` (this file)."""
    from harness.util import python_plugin_bin
    return python_plugin_bin(os.path.join(parent, "tcx-bin"), "tcx-standin", os.path.abspath(__file__))


def main(argv):
    if os.environ.get("CNI_COMMAND"):
        return cni_plugin()
    cmd = argv[0]
    if cmd == "attach":
        print(attach(argv[1], argv[2], argv[3]))
    elif cmd == "list":
        print(json.dumps([name for _, name in listing(argv[1], *(argv[2:3] or ["ingress"]))]))
    elif cmd == "detach":
        print(detach(argv[1], argv[2]))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])

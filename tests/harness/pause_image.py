"""The pause image of the containerd tests, built here as an OCI image archive: no registry.

One layer: Debian's static busybox (`busybox-static`) as /bin/busybox with /bin/sh and /bin/sleep
linked to it. The entrypoint sleeps until SIGTERM, then exits 0, which is what a pause container
does. The archive is deterministic (fixed times, owners and order), so the image id is the same on
every machine with the same busybox.

    python3 tests/harness/pause_image.py OUT.tar     # scripts/setup writes .build/cri/pause.oci.tar
"""

import hashlib
import io
import json
import os
import platform
import sys
import tarfile

BUSYBOX = "/bin/busybox"
IMAGE_NAME = "localhost/iamlink/pause:1"
ENTRYPOINT = ["/bin/sh", "-c", "trap 'exit 0' TERM INT; while :; do sleep 3600 & wait $!; done"]
ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


def _add(tar, name, data=None, mode=0o644, link=None, directory=False):
    info = tarfile.TarInfo(name)
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    if directory:
        info.type, info.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(info)
    elif link is not None:
        info.type, info.linkname, info.mode = tarfile.SYMTYPE, link, 0o777
        tar.addfile(info)
    else:
        info.size, info.mode = len(data), mode
        tar.addfile(info, io.BytesIO(data))


def _tar_bytes(entries):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in entries:
            _add(tar, **entry)
    return buf.getvalue()


def _blob(data):
    return "sha256:" + hashlib.sha256(data).hexdigest(), data


def build(out, busybox=BUSYBOX):
    with open(busybox, "rb") as f:
        busybox_bytes = f.read()
    layer = _tar_bytes([
        {"name": "bin", "directory": True},
        {"name": "bin/busybox", "data": busybox_bytes, "mode": 0o755},
        {"name": "bin/sh", "link": "busybox"},
        {"name": "bin/sleep", "link": "busybox"},
    ])
    layer_digest, _ = _blob(layer)
    config = json.dumps({
        "architecture": ARCH, "os": "linux",
        "config": {"Entrypoint": ENTRYPOINT, "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    }, sort_keys=True).encode()
    config_digest, _ = _blob(config)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest,
                   "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest,
                    "size": len(layer)}],
    }, sort_keys=True).encode()
    manifest_digest, _ = _blob(manifest)
    index = json.dumps({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest,
                       "size": len(manifest), "platform": {"architecture": ARCH, "os": "linux"},
                       "annotations": {"io.containerd.image.name": IMAGE_NAME,
                                       "org.opencontainers.image.ref.name": IMAGE_NAME.rsplit(":", 1)[1]}}],
    }, sort_keys=True).encode()
    entries = [{"name": "oci-layout", "data": b'{"imageLayoutVersion":"1.0.0"}'},
               {"name": "index.json", "data": index},
               {"name": "blobs", "directory": True}, {"name": "blobs/sha256", "directory": True}]
    for data in (layer, config, manifest):
        entries.append({"name": "blobs/sha256/" + _blob(data)[0].split(":", 1)[1], "data": data})
    archive = _tar_bytes(entries)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp"
    with open(tmp, "wb") as f:
        f.write(archive)
    os.replace(tmp, out)
    return manifest_digest


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(IMAGE_NAME, build(sys.argv[1]))

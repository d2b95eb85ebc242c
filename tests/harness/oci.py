"""OCI image archives written here, for `ctr images import`: no registry, no docker.

The one writer of both local images: the test pause image (pause_image.py) and the iamlink image
(scripts/build-image). One uncompressed layer; the archive is deterministic (fixed times, owners
and order), so the same inputs give the same image id on every machine.
"""

import hashlib
import io
import json
import os
import platform
import tarfile

ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


def directory(name):
    return {"name": name, "directory": True}


def file(name, data, mode=0o644):
    return {"name": name, "data": data, "mode": mode}


def symlink(name, target):
    return {"name": name, "link": target}


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


def tar_bytes(entries):
    """A tar of `entries` (dicts of directory/file/symlink), in the order given."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in entries:
            _add(tar, **entry)
    return buf.getvalue()


def digest(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def write_archive(out, name, layer_entries, config):
    """Writes the OCI archive of a one-layer image tagged `name` (registry/repo:tag) to `out`
    (atomically); `config` is the image config's `config` object (Entrypoint, Env, WorkingDir...).
    Returns the manifest digest."""
    layer = tar_bytes(layer_entries)
    layer_digest = digest(layer)
    config_blob = json.dumps({
        "architecture": ARCH, "os": "linux", "config": config,
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    }, sort_keys=True).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest(config_blob),
                   "size": len(config_blob)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest,
                    "size": len(layer)}],
    }, sort_keys=True).encode()
    manifest_digest = digest(manifest)
    index = json.dumps({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest,
                       "size": len(manifest), "platform": {"architecture": ARCH, "os": "linux"},
                       "annotations": {"io.containerd.image.name": name,
                                       "org.opencontainers.image.ref.name": name.rsplit(":", 1)[1]}}],
    }, sort_keys=True).encode()
    entries = [file("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'), file("index.json", index),
               directory("blobs"), directory("blobs/sha256")]
    for data in (layer, config_blob, manifest):
        entries.append(file("blobs/sha256/" + digest(data).split(":", 1)[1], data))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp"
    with open(tmp, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for entry in entries:
                _add(tar, **entry)
    os.replace(tmp, out)
    return manifest_digest

"""The pause image of the containerd tests, built here as an OCI image archive: no registry.

One layer: Debian's static busybox (`busybox-static`) as /bin/busybox with /bin/sh and /bin/sleep
linked to it. The entrypoint sleeps until SIGTERM, then exits 0, which is what a pause container
does. The archive is written by oci.py (deterministic: the image id is the same on every machine
with the same busybox).

    python3 tests/harness/pause_image.py OUT.tar     # scripts/setup writes .build/cri/pause.oci.tar
"""

import os
import sys

if __package__ in (None, ""):  # run as a script: import oci.py beside it
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import oci
else:
    from . import oci

BUSYBOX = "/bin/busybox"
IMAGE_NAME = "localhost/iamlink/pause:1"
ENTRYPOINT = ["/bin/sh", "-c", "trap 'exit 0' TERM INT; while :; do sleep 3600 & wait $!; done"]


def build(out, busybox=BUSYBOX):
    with open(busybox, "rb") as f:
        busybox_bytes = f.read()
    layer = [oci.directory("bin"), oci.file("bin/busybox", busybox_bytes, 0o755),
             oci.symlink("bin/sh", "busybox"), oci.symlink("bin/sleep", "busybox")]
    return oci.write_archive(out, IMAGE_NAME, layer, {"Entrypoint": ENTRYPOINT, "WorkingDir": "/"})


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(IMAGE_NAME, build(sys.argv[1]))

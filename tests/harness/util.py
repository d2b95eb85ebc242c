"""Paths, polling and process helpers shared by the bench pieces."""

import json
import os
import signal
import subprocess
import sys
import time

REPO = os.path.realpath(os.path.join(os.path.dirname(__file__), "..", ".."))
RELEASE = os.path.join(REPO, "target", "release")
# IAMLINK_IAMLINKD: another build of iamlinkd (say main's, to see a new test fail against it).
IAMLINKD = os.environ.get("IAMLINK_IAMLINKD") or os.path.join(RELEASE, "iamlinkd")
IAMLINK_PLUGIN = os.path.join(RELEASE, "iamlink")
CNIRT = os.path.join(REPO, ".build", "bin", "cnirt")
REFERENCE_PLUGINS = "/usr/lib/cni"
IMDS_CLIENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "imds_client.py")
AWS_VPC_CNI_SHAPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "aws_vpc_cni_shaped.py")
FAKE_IMDS_SERVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_imds_server.py")

# The interpreter running the harness; its bin dir holds moto_server and aws (pyenv shims
# need pyenv's environment, the real scripts next to the interpreter don't).
PYTHON = sys.executable
PY_BIN = os.path.dirname(PYTHON)
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BASE_PATH = PY_BIN + ":" + SYSTEM_PATH


def tool(name):
    """The real path of a Python console script (aws, moto_server) of this interpreter."""
    path = os.path.join(PY_BIN, name)
    if os.access(path, os.X_OK):
        return path
    raise FileNotFoundError(f"{name} not found next to {PYTHON}: run scripts/setup")


def missing_binaries(plugin=True, daemon=True, cnirt=True):
    """Names of the built binaries the bench needs that are not there yet."""
    wanted = []
    if cnirt:
        wanted.append(CNIRT)
    if plugin:
        wanted.append(IAMLINK_PLUGIN)
    if daemon:
        wanted.append(IAMLINKD)
    return [p for p in wanted if not os.access(p, os.X_OK)]


class Timeout(AssertionError):
    pass


class Fatal(AssertionError):
    """Raised by a probe when waiting longer cannot help (the process we wait for has exited)."""


def wait_until(probe, timeout, what, interval=0.05):
    """Poll `probe()` until it returns a truthy value; raise Timeout after `timeout` seconds.

    The sleep between tries is the polling interval, not a synchronisation guess: the loop ends
    as soon as the condition holds, and fails loudly when it never does.
    """
    deadline = time.monotonic() + timeout
    last_error = None
    while True:
        try:
            value = probe()
            if value:
                return value
        except Fatal:
            raise
        except Exception as e:  # the probe's failure is the reason we keep polling
            last_error = e
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            raise Timeout(f"timed out after {timeout}s waiting for {what}{detail}")
        time.sleep(interval)


def stop_process(proc, timeout=10.0, sig=signal.SIGTERM):
    """Stop a process started with start_new_session=True: `sig` to its group, then SIGKILL."""
    if proc.poll() is not None:
        return proc.returncode
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return proc.wait(timeout=10)


def tail(path, lines=40):
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return f"<{path}: {e}>"
    text = data.decode("utf-8", "replace").splitlines()
    return "\n".join(text[-lines:])


def json_lines(path):
    """The JSON objects of a JSON-lines log, oldest first; none while the file does not exist."""
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


def run(argv, timeout=60, check=True, env=None, input=None):
    """subprocess.run with captured text output and an error that quotes it."""
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, input=input)
    if check and p.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} exited {p.returncode}\nstdout: {p.stdout.strip()}\nstderr: {p.stderr.strip()}"
        )
    return p


def python_plugin_bin(bin_dir, name, script):
    """Makes `bin_dir/name`, a CNI plugin that runs `script` with this Python; returns bin_dir."""
    import shlex
    os.makedirs(bin_dir, exist_ok=True)
    exe = os.path.join(bin_dir, name)
    with open(exe, "w") as f:
        f.write(f"#!/bin/sh\nexec {shlex.quote(PYTHON)} {shlex.quote(script)} \"$@\"\n")
    os.chmod(exe, 0o755)
    return bin_dir

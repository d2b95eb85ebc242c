"""perf profiles for the parts that miss a target: where the CPU time goes.

Software clock sampling (`-e cpu-clock`) works in VMs without PMU access. System-wide profiles are
read per command name (the other tenants of the machine show up under their own names and are
left out); per-process profiles of iamlinkd use DWARF call graphs (release builds carry line
tables, not frame pointers) to attribute time to the request path's steps.
"""

import os
import re
import shutil
import signal
import subprocess

FREQ = 499  # Hz per CPU


def available():
    return shutil.which("perf") is not None


class Recording:
    """`perf record` running until stop(); system-wide unless pid is given."""

    def __init__(self, path, pid=None, callgraph=False, max_seconds=120):
        self.path = path
        argv = ["perf", "record", "-q", "-e", "cpu-clock", "-F", str(FREQ), "-o", path]
        argv += ["-p", str(pid)] if pid else ["-a"]
        if callgraph:
            argv += ["--call-graph", "dwarf,16384"]
        argv += ["--", "sleep", str(max_seconds)] if not pid else []
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     start_new_session=True)

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        return os.path.exists(self.path)


def _report(path, *args, timeout=180):
    p = subprocess.run(["perf", "report", "-i", path, "--stdio"] + list(args),
                       capture_output=True, text=True, timeout=timeout)
    return p.stdout


def cpu_by_comm(path):
    """{command: CPU seconds} of a system-wide recording."""
    out = {}
    for line in _report(path, "--sort", "comm", "-n", "-g", "none").splitlines():
        m = re.match(r"^\s+([\d.]+)%\s+(\d+)\s+(.+?)\s*$", line)
        if m:
            out[m.group(3)] = out.get(m.group(3), 0) + int(m.group(2)) / FREQ
    return out


def top_symbols(path, comm=None, n=12):
    """The top self-time symbols (of one command), as report lines."""
    args = ["--sort", "dso,sym", "--no-children", "-g", "none", "--percent-limit", "0.5"]
    if comm:
        args += ["--comms", comm]
    lines = [l.rstrip() for l in _report(path, *args).splitlines() if l.strip() and not l.startswith("#")]
    return lines[:n]


def children_of(path, patterns):
    """Inclusive share of samples under each symbol pattern (first matching symbol per pattern)."""
    text = _report(path, "--children", "--sort", "sym", "-g", "none", timeout=600)
    rows = []
    for label, pattern in patterns:
        rx = re.compile(pattern)
        for line in text.splitlines():
            m = re.match(r"^\s+([\d.]+)%\s+([\d.]+)%\s+\[[.k]\]\s+(.*)$", line)
            if m and rx.search(m.group(3)):
                rows.append((label, float(m.group(1))))
                break
        else:
            rows.append((label, None))  # not among the samples (inlined, renamed, or never ran)
    return rows

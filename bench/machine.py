"""What the numbers were measured on: CPU, cores, memory, kernel, commit, tool versions, and how
busy the machine was (other tenants share the cores)."""

import datetime
import os
import re
import subprocess
import time

from .node import REPO, UNDER_TEST


def _out(argv, cwd=None):
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=20, cwd=cwd).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def cpu_busy(seconds=2.0):
    """Fraction of all CPUs busy over `seconds`, from /proc/stat (everything, not just us)."""
    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + v[4]
        return sum(v), idle
    t0, i0 = sample()
    time.sleep(seconds)
    t1, i1 = sample()
    return 1 - (i1 - i0) / max(1, t1 - t0)


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def describe():
    lscpu = _out(["lscpu"])
    model = re.search(r"^Model name:\s*(.+)$", lscpu, re.M)
    with open("/proc/meminfo") as f:
        mem_kb = int(re.search(r"MemTotal:\s+(\d+)", f.read()).group(1))
    head = _out(["git", "rev-parse", "HEAD"], cwd=REPO)
    dirty = _out(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO)
    nft = _out(["nft", "--version"])
    wrk = _out(["sh", "-c", "wrk --version 2>&1 | head -1"])
    rustc = _out(["rustc", "--version"])
    go = _out(["go", "version"])
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": model.group(1).strip() if model else "unknown",
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "kernel": _out(["uname", "-r"]),
        "commit": head + (" (working tree differs from it)" if dirty else ""),
        "binaries": UNDER_TEST,
        "built": datetime.datetime.fromtimestamp(os.path.getmtime(os.path.join(UNDER_TEST, "iamlinkd")),
                                                 datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "tools": "; ".join(x for x in (rustc, go, nft, wrk.split(" Copyright")[0]) if x),
        "load_before": loadavg(),
        "busy_before": cpu_busy(),
    }

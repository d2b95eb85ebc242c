"""Small statistics for the benchmark: percentiles, medians, ratios, formatting."""

import math


def percentile(xs, q):
    """The q-th percentile (0..100) by linear interpolation between closest ranks; None if empty."""
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    if len(xs) == 1:
        return xs[0]
    k = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def median(xs):
    return percentile(xs, 50)


def ratio(a, b):
    if a is None or b in (None, 0):
        return None
    return a / b


def mib(kb):
    """KiB (as /proc/<pid>/status gives them) in MiB; None stays None."""
    return kb / 1024 if kb is not None else None


def fmt(x, digits=2):
    if x is None:
        return "—"
    if isinstance(x, int):
        return str(x)
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.{digits}f}"

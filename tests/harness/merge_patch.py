"""JSON merge patch (RFC 7386), as kube-apiserver applies `application/merge-patch+json`: shared
by the emulated API server (a script, which imports it from its own folder) and the harness's
offline edits of that server's state. Standard library only."""


def merged(obj, patch):
    """`obj` with `patch` applied, as a new value (`obj` is not changed)."""
    if not isinstance(patch, dict):
        return patch
    out = dict(obj) if isinstance(obj, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merged(out.get(k), v)
    return out

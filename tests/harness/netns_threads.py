"""Threads of the test process that live in a pod's (or any) network namespace.

Sockets a thread opens belong to the thread's network namespace, so a worker that has entered a
pod's namespace with setns(2) makes connections *from that pod*: raw HTTP, timed requests and
slow clients without starting a process per request. Only the worker threads move; the rest of
the process, and the root namespace, stay where they were.

A thread inside a namespace keeps it alive: close() the workers before the namespace is
deleted (use it as a context manager).
"""

import concurrent.futures

from .netns import _enter_netns, netns_path


class NetnsThreads:
    """`workers` threads in the network namespace `name` (a name under /var/run/netns)."""

    def __init__(self, name, workers=1):
        self.name = name
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix=f"in-{name}", initializer=_enter_netns,
            initargs=(netns_path(name),))
        try:
            self.call(lambda: None)  # fail now if a worker cannot enter the namespace
        except BaseException:
            self.close()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def submit(self, fn, *args, **kwargs):
        return self._pool.submit(fn, *args, **kwargs)

    def call(self, fn, *args, timeout=120, **kwargs):
        """fn(*args, **kwargs) on a worker inside the namespace; its result."""
        return self._pool.submit(fn, *args, **kwargs).result(timeout=timeout)

    def close(self):
        self._pool.shutdown(wait=True, cancel_futures=True)

"""Fixtures for the end-to-end suites, built on tests/harness.

Every bench is a context manager (Node → moto → fake upstream → iamlinkd → pods) that tears down
in reverse also when a test fails; the node's own close also runs at interpreter exit and on
SIGTERM. When a test fails, the tails of iamlinkd's log, the CNI plugin's log, moto's log and the
fake upstream's request log are attached to the report.
"""

import contextlib
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from harness import Bench, missing_binaries  # noqa: E402

# The bench's standard tenants: (namespace, name, role or None).
STANDARD_PODS = [
    ("team-a", "web", "web"),
    ("team-a", "batch", "batch"),
    ("team-b", "api", "api"),
    ("team-c", "norole", None),
]
# team-a by pod name, team-b by namespace (every pod of team-b is `api`), team-c has no entry.
STANDARD_ROLES = [
    {"namespace": "team-a", "name": "web", "role": "web"},
    {"namespace": "team-a", "name": "batch", "role": "batch"},
    {"namespace": "team-b", "role": "api"},
]

_live_benches = []


@pytest.fixture(scope="session")
def built():
    """The binaries under test; missing ones fail the test (scripts/setup builds them)."""
    missing = missing_binaries()
    if missing:
        pytest.fail("not built: " + ", ".join(missing) + " (run scripts/setup)", pytrace=False)


def add_standard_pods(bench, pods=STANDARD_PODS):
    """Creates the standard pods; returns {"ns/name": pod} with pod.role set to the expected role."""
    out = {}
    for ns, name, role in pods:
        pod = bench.pods.add(ns, name)
        pod.role = role
        out[pod.key] = pod
    return out


def record_of(bench, pod):
    """The pod's record in the bench's store, as JSON."""
    with open(os.path.join(bench.store_dir, "records", f"{pod.cid}.eth0.json")) as f:
        return json.load(f)


@contextlib.contextmanager
def _bench_stack():
    with contextlib.ExitStack() as stack:
        made = []

        def make(**kwargs):
            kwargs.setdefault("pod_roles", STANDARD_ROLES)
            bench = stack.enter_context(Bench(**kwargs))
            _live_benches.append(bench)
            stack.callback(_live_benches.remove, bench)
            made.append(bench)
            return bench

        yield make
        # The invariant of every test: nobody asked the node's metadata service for credentials.
        leaks = [(b.node.name, r) for b in made if b.upstream for r in b.upstream.unexpected_credential_requests()]
        assert not leaks, f"requests for the node's credentials reached the real metadata service: {leaks}"


@pytest.fixture
def make_bench(built):
    """Factory of benches that live for one test."""
    with _bench_stack() as make:
        yield make


@pytest.fixture(scope="module")
def make_module_bench(built):
    """Factory of benches shared by a module's tests."""
    with _bench_stack() as make:
        yield make


_report_lines = []


@pytest.fixture
def bench_report():
    """report(line): a line for the "iamlink bench" section at the end of the run."""
    return _report_lines.append


def pytest_terminal_summary(terminalreporter):
    if _report_lines:
        terminalreporter.section("iamlink bench")
        for line in _report_lines:
            terminalreporter.write_line(line)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for bench in list(_live_benches):
            report.sections.append((f"bench {bench.node.name} logs", bench.logs()))

"""Fixtures and hooks for every tier.

- ``standin``: the Kubernetes API stand-in of tests/standin.py, fresh per test.
- The cluster tier (tests/cluster/) runs against a real control plane; without one its tests are
  skipped with a reason that says how to get one. With ``PERCH_REQUIRE_CLUSTER=1`` (CI sets it) a
  skipped cluster test fails the run, so CI can never pass by running none of them. The summary
  prints how many cluster tests ran.
"""

from collections.abc import Iterator

import pytest

from tests.standin import StandIn
from tests.support import controlplane, figures

CLUSTER_DIR = "tests/cluster/"
_cluster_outcomes: dict[str, str] = {}


@pytest.fixture
def standin() -> Iterator[StandIn]:
    """A fresh stand-in per test: no objects but the namespaces of standin.NAMESPACES."""
    with StandIn() as server:
        yield server
    # A 500 from the stand-in's own bug could pass for an API outage the product tolerated.
    crashes = server.crashes()
    assert not crashes, f"the Kubernetes API stand-in itself failed: {crashes!r}"


def _is_cluster(nodeid: str) -> bool:
    return nodeid.replace("\\", "/").startswith(CLUSTER_DIR)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    why = controlplane.unavailable()
    for item in items:
        if not _is_cluster(item.nodeid):
            continue
        item.add_marker(pytest.mark.cluster)
        if why:
            item.add_marker(pytest.mark.skip(reason=why))
    # Tests that read what the whole tier did (the audit log) run after every other cluster test.
    last = [i for i in items if i.get_closest_marker("after_cluster_tier")]
    items[:] = [i for i in items if not i.get_closest_marker("after_cluster_tier")] + last


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if not _is_cluster(report.nodeid):
        return
    if hasattr(report, "wasxfail"):
        # An expected failure ran (and failed as it says it must): it is not a skip.
        _cluster_outcomes.setdefault(report.nodeid, "xfailed")
    elif report.failed:
        _cluster_outcomes[report.nodeid] = "failed"
    elif report.skipped and _cluster_outcomes.get(report.nodeid) != "failed":
        _cluster_outcomes[report.nodeid] = "skipped"
    elif report.when == "call" and report.passed:
        _cluster_outcomes.setdefault(report.nodeid, "passed")


def _counts() -> dict[str, int]:
    counts = {"passed": 0, "failed": 0, "skipped": 0, "xfailed": 0}
    for outcome in _cluster_outcomes.values():
        counts[outcome] += 1
    return counts


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if controlplane.required() and _counts()["skipped"]:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # type: ignore[no-untyped-def]
    for name, value in figures.reported():
        terminalreporter.write_line(f"figure: {name}: {value}")
    if not _cluster_outcomes:
        return
    counts = _counts()
    where = controlplane.describe()
    line = (
        f"cluster tier: {counts['passed']} passed, {counts['failed']} failed, "
        f"{counts['xfailed']} xfailed, {counts['skipped']} skipped (control plane: {where})"
    )
    terminalreporter.write_sep("=", line)
    if controlplane.required() and counts["skipped"]:
        terminalreporter.write_line(
            f"FAILED: {controlplane.REQUIRE_ENV}=1 and {counts['skipped']} cluster tests were "
            "skipped; CI must run the cluster tier",
            red=True,
        )

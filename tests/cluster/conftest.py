"""The cluster tier: a real API server named by PERCH_TEST_KUBECONFIG (kind, or any cluster).

Without it every test here is skipped, and pytest's summary says why.
"""

from __future__ import annotations

import os

import pytest

KUBECONFIG_ENV = "PERCH_TEST_KUBECONFIG"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get(KUBECONFIG_ENV):
        return
    skip = pytest.mark.skip(
        reason=f"cluster tier: set {KUBECONFIG_ENV} to the kubeconfig of a real API server (kind)"
    )
    for item in items:
        if "tests/cluster/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(skip)

"""Fixtures for every tier: the Kubernetes API stand-in of tests/standin.py."""

from collections.abc import Iterator

import pytest

from tests.standin import StandIn


@pytest.fixture
def standin() -> Iterator[StandIn]:
    """A fresh stand-in per test: no objects but the namespaces of standin.NAMESPACES."""
    with StandIn() as server:
        yield server
    # A 500 from the stand-in's own bug could pass for an API outage the product tolerated.
    crashes = server.crashes()
    assert not crashes, f"the Kubernetes API stand-in itself failed: {crashes!r}"

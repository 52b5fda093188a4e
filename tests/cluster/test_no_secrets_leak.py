"""No secret Perch was given ever shows in a log line it wrote or in an Event.

Runs after the rest of the cluster tier: every ServiceAccount token, private key line, password
and notifier address the tier handed Perch (tests/support/secrets.py) is searched for in the
webhook's and every analyzer's log, and in every Event of the cluster.
"""

from __future__ import annotations

import pytest
from kubernetes import client

from tests.support import secrets

pytestmark = pytest.mark.after_cluster_tier


def test_no_secret_shows_in_a_log_or_an_event(api: client.ApiClient) -> None:
    known = secrets.secrets()
    assert len(known) >= 3, "the tier registered no secrets to look for"
    logs = [path for path in secrets.logs() if path.exists()]
    assert logs, "the tier registered no logs"
    found: list[str] = []
    for path in logs:
        text = path.read_text(errors="replace")
        found += [f"{path.name}: …{value[:6]}…" for value in known if value in text]
    events = client.CoreV1Api(api).list_event_for_all_namespaces().items
    for event in events:
        text = f"{event.message} {event.reason}"
        found += [
            f"event {event.metadata.namespace}/{event.metadata.name}" for v in known if v in text
        ]
    assert found == [], found

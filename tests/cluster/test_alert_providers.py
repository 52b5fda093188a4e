"""AlertProviders on a real control plane: a release's ``analysis.alerts`` name AlertProvider
objects (the CRD from the chart), one with its address in a Secret, one in another namespace; the
analyzer, a process with the chart's ServiceAccount and RBAC, reads them through the API server
and posts to local receivers standing in for the chat services. A promoted release and a
rolled-back one each notify exactly the alerts whose severity wants what happened; an alert whose
provider does not exist becomes a Warning event and the release completes all the same.

Receivers are checked once the phase and the events say the release is over: each wait is on a
condition, never a fixed sleep.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from tests.seed import IMAGE_NEW, IMAGE_STABLE
from tests.support import secrets
from tests.support.mesh import Recorder
from tests.support.release import Release

GROUP, VERSION, PLURAL = "perch.dev", "v1alpha1", "alertproviders"


def spec(loadtester: str, alerts: str) -> str:
    return (
        "service:\n  port: 9898\n"
        "analysis:\n  interval: 1s\n  threshold: 2\n  maxWeight: 50\n  stepWeight: 25\n"
        f"  webhooks:\n  - {{name: load-test, type: rollout, url: '{loadtester}', timeout: 2s}}\n"
        f"  alerts:\n{alerts}"
    )


def alert(name: str, provider: str, severity: str, namespace: str | None = None) -> str:
    ref = f"{{name: {provider}" + (f", namespace: {namespace}}}" if namespace else "}")
    return f"  - {{name: {name}, severity: {severity}, providerRef: {ref}}}\n"


@pytest.fixture
def receivers() -> Iterator[dict[str, Recorder]]:
    started = {
        t: Recorder().start() for t in ("slack", "msteams", "generic", "discord", "rocket", "gchat")
    }
    yield started
    for recorder in started.values():
        recorder.stop()


def create_provider(api: client.ApiClient, namespace: str, name: str, spec: dict[str, Any]) -> None:
    client.CustomObjectsApi(api).create_namespaced_custom_object(
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "AlertProvider",
            "metadata": {"name": name},
            "spec": spec,
        },
    )


def headlines(recorder: Recorder) -> list[str]:
    """What each post announced, whatever the service's shape."""
    found = []
    for post in recorder.received:
        body = post["body"]
        if "attachments" in body and "type" in body:  # Teams
            found.append(body["attachments"][0]["content"]["body"][0]["text"])
        elif "cardsV2" in body or "content" in body:  # Google Chat, Discord
            found.append(body.get("text") or body["content"])
        elif "kind" in body:  # generic
            found.append(f"{body['canary']}.{body['namespace']}: {body['kind']}")
        else:  # Slack, Rocket.Chat
            found.append(body["text"])
    return found


def test_a_promoted_release_notifies_its_providers_and_a_missing_one_is_a_warning(
    release: Release, receivers: dict[str, Recorder], other_namespace: str
) -> None:
    app, api = release, release.api
    ns = app.namespace
    # Slack's address in a Secret; Teams' provider in the platform team's namespace.
    secrets.remember(receivers["slack"].url)
    client.CoreV1Api(api).create_namespaced_secret(
        ns,
        {
            "metadata": {"name": "chat-url"},
            "data": {"address": base64.b64encode(receivers["slack"].url.encode()).decode()},
        },
    )
    create_provider(
        api,
        ns,
        "chat",
        {"type": "slack", "secretRef": {"name": "chat-url"}, "channel": "#releases"},
    )
    create_provider(
        api, other_namespace, "teams", {"type": "msteams", "address": receivers["msteams"].url}
    )
    create_provider(api, ns, "audit", {"type": "generic", "address": receivers["generic"].url})
    alerts = (
        alert("chat", "chat", "info")
        + alert("teams", "teams", "info", namespace=other_namespace)
        + alert("audit", "audit", "error")
        + alert("lost", "nobody", "info")
    )
    app.create(spec(app.loadtester.url, alerts))
    app.release(IMAGE_NEW)
    app.start_analyzer()
    app.wait_phase("Succeeded", "Failed")
    assert app.phase() == "Succeeded", app.events()
    assert app.image() == IMAGE_NEW

    target = f"podinfo.{ns}"
    expected = [f"{target}: canary analysis started", f"{target}: canary promoted"]
    for kind in ("slack", "msteams"):
        app.wait_for(lambda kind=kind: len(receivers[kind].received) >= 2, f"{kind}'s two posts")
        assert headlines(receivers[kind]) == expected, kind
    (started, promoted) = [post["body"] for post in receivers["slack"].received]
    assert started["channel"] == "#releases"
    assert started["attachments"][0]["text"].startswith("New revision v1-")
    assert promoted["attachments"][0]["text"].startswith(f"Canary analysis of {target} completed")
    assert receivers["msteams"].received[0]["body"]["type"] == "message"
    # The missing provider: a Warning event on the Canary naming it; the others were not held up.
    events = app.wait_events(f"Alert lost not sent: AlertProvider {ns}/nobody not found")
    warning = next(e for e in app.event_objects() if e["message"].startswith("Alert lost"))
    assert (warning["type"], warning["reason"]) == ("Warning", "AlertNotSent")
    assert events.count(f"Alert lost not sent: AlertProvider {ns}/nobody not found") == 1
    # severity error: nothing of a promotion.
    assert receivers["generic"].received == []
    # The Secret's address never reached the analyzer's log.
    assert f"127.0.0.1:{receivers['slack'].port}" not in app.logs()


def test_a_rolled_back_release_notifies_each_provider_by_severity(
    release: Release, receivers: dict[str, Recorder]
) -> None:
    app, api = release, release.api
    ns = app.namespace
    create_provider(
        api, ns, "ops", {"type": "discord", "address": receivers["discord"].url, "username": "ops"}
    )
    create_provider(api, ns, "pager", {"type": "rocket", "address": receivers["rocket"].url})
    create_provider(api, ns, "team", {"type": "gchat", "address": receivers["gchat"].url})
    alerts = (
        alert("ops", "ops", "warn")
        + alert("pager", "pager", "error")
        + alert("team", "team", "info")
    )
    app.create(spec(app.loadtester.url, alerts))
    app.loadtester.status = 500  # the load test fails: every check fails
    app.release(IMAGE_NEW)
    app.start_analyzer()
    app.wait_phase("Succeeded", "Failed")
    assert app.phase() == "Failed", app.events()
    assert app.image() == IMAGE_STABLE

    target = f"podinfo.{ns}"
    failed = f"{target}: canary analysis failed, rolled back"
    halted = f"{target}: canary advancement halted"
    for kind in ("discord", "rocket", "gchat"):
        app.wait_for(
            lambda kind=kind: failed in headlines(receivers[kind]), f"{kind}'s failure post"
        )
    # warn: the halts and the failure; error: the failure only; info: everything, start first.
    ops = headlines(receivers["discord"])
    assert ops[-1] == failed and set(ops[:-1]) == {halted}, ops
    assert headlines(receivers["rocket"]) == [failed]
    team = headlines(receivers["gchat"])
    assert team[0] == f"{target}: canary analysis started" and team[-1] == failed, team
    assert halted in team
    body = receivers["rocket"].received[0]["body"]
    assert body["attachments"][0]["text"].startswith(f"Rolling back {target}")
    assert receivers["discord"].received[-1]["body"]["username"] == "ops"
    assert not [e for e in app.events() if e.startswith("Alert ")]

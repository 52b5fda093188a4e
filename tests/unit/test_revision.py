"""The revision: what makes a new release and what does not."""

from __future__ import annotations

import copy
import json
import re

import pytest

from perch.revision import is_restart_only, template_revision
from tests.seed import IMAGE_NEW, podinfo


def template(**kwargs: object) -> dict:
    return podinfo(**kwargs)["spec"]["template"]  # type: ignore[arg-type]


def test_revision_is_versioned_hash():
    rev = template_revision(template())
    assert re.fullmatch(r"v1-[0-9a-f]{16}", rev)


def test_key_order_does_not_matter():
    tpl = template()
    reordered = json.loads(json.dumps(tpl, sort_keys=True))
    reversed_keys = {k: tpl[k] for k in reversed(list(tpl))}
    assert (
        template_revision(reordered) == template_revision(tpl) == template_revision(reversed_keys)
    )


def test_added_empty_field_does_not_matter():
    tpl = template()
    tpl["spec"]["volumes"] = []
    tpl["spec"]["nodeSelector"] = {}
    tpl["spec"]["containers"][0]["args"] = []
    tpl["spec"]["containers"][0]["workingDir"] = ""
    assert template_revision(tpl) == template_revision(template())


def test_server_defaults_do_not_matter():
    assert template_revision(template(defaulted=True)) == template_revision(
        template(defaulted=False)
    )


def test_pull_policy_default_depends_on_tag():
    tpl = template(defaulted=False, image="podinfo:latest")
    defaulted = copy.deepcopy(tpl)
    defaulted["spec"]["containers"][0]["imagePullPolicy"] = "Always"
    assert template_revision(defaulted) == template_revision(tpl)
    defaulted["spec"]["containers"][0]["imagePullPolicy"] = "IfNotPresent"
    assert template_revision(defaulted) != template_revision(tpl)


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda t: t["spec"]["containers"][0].update(image=IMAGE_NEW), id="image"),
        pytest.param(
            lambda t: t["spec"]["containers"][0]["env"].append({"name": "X", "value": "1"}),
            id="env",
        ),
        pytest.param(
            lambda t: t["spec"]["containers"][0].update(command=["./podinfo", "--port=9899"]),
            id="command",
        ),
        pytest.param(lambda t: t["metadata"]["labels"].update(version="2"), id="pod-label"),
        pytest.param(
            lambda t: t["spec"].update(terminationGracePeriodSeconds=60), id="non-default-value"
        ),
    ],
)
def test_release_changes_revision(change):
    tpl = template()
    change(tpl)
    assert template_revision(tpl) != template_revision(template())


def test_rollout_restart_is_restart_only():
    old = template()
    new = copy.deepcopy(old)
    new["metadata"]["annotations"]["kubectl.kubernetes.io/restartedAt"] = "2026-11-26T12:00:00Z"
    assert template_revision(new) == template_revision(old)
    assert is_restart_only(old, new)
    again = copy.deepcopy(new)
    again["metadata"]["annotations"]["kubectl.kubernetes.io/restartedAt"] = "2026-11-26T13:00:00Z"
    assert is_restart_only(new, again)


def test_restart_with_image_change_is_a_release():
    old = template()
    new = template(image=IMAGE_NEW)
    new["metadata"]["annotations"]["kubectl.kubernetes.io/restartedAt"] = "2026-11-26T12:00:00Z"
    assert not is_restart_only(old, new)
    assert template_revision(new) != template_revision(old)


def test_unchanged_is_not_restart_only():
    assert not is_restart_only(template(), template())

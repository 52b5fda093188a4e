"""The webhook registration: schema-valid, and its matchConditions pick exactly the right requests.

The CEL expressions are evaluated with cel-python against the same objects the API server would
bind to `object`, `oldObject` and `request`.
"""

from __future__ import annotations

import copy

import celpy
import pytest

from tests.seed import IMAGE_NEW, SEED_SPEC_CURRENT, podinfo
from tests.validation import validate
from webhook.registration import CONFIGURATION_NAME, MATCH_CONDITIONS, registration

_env = celpy.Environment()
_programs = [(c["name"], _env.program(_env.compile(c["expression"]))) for c in MATCH_CONDITIONS]


def called(operation: str, obj: dict, old: dict | None = None) -> bool:
    """Whether the API server would call Perch: every matchCondition true."""
    activation = {
        "object": celpy.json_to_cel(obj),
        "oldObject": celpy.json_to_cel(old if old is not None else {}),
        "request": celpy.json_to_cel({"operation": operation}),
    }
    return all(bool(program.evaluate(activation)) for _, program in _programs)


def changed(**kw) -> dict:
    return podinfo(**kw)


def test_registration_is_schema_valid_and_has_the_design_fields():
    reg = registration(namespace="perch", service="perch-webhook", ca_bundle="Q0E=")
    validate(reg)
    hook = reg["webhooks"][0]
    assert reg["metadata"]["name"] == CONFIGURATION_NAME
    assert CONFIGURATION_NAME > "z", "must sort after other mutating webhook configurations"
    assert hook["sideEffects"] == "NoneOnDryRun"
    assert hook["reinvocationPolicy"] == "IfNeeded"
    assert hook["failurePolicy"] == "Fail"
    assert hook["timeoutSeconds"] == 5
    assert hook["namespaceSelector"]["matchExpressions"][0]["values"] == ["kube-system", "perch"]
    assert hook["rules"][0]["operations"] == ["CREATE", "UPDATE"]
    assert hook["clientConfig"]["service"]["path"] == "/mutate"


def test_failure_policy_ignore_and_url():
    reg = registration(
        namespace="perch", url="https://127.0.0.1:8443/mutate", failure_policy="Ignore"
    )
    validate(reg)
    assert reg["webhooks"][0]["failurePolicy"] == "Ignore"
    with pytest.raises(ValueError, match="exactly one"):
        registration(namespace="perch")


def test_create_opted_in_is_sent():
    assert called("CREATE", podinfo(uid=None))


def test_create_not_opted_in_is_not_sent():
    assert not called("CREATE", podinfo(uid=None, enabled=False, spec=None))


def test_new_template_opted_in_is_sent():
    assert called("UPDATE", podinfo(image=IMAGE_NEW), podinfo())


def test_new_template_not_opted_in_is_not_sent():
    assert not called("UPDATE", podinfo(image=IMAGE_NEW, enabled=False), podinfo(enabled=False))


def test_scale_and_label_changes_are_not_sent():
    new = podinfo()
    new["spec"]["replicas"] = 9
    new["metadata"]["labels"]["team"] = "b"
    assert not called("UPDATE", new, podinfo())


def test_opt_out_is_sent():
    assert called("UPDATE", podinfo(enabled=False), podinfo())


def test_spec_change_is_sent():
    assert called("UPDATE", podinfo(spec=SEED_SPEC_CURRENT), podinfo())


def test_opt_in_without_annotations_map_works():
    old = podinfo(enabled=False, spec=None)
    del old["metadata"]["annotations"]
    new = copy.deepcopy(old)
    new["metadata"]["annotations"] = {"perch.dev/enabled": "true"}
    assert called("UPDATE", new, old)
    assert not called("UPDATE", copy.deepcopy(old), old)

"""The spec's JSON Schema (docs/spec.schema.json) and the README's table of spec fields, held
against the models they describe."""

from __future__ import annotations

import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from perch.spec import SpecError, parse_spec
from perch.spec.schema import field_paths, json_schema, schema_text
from tests.seed import SEED_SPEC_CURRENT, SEED_SPEC_EARLY

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_FILE = ROOT / "docs" / "spec.schema.json"


def test_the_checked_in_schema_is_the_one_the_models_export():
    assert SCHEMA_FILE.read_text(encoding="utf-8") == schema_text(), (
        "docs/spec.schema.json is out of date: run make schema"
    )


def test_the_schema_is_a_valid_json_schema():
    jsonschema.Draft202012Validator.check_schema(json_schema())


# --------------------------------------------------------------------------------------------
# The schema takes what parse_spec accepts, and refuses what a field alone gets wrong
# --------------------------------------------------------------------------------------------

FULL = """\
provider: gatewayapi:v1
progressDeadlineSeconds: 120
autoscalerRef:
  apiVersion: keda.sh/v1alpha1
  kind: ScaledObject
  name: podinfo
  primaryScalerQueries: {cpu: 'sum(rate(x[1m]))'}
  primaryScalerReplicas: {minReplicas: 2, maxReplicas: 4}
service:
  name: podinfo-svc
  port: 80
  targetPort: http
  portName: web
  portDiscovery: true
  appProtocol: http
  gatewayRefs: [{name: public, namespace: istio-ingress, sectionName: https, port: 443}]
  hosts: [app.example.com]
  trafficPolicy: {tls: {mode: ISTIO_MUTUAL}}
  timeout: 1m30s
  retries: {attempts: 3, perTryTimeout: 5s, retryOn: gateway-error}
  headers: {request: {set: {x-perch: "1"}, add: {x-a: b}, remove: [x-debug]}, response: {}}
  match: [{uri: {prefix: /api}}]
  rewrite: {uri: /, type: ReplacePrefixMatch}
  corsPolicy: {allowOrigins: [{exact: "https://example.com"}]}
analysis:
  interval: 1m
  threshold: 5
  stepWeights: [1, 5, 10, 25, 60]
  stepWeightPromotion: 50
  primaryReadyThreshold: 80
  canaryReadyThreshold: 90
  sessionAffinity: {cookieName: c, maxAge: 60, primaryCookieName: p, sameSite: Lax}
  metrics:
  - name: error-ratio
    templateRef: {name: error-ratio, namespace: flagger}
    templateVariables: {route: podinfo}
    thresholdRange: {max: 1}
    interval: 2m
    onNoData: pass
  - name: request-duration
    primary: {maxRatio: 1.5, maxDelta: 100}
  webhooks:
  - {name: approve, type: confirm-promotion, url: 'https://gate.example.com/', maxWait: 1h,
     onTimeout: proceed, muteAlert: true, retries: 2, disableTLS: true, metadata: {a: b}}
  - {name: load, url: 'http://x/', type: '', timeout: 30}
  alerts:
  - {name: on-call, severity: error, providerRef: {name: pagerduty, namespace: flagger}}
skipAnalysis: false
suspend: true
revertOnDeletion: true
targetRef: {apiVersion: apps/v1, kind: Deployment, name: podinfo}
"""
BLUE_GREEN = "service: {port: 9898, timeout: null}\nanalysis: {iterations: 5, mirror: true, mirrorWeight: 20}\n"
AB = "service: {port: 9898}\nanalysis: {iterations: 5, match: [{headers: {x-canary: {exact: 'on'}}}]}\n"


def validate(text: str) -> list[str]:
    document = yaml.safe_load(text)
    validator = jsonschema.Draft202012Validator(
        json_schema(), format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )
    return [error.message for error in validator.iter_errors(document)]


@pytest.mark.parametrize("text", [SEED_SPEC_EARLY, SEED_SPEC_CURRENT, FULL, BLUE_GREEN, AB])
def test_what_parse_spec_accepts_the_schema_accepts(text: str):
    parse_spec(text)
    assert validate(text) == []


@pytest.mark.parametrize(
    "text",
    [
        "service: {port: 9898}\nprovder: istio\n",
        "service: {port: '9898'}\n",
        "service: {port: 0}\n",
        "service: {hosts: [a]}\n",
        "service: {port: 9898, name: Podinfo}\n",
        "service: {port: 9898}\nanalysis: {maxWeight: 101}\n",
        "service: {port: 9898}\nanalysis: {interval: 30 seconds}\n",
        "service: {port: 9898}\nanalysis: {webhooks: [{name: t, url: 'ftp://x/'}]}\n",
        "service: {port: 9898}\nanalysis: {metrics: [{name: request-duration, thresholdRange: {max: 1}, onNoData: ignore}]}\n",
        "service: {port: 9898}\nsuspend: 'true'\n",
    ],
)
def test_what_a_field_alone_gets_wrong_both_refuse(text: str):
    with pytest.raises(SpecError):
        parse_spec(text)
    assert validate(text) != []


# --------------------------------------------------------------------------------------------
# The README's "Spec fields" table names exactly the schema's fields
# --------------------------------------------------------------------------------------------

_TICKED = re.compile(r"`([^`]+)`")


def spec_table() -> list[tuple[str, str]]:
    """The rows of the README's table under "### Spec fields", as (field cell, notes cell)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("### Spec fields", 1)[1].split("\n#", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 3 and cells[0] not in ("field", "---"):
            rows.append((cells[0], cells[2]))
    assert rows, "no table under ### Spec fields"
    return rows


def plain(path: str) -> str:
    return path.replace("[]", "")


def row_fields(cell: str) -> list[str]:
    """`service.targetPort`, `portName`: a full path, then fields beside it."""
    fields: list[str] = []
    for token in _TICKED.findall(cell):
        if "." in token or not fields:
            fields.append(plain(token))
        else:
            parent = fields[-1].rpartition(".")[0]
            fields.append(f"{parent}.{token}" if parent else token)
    return fields


def documented(paths: set[str]) -> tuple[set[str], set[str]]:
    """(the schema paths the table names, the table's fields that are not schema paths).

    A row names its fields, and the fields under them that its notes name in backticks:
    relative to the row's fields, or under or beside a field named before in the row
    (`primary.maxDelta` / `maxRatio`; `providerRef` (`name`, optional `namespace`)). A field is
    named when a field under it is.
    """
    named: set[str] = set()
    unknown: set[str] = set()
    for cell, notes in spec_table():
        fields = row_fields(cell)
        unknown |= {field for field in fields if field not in paths}
        scope = list(fields)
        for ticked in _TICKED.findall(notes):
            token = plain(ticked)
            bases = {base for field in scope for base in (field, field.rpartition(".")[0])}
            found = [f"{base}.{token}" for base in bases if f"{base}.{token}" in paths]
            scope += found
        named |= set(scope)
    named |= {parent for path in named for parent in _parents(path)}
    return named & paths, unknown


def _parents(path: str) -> list[str]:
    parts = path.split(".")
    return [".".join(parts[:end]) for end in range(1, len(parts))]


def test_the_readme_table_names_every_field_of_the_schema_and_no_other():
    paths = set(field_paths())
    named, unknown = documented(paths)
    assert unknown == set(), "README spec table rows that name no field of the schema"
    assert sorted(paths - named) == [], "schema fields the README spec table does not name"

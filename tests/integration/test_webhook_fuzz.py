"""The running webhook under thousands of malformed, hostile and random inputs.

perch-webhook runs as the API server meets it (gunicorn over TLS, the real admitter, the API
stand-in behind it). Hypothesis sends it random JSON documents, AdmissionReviews with one field
swapped for random values, random bytes (non-UTF-8 included) under random content types, deeply
nested JSON, bodies around the size limit, and opted-in Deployments whose perch.dev/spec is random
text or a random document built from the spec's own field names. Whatever comes in:

- the answer is 200 (a well-formed AdmissionReview answer for that uid) or 400 (a JSON error
  with a reason), never 5xx, never a dropped connection;
- an invalid spec is denied naming the annotation (and a field path, when it parsed at all);
- the server never logs a traceback and keeps serving.

The number of inputs tried is printed at the end of the module (``fuzz: N inputs``) and checked.
"""

from __future__ import annotations

import copy
import json
import os
import string
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.seed import IMAGE_NEW, admission_review, podinfo
from tests.standin import StandIn
from tests.support import figures
from tests.support.webhook_server import PERCH_APP, Server, start_server

MIB = 1024 * 1024
TRIED: Counter[str] = Counter()
# Per strategy; the total is what the module reports. Enough to find the classic failures
# (recursion, encodings, type confusion) in well under a minute on two cores.
EXAMPLES = int(os.environ.get("PERCH_FUZZ_EXAMPLES", "1000"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=False,
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with StandIn() as standin:
        tmp = tmp_path_factory.mktemp("fuzz")
        kubeconfig = standin.kubeconfig(tmp / "kubeconfig")
        running = start_server(tmp, app=PERCH_APP, env={"KUBECONFIG": str(kubeconfig)})
        running.session = requests.Session()  # type: ignore[attr-defined]
        yield running
        log = running.log()
        running.terminate()
        at = log.find("Traceback")
        assert at < 0, log[max(0, at - 1000) : at + 4000]
        total = sum(TRIED.values())
        figures.report("webhook fuzz inputs", f"{total} ({dict(TRIED)})")


def post(server: Server, body: bytes, content_type: str = "application/json") -> requests.Response:
    answer: requests.Response = server.session.post(  # type: ignore[attr-defined]
        f"{server.base}/mutate",
        data=body,
        headers={"Content-Type": content_type},
        verify=str(server.certs.ca),
        timeout=30,
    )
    return answer


def assert_sane(answer: requests.Response, *, uid: str | None = None) -> dict[str, Any]:
    """200 with an AdmissionReview answer, or 400 with a JSON reason; nothing else."""
    assert answer.status_code in (200, 400), (answer.status_code, answer.text[:500])
    assert answer.headers["Content-Type"].startswith("application/json")
    assert "Traceback" not in answer.text
    body = answer.json()
    if answer.status_code == 400:
        assert isinstance(body.get("error"), str) and body["error"]
        return body
    response = body["response"]
    assert isinstance(response["allowed"], bool)
    # An internal error is answered as a denial (not a 500), but it is still a bug.
    assert "internal error" not in json.dumps(response.get("status") or {}), response
    if uid is not None:
        assert response["uid"] == uid
    return body


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=25,
)


def valid_review() -> dict[str, Any]:
    old = podinfo(namespace="fuzz")
    new = podinfo(namespace="fuzz", image=IMAGE_NEW)
    return admission_review(operation="UPDATE", obj=new, old=old, uid=str(uuid.uuid4()))


def paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix] if prefix else []
    if isinstance(doc, dict):
        for key, value in doc.items():
            found += paths(value, (*prefix, key))
    elif isinstance(doc, list):
        for index, value in enumerate(doc):
            found += paths(value, (*prefix, index))
    return found


REVIEW_PATHS = paths(valid_review())


@FUZZ
@given(document=json_values)
def test_random_json_documents(server: Server, document: Any) -> None:
    TRIED["random JSON"] += 1
    assert_sane(post(server, json.dumps(document).encode()))


@FUZZ
@given(where=st.sampled_from(REVIEW_PATHS), value=json_values)
def test_a_review_with_one_field_swapped_for_anything(
    server: Server, where: tuple[Any, ...], value: Any
) -> None:
    TRIED["swapped field"] += 1
    review = valid_review()
    target = review
    for step in where[:-1]:
        target = target[step]
    target[where[-1]] = copy.deepcopy(value)
    uid = review["request"].get("uid") if isinstance(review.get("request"), dict) else None
    answer = assert_sane(post(server, json.dumps(review).encode()))
    if "response" in answer and isinstance(uid, str) and uid:
        assert answer["response"]["uid"] == uid


@FUZZ
@given(
    body=st.binary(max_size=200),
    content_type=st.sampled_from(
        [
            "application/json",
            "application/json; charset=latin-1",
            "text/plain",
            "application/x-www-form-urlencoded",
            "",
            "application/json; charset=utf-8",
        ]
    ),
)
def test_random_bytes_under_any_content_type(
    server: Server, body: bytes, content_type: str
) -> None:
    TRIED["random bytes"] += 1
    assert_sane(post(server, body, content_type))


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(depth=st.integers(min_value=1, max_value=200_000), kind=st.sampled_from("[{"))
def test_deeply_nested_json(server: Server, depth: int, kind: str) -> None:
    TRIED["nested JSON"] += 1
    body = "[" * depth + "]" * depth if kind == "[" else '{"a":' * depth + "1" + "}" * depth
    assert_sane(post(server, body.encode()))


@pytest.mark.parametrize("size", [MIB, 3 * MIB - 100, 3 * MIB + 1, 8 * MIB])
def test_bodies_around_the_size_limit(server: Server, size: int) -> None:
    TRIED["sized bodies"] += 1
    review = valid_review()
    padding = size - len(json.dumps(review))
    review["request"]["object"]["metadata"]["annotations"]["pad"] = "x" * max(0, padding)
    answer = assert_sane(post(server, json.dumps(review).encode()))
    if size > 3 * MIB:
        assert answer.get("error", "").startswith("request body larger than")


SPEC_FIELDS = [
    "provider", "service", "port", "analysis", "interval", "threshold", "maxWeight", "stepWeight",
    "stepWeights", "iterations", "metrics", "name", "thresholdRange", "min", "max", "query",
    "webhooks", "url", "type", "timeout", "metadata", "canaryAnalysis", "skipAnalysis",
    "progressDeadlineSeconds", "autoscalerRef", "match", "alerts", "suspend", "gateways", "hosts",
]  # fmt: skip
spec_documents = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 200) | st.text(string.printable, max_size=12),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from(SPEC_FIELDS), children, max_size=5)
    ),
    max_leaves=20,
)
spec_texts = st.one_of(
    st.text(max_size=300),
    spec_documents.map(lambda d: yaml.safe_dump(d, default_flow_style=False)),
    spec_documents.map(json.dumps),
)


@FUZZ
@given(spec=spec_texts)
def test_random_specs_are_admitted_or_denied_naming_the_annotation(
    server: Server, spec: str
) -> None:
    TRIED["random spec"] += 1
    review = valid_review()
    for obj in (review["request"]["object"], review["request"]["oldObject"]):
        obj["metadata"]["name"] = f"fuzz-{uuid.uuid4().hex[:8]}"
        obj["metadata"]["annotations"]["perch.dev/spec"] = spec
    review["request"]["name"] = review["request"]["object"]["metadata"]["name"]
    uid = review["request"]["uid"]
    answer = assert_sane(post(server, json.dumps(review).encode()), uid=uid)
    assert "response" in answer, answer
    response = answer["response"]
    if not response["allowed"]:
        message = response["status"]["message"]
        assert message.startswith("perch: "), message
        assert "perch.dev/spec" in message or "could not" in message, message


def test_every_input_was_sent() -> None:
    assert sum(TRIED.values()) >= 4 * EXAMPLES, dict(TRIED)

"""The webhook's HTTP shell: /mutate around an Admitter, plus health, readiness and metrics.

Every answer is JSON (or plain "ok"/Prometheus text); Flask's HTML error pages never leave here.
"""

from __future__ import annotations

import importlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import IO, Any, Final, cast

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from webhook.contract import Admitter, MalformedReview
from webhook.telemetry import log_event, observe_request, render_metrics

# The API server itself refuses request bodies above 3 MiB, so a review can never be larger.
MAX_BODY_BYTES: Final = 3 * 1024 * 1024
# An oversized body is read and thrown away up to this much so that the client, which sends the
# whole body before reading the answer, gets the 400 instead of a connection reset. Beyond it the
# connection is closed: draining without end would let one client hold a thread forever.
_DRAIN_LIMIT_BYTES: Final = 4 * MAX_BODY_BYTES
_CHUNK: Final = 64 * 1024
_MESSAGE_LIMIT: Final = 200
_ADMISSION_VERSIONS: Final = frozenset({"admission.k8s.io/v1", "admission.k8s.io/v1beta1"})
_JSON_TYPE_NAMES: Final = {
    list: "an array",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
}

_log = logging.getLogger("perch.webhook")


class _Rejected(Exception):
    """A request the shell answers with 400 before the admitter sees it."""


def create_app(admitter: Admitter | None = None) -> Flask:
    if admitter is None:
        admitter = _default_admitter()
    app = Flask(__name__)
    _register_errors(app)

    @app.post("/mutate")
    def mutate() -> Response:
        started = time.perf_counter()
        decision, response = _mutate(admitter)
        observe_request(decision=decision, seconds=time.perf_counter() - started)
        return response

    @app.get("/healthz")
    def healthz() -> Response:
        return Response("ok", mimetype="text/plain")

    @app.get("/readyz")
    def readyz() -> Response:
        try:
            ready = admitter.ready()
        except Exception as exc:
            log_event(_log, "readiness check failed", level=logging.WARNING, exc=exc)
            ready = False
        if ready:
            return Response("ok", mimetype="text/plain")
        return _json_response({"error": "not ready"}, status=503)

    @app.get("/metrics")
    def metrics() -> Response:
        body, content_type = render_metrics()
        return Response(body, content_type=content_type)

    return app


def _default_admitter() -> Admitter:
    # Imported by name, lazily: the admission logic builds a Kubernetes client, which only the
    # real server needs, and this shell must import (and type-check) without it.
    module = importlib.import_module("webhook.handler")
    build = cast(Callable[[], Admitter], module.build_admitter)
    return build()


def _mutate(admitter: Admitter) -> tuple[str, Response]:
    """Answer one /mutate request; returns the decision label for metrics with the response."""
    try:
        body = _read_review()
    except _Rejected as exc:
        return "malformed", _error(str(exc), status=400)
    try:
        result = admitter.admit(body)
        response = _json_response(result.review, status=200)
    except MalformedReview as exc:
        return "malformed", _error(str(exc) or "malformed AdmissionReview", status=400)
    except Exception as exc:
        return _internal_error(body, exc)
    if _log.isEnabledFor(logging.DEBUG):  # spares the hot path building fields nobody reads
        log_event(
            _log,
            "admission answered",
            level=logging.DEBUG,
            decision=result.decision,
            fields=_request_fields(body),
        )
    return result.decision, response


def _read_review() -> dict[str, Any]:
    stream = request.stream
    if request.mimetype != "application/json":
        _drain(stream)
        raise _Rejected("content type must be application/json")
    declared = request.content_length
    if declared is not None and declared > MAX_BODY_BYTES:
        _drain(stream)
        raise _Rejected(_too_large())
    try:
        raw = _read_at_most(stream, MAX_BODY_BYTES)
    except HTTPException as exc:
        # The client went away or sent a broken chunk; the answer is for the log more than for it.
        raise _Rejected(f"cannot read request body: {exc.description}") from exc
    if raw is None:
        _drain(stream)
        raise _Rejected(_too_large())
    try:
        parsed = json.loads(raw)
    except UnicodeDecodeError as exc:
        raise _Rejected(f"invalid JSON: body is not UTF-8 text ({exc.reason})") from exc
    except json.JSONDecodeError as exc:
        raise _Rejected(f"invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc
    except RecursionError as exc:
        raise _Rejected("invalid JSON: nested too deeply") from exc
    except ValueError as exc:  # e.g. an integer with more digits than Python converts
        raise _Rejected(f"invalid JSON: {exc}") from exc
    if not isinstance(parsed, dict):
        kind = _JSON_TYPE_NAMES.get(type(parsed), "null")
        raise _Rejected(f"request body must be a JSON object (an AdmissionReview), not {kind}")
    return parsed


def _too_large() -> str:
    return f"request body larger than {MAX_BODY_BYTES // (1024 * 1024)} MiB"


def _read_at_most(stream: IO[bytes], limit: int) -> bytes | None:
    """The whole body, or None as soon as it proves longer than `limit`."""
    chunks: list[bytes] = []
    total = 0
    while chunk := stream.read(min(_CHUNK, limit + 1 - total)):
        chunks.append(chunk)
        total += len(chunk)
        if total > limit:
            return None
    return b"".join(chunks)


def _drain(stream: IO[bytes]) -> None:
    drained = 0
    try:
        while drained < _DRAIN_LIMIT_BYTES and (chunk := stream.read(_CHUNK)):
            drained += len(chunk)
    except HTTPException:
        pass  # nothing left to protect: the client is gone or its framing is broken


def _internal_error(body: Mapping[str, Any], exc: Exception) -> tuple[str, Response]:
    fields = _request_fields(body)
    log_event(
        _log, "admission failed with an internal error", level=logging.ERROR, exc=exc, fields=fields
    )
    uid = fields.get("uid")
    detail = _first_line(exc)
    if not uid:
        return "malformed", _error(f"perch: internal error: {detail}", status=400)
    # A denial the API server relays to the user beats an HTTP 500 it would only report as
    # "failed calling webhook"; the traceback stays in the log, keyed by the uid.
    api_version = body.get("apiVersion")
    review = {
        "apiVersion": api_version if api_version in _ADMISSION_VERSIONS else "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": {
            "uid": uid,
            "allowed": False,
            "status": {
                "code": 500,
                "reason": "InternalError",
                "message": f"perch: internal error: {detail} "
                f"(the perch-webhook log has the details under uid {uid})",
            },
        },
    }
    return "error", _json_response(review, status=200)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    if len(line) > _MESSAGE_LIMIT:
        line = line[: _MESSAGE_LIMIT - 1] + "…"
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def _request_fields(body: Mapping[str, Any]) -> dict[str, str]:
    """What identifies a review in the logs, taken defensively from a body of any shape."""
    req = body.get("request")
    if not isinstance(req, Mapping):
        return {}
    fields = {key: req.get(key) for key in ("uid", "operation", "namespace", "name")}
    return {key: value for key, value in fields.items() if isinstance(value, str) and value}


def _register_errors(app: Flask) -> None:
    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        if status == 413:
            # Clients of an admission webhook expect 400 for any request it will not take.
            return _error(_too_large(), status=400)
        response = _error((exc.name or "error").lower(), status=status)
        if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
            response.headers["Allow"] = ", ".join(exc.valid_methods)
        return response


def _error(message: str, *, status: int) -> Response:
    return _json_response({"error": message}, status=status)


def _json_response(payload: Mapping[str, Any], *, status: int) -> Response:
    return Response(
        json.dumps(payload, separators=(",", ":")), status=status, mimetype="application/json"
    )

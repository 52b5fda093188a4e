"""An Admitter for the webhook server's tests: allows everything, with hooks to misbehave.

Served with `perch-webhook --app tests.support.echo_admitter:create_app`, so the tests run the
real server, TLS and HTTP shell around admission logic whose answers they know in advance.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from flask import Flask

from webhook.app import create_app as create_webhook_app
from webhook.contract import AdmitResult, MalformedReview

# While a file exists at this path, ready() answers False.
NOT_READY_FILE_ENV = "PERCH_TEST_NOT_READY_FILE"
# A review for an object with this name makes admit() raise a generic exception.
EXPLODE_NAME = "explode"


class EchoAdmitter:
    def admit(self, body: Mapping[str, Any]) -> AdmitResult:
        request = body.get("request")
        request = request if isinstance(request, Mapping) else {}
        if request.get("name") == EXPLODE_NAME:
            # Multi-line on purpose: only the first line may reach the user.
            raise RuntimeError("kaboom\nTraceback (most recent call last): secret detail")
        uid = request.get("uid")
        if not isinstance(uid, str) or not uid:
            raise MalformedReview("request.uid is missing")
        review = {
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            # The worker's pid lets a test see that more than one worker answered.
            "response": {"uid": uid, "allowed": True, "warnings": [f"echo pid {os.getpid()}"]},
        }
        return AdmitResult(review=review, decision="allow")

    def ready(self) -> bool:
        path = os.environ.get(NOT_READY_FILE_ENV)
        return not (path and os.path.exists(path))


def create_app() -> Flask:
    return create_webhook_app(EchoAdmitter())

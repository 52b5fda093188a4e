"""The serving floor: the same Flask and gunicorn as Perch, with no Perch logic behind /mutate.

Served with `perch-webhook --app benchmarks.noop_app:create_app` (the repository root on
PYTHONPATH), so TLS, gunicorn's gthread workers and Flask's request handling are exactly what
Perch runs; /mutate only parses the JSON body and allows the request under its uid.
"""

from __future__ import annotations

import json
from typing import Any

from flask import Flask, Response, request


def create_app() -> Flask:
    app = Flask(__name__)

    @app.post("/mutate")
    def mutate() -> Response:
        body: Any = json.loads(request.get_data())
        uid = body["request"]["uid"]
        review = {
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "response": {"uid": uid, "allowed": True},
        }
        return Response(
            json.dumps(review, separators=(",", ":")), status=200, mimetype="application/json"
        )

    @app.get("/healthz")
    def healthz() -> Response:
        return Response("ok", mimetype="text/plain")

    return app

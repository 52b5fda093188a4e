"""The seed case: podinfo in namespace test, as the article and DESIGN.md describe it."""

from __future__ import annotations

import copy
import json
from typing import Any

SEED_SPEC_EARLY = """\
autoscalerRef:
  apiVersion: autoscaling/v2beta1
  kind: HorizontalPodAutoscaler
  name: podinfo
service:
  port: 9898
  gateways:
  - public-gateway.istio-system.svc.cluster.local
  hosts:
  - app.example.com
canaryAnalysis:
  interval: 30s
  threshold: 10
  maxWeight: 50
  stepWeight: 5
  metrics:
  - name: istio_requests_total
    threshold: 99
    interval: 30s
  - name: istio_request_duration_seconds_bucket
    threshold: 500
    interval: 30s
  webhooks:
    - name: load-test
      url: http://flagger-loadtester.test/
      timeout: 5s
      metadata:
        cmd: "hey -z 1m -q 10 -c 2 http://podinfo.test:9898/"
"""

SEED_SPEC_CURRENT = """\
provider: istio
autoscalerRef:
  apiVersion: autoscaling/v2
  kind: HorizontalPodAutoscaler
  name: podinfo
service:
  port: 9898
  gateways:
  - public-gateway.istio-system.svc.cluster.local
  hosts:
  - app.example.com
analysis:
  interval: 30s
  threshold: 10
  maxWeight: 50
  stepWeight: 5
  metrics:
  - name: request-success-rate
    thresholdRange:
      min: 99
    interval: 30s
  - name: request-duration
    thresholdRange:
      max: 500
    interval: 30s
  webhooks:
    - name: load-test
      type: rollout
      url: http://flagger-loadtester.test/
      timeout: 5s
      metadata:
        cmd: "hey -z 1m -q 10 -c 2 http://podinfo.test:9898/"
"""

IMAGE_STABLE = "ghcr.io/stefanprodan/podinfo:6.7.0"
IMAGE_NEW = "ghcr.io/stefanprodan/podinfo:6.7.1"


def podinfo(
    *,
    image: str = IMAGE_STABLE,
    spec: str | None = SEED_SPEC_EARLY,
    enabled: bool = True,
    uid: str | None = "0b6b9a4e-1111-4222-8333-444455556666",
    defaulted: bool = True,
    namespace: str = "test",
) -> dict[str, Any]:
    """The podinfo Deployment; `defaulted` adds what the API server fills in before admission."""
    annotations: dict[str, str] = {}
    if enabled:
        annotations["perch.dev/enabled"] = "true"
    if spec is not None:
        annotations["perch.dev/spec"] = spec
    metadata: dict[str, Any] = {
        "name": "podinfo",
        "namespace": namespace,
        "labels": {
            "app": "podinfo",
            "argocd.argoproj.io/instance": "podinfo",
            "kustomize.toolkit.fluxcd.io/name": "apps",
        },
        "annotations": annotations,
    }
    if uid:
        metadata.update({"uid": uid, "resourceVersion": "1001", "generation": 1})
    dep: dict[str, Any] = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata,
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "podinfo"}},
            "template": {
                "metadata": {
                    "labels": {"app": "podinfo"},
                    "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": "9898"},
                },
                "spec": {
                    "containers": [
                        {
                            "name": "podinfod",
                            "image": image,
                            "ports": [{"name": "http", "containerPort": 9898}],
                            "command": ["./podinfo", "--port=9898", "--level=info"],
                            "env": [{"name": "PODINFO_UI_COLOR", "value": "#34577c"}],
                            "readinessProbe": {
                                "httpGet": {"path": "/readyz", "port": 9898},
                                "initialDelaySeconds": 1,
                            },
                            "resources": {"requests": {"cpu": "10m", "memory": "64Mi"}},
                        }
                    ]
                },
            },
        },
    }
    return server_defaulted(dep) if defaulted else dep


def server_defaulted(dep: dict[str, Any]) -> dict[str, Any]:
    """What the API server's defaulting adds to a Deployment (the subset podinfo touches)."""
    dep = copy.deepcopy(dep)
    spec = dep["spec"]
    spec.setdefault("revisionHistoryLimit", 10)
    spec.setdefault("progressDeadlineSeconds", 600)
    spec.setdefault(
        "strategy",
        {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}},
    )
    tpl = spec["template"]
    tpl["metadata"].setdefault("creationTimestamp", None)
    pod = tpl["spec"]
    for key, value in {
        "restartPolicy": "Always",
        "terminationGracePeriodSeconds": 30,
        "dnsPolicy": "ClusterFirst",
        "securityContext": {},
        "schedulerName": "default-scheduler",
    }.items():
        pod.setdefault(key, value)
    for c in pod["containers"]:
        c.setdefault("terminationMessagePath", "/dev/termination-log")
        c.setdefault("terminationMessagePolicy", "File")
        c.setdefault("imagePullPolicy", "IfNotPresent")
        for port in c.get("ports", []):
            port.setdefault("protocol", "TCP")
        for probe in ("readinessProbe", "livenessProbe"):
            if probe in c:
                for k, v in {
                    "timeoutSeconds": 1,
                    "periodSeconds": 10,
                    "successThreshold": 1,
                    "failureThreshold": 3,
                }.items():
                    c[probe].setdefault(k, v)
                if "httpGet" in c[probe]:
                    c[probe]["httpGet"].setdefault("scheme", "HTTP")
    return dep


def admission_review(
    *,
    operation: str,
    obj: dict[str, Any] | None,
    old: dict[str, Any] | None = None,
    dry_run: bool = False,
    uid: str = "705ab4f5-6393-11e8-b7cc-42010a800002",
) -> dict[str, Any]:
    name = (obj or old or {}).get("metadata", {}).get("name", "podinfo")
    namespace = (obj or old or {}).get("metadata", {}).get("namespace", "test")
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "apps", "version": "v1", "kind": "Deployment"},
            "resource": {"group": "apps", "version": "v1", "resource": "deployments"},
            "requestKind": {"group": "apps", "version": "v1", "kind": "Deployment"},
            "requestResource": {"group": "apps", "version": "v1", "resource": "deployments"},
            "name": name,
            "namespace": namespace,
            "operation": operation,
            "userInfo": {"username": "kubernetes-admin", "groups": ["system:masters"]},
            "object": copy.deepcopy(obj),
            "oldObject": copy.deepcopy(old),
            "dryRun": dry_run,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "UpdateOptions"},
        },
    }


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True)

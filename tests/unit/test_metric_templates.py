"""MetricTemplate objects and their Secrets, read as Perch reads them; the resolver's reads.

The query rendering is in test_metric_queries.py; what a real Prometheus behind basic auth, TLS
and a bearer-token proxy makes of them is in tests/integration/test_prometheus_metrics.py; the
whole loop on a real API server is tests/cluster/test_metric_templates.py. Here: the object's
fields (Flagger's), the Secret's keys (Flagger's, plus ca.crt), and that the resolver reads each
Secret once per TTL and templates from its cache, never per metric per tick.
"""

from __future__ import annotations

import base64
from typing import Any

import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from analyzer.metrics.base import ProviderSettings
from analyzer.metrics.resolver import ResolvedTemplate, TemplateResolver
from analyzer.metrics.templates import (
    Credentials,
    MetricTemplate,
    MetricTemplateError,
    credentials_from_secret,
    parse_metric_template,
    provider_settings,
)
from analyzer.model import MetricResult
from perch.resources import Resource
from perch.spec import CrossNamespaceRef, FrozenDict, Metric, ThresholdRange
from tests.validation import REPO

CRD = REPO / "charts" / "perch" / "crds" / "metrictemplates.perch.dev.yaml"
PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
DEFAULT = ProviderSettings("http://prometheus.istio-system:9090", timeout_seconds=2)


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def template_object(
    *, name: str = "error-rate", namespace: str = "test", **spec: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "provider": {"type": "prometheus", "address": "https://prom.monitoring:9090"},
        "query": 'sum(rate(x{namespace="{{ namespace }}"}[{{ interval }}]))',
    }
    body.update(spec)
    return {
        "apiVersion": "perch.dev/v1alpha1",
        "kind": "MetricTemplate",
        "metadata": {"name": name, "namespace": namespace},
        "spec": body,
    }


# --- the object ----------------------------------------------------------------------------------


def test_flaggers_fields_are_read() -> None:
    obj = template_object(
        provider={
            "type": "prometheus",
            "address": "https://prom.monitoring:9090/prefix",
            "secretRef": {"name": "prom-auth"},
            "insecureSkipVerify": True,
        }
    )
    assert parse_metric_template(obj) == MetricTemplate(
        name="error-rate",
        namespace="test",
        query=obj["spec"]["query"],
        provider_type="prometheus",
        address="https://prom.monitoring:9090/prefix",
        secret_ref="prom-auth",
        insecure_skip_verify=True,
    )
    assert parse_metric_template(obj).ref == "error-rate.test"


def test_type_and_address_may_be_left_out() -> None:
    template = parse_metric_template(template_object(provider={}))
    assert (template.provider_type, template.address, template.secret_ref) == (
        "prometheus",
        "",
        None,
    )


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ({"query": ""}, "spec.query: missing"),
        ({"provider": {"type": "datadog"}}, "spec.provider.type: Perch has no metric provider"),
        ({"provider": {"address": "prom:9090"}}, "spec.provider.address: 'prom:9090' is not"),
        ({"provider": {"secretRef": {}}}, "spec.provider.secretRef: needs a name"),
        ({"provider": {"insecureSkipVerify": "yes"}}, "spec.provider.insecureSkipVerify"),
        ({"provider": {"adress": "http://x"}}, "spec.provider.adress: unknown field"),
        ({"querry": "x"}, "spec.querry: unknown field"),
    ],
)
def test_a_template_perch_cannot_use_is_refused_naming_the_field(
    spec: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(MetricTemplateError, match=fragment.replace("(", r"\(")):
        parse_metric_template(template_object(**spec))


def test_the_crd_is_structural_and_says_what_perch_reads() -> None:
    crd = yaml.safe_load(CRD.read_text())
    assert crd["metadata"]["name"] == "metrictemplates.perch.dev"
    assert crd["spec"]["names"]["kind"] == "MetricTemplate"
    assert crd["spec"]["scope"] == "Namespaced"
    (version,) = crd["spec"]["versions"]
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert spec["required"] == ["query"]
    provider = spec["properties"]["provider"]["properties"]
    assert set(provider) >= {"type", "address", "secretRef", "insecureSkipVerify"}
    assert provider["type"]["enum"] == ["prometheus"]


# --- the Secret ---------------------------------------------------------------------------------


def test_basic_auth_from_username_and_password() -> None:
    creds = credentials_from_secret({"data": {"username": b64("perch"), "password": b64("pw")}})
    assert creds == Credentials(authorization="Basic " + b64("perch:pw"))


def test_a_token_wins_over_username_and_password_as_in_flagger() -> None:
    creds = credentials_from_secret(
        {"data": {"token": b64("ey123\n"), "username": b64("u"), "password": b64("p")}}
    )
    # The trailing newline of `kubectl create secret --from-file` is no part of the token.
    assert creds.authorization == "Bearer ey123"


def test_ca_crt_is_the_bundle_to_trust_with_or_without_credentials() -> None:
    assert credentials_from_secret(
        {"data": {"token": b64("t"), "ca.crt": b64(PEM)}}
    ) == Credentials(authorization="Bearer t", ca_bundle=PEM)
    assert credentials_from_secret({"data": {"ca.crt": b64(PEM)}}) == Credentials(ca_bundle=PEM)


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"username": b64("u")}, "a username but no password"),
        ({"password": b64("p")}, "a password but no username"),
        ({}, "none of the keys token, username, password, ca.crt"),
        ({"other": b64("x")}, "none of the keys"),
        ({"token": "not base64!"}, "token is not base64"),
        ({"ca.crt": b64("hello")}, "ca.crt holds no PEM certificate"),
    ],
)
def test_a_secret_without_usable_keys_says_which(data: dict[str, str], fragment: str) -> None:
    with pytest.raises(MetricTemplateError, match=fragment):
        credentials_from_secret({"data": data})


def test_settings_use_the_templates_address_or_the_analyzers() -> None:
    template = parse_metric_template(template_object())
    creds = Credentials(authorization="Bearer t", ca_bundle=PEM)
    settings = provider_settings(template, creds, default=DEFAULT)
    assert settings.address == "https://prom.monitoring:9090"
    assert settings.headers == {"Authorization": "Bearer t"}
    assert (settings.verify_tls, settings.ca_bundle, settings.timeout_seconds) == (True, PEM, 2)
    own = provider_settings(
        parse_metric_template(template_object(provider={})), None, default=DEFAULT
    )
    assert own.address == DEFAULT.address and own.headers == {}
    insecure = parse_metric_template(
        template_object(provider={"address": "https://x:1", "insecureSkipVerify": True})
    )
    skipped = provider_settings(insecure, creds, default=DEFAULT)
    assert (skipped.verify_tls, skipped.ca_bundle) == (False, None)


# --- the resolver: what it reads, and how often -----------------------------------------------


class Templates:
    def __init__(self, *objs: dict[str, Any], namespaces: tuple[str, ...] | None = None) -> None:
        self.objs = {(o["metadata"]["namespace"], o["metadata"]["name"]): o for o in objs}
        self.namespaces = namespaces

    def get(self, namespace: str, name: str, *, kind: Any = "MetricTemplate") -> Any:
        assert kind == "MetricTemplate"
        return self.objs.get((namespace, name))

    def covers(self, namespace: str) -> bool:
        return self.namespaces is None or namespace in self.namespaces


class Secrets:
    def __init__(self, **secrets: dict[str, Any] | int) -> None:
        self.secrets = secrets  # name -> Secret, or an HTTP status to answer with
        self.gets: list[tuple[str, str]] = []

    def get(self, res: Resource, namespace: str, name: str) -> Any:
        assert res.plural == "secrets"
        self.gets.append((namespace, name))
        found = self.secrets.get(name)
        if isinstance(found, int):
            raise ApiException(status=found, reason="Forbidden")
        return found


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def metric(ref: str = "error-rate", namespace: str | None = None, **variables: str) -> Metric:
    return Metric(
        name="error-rate",
        threshold_range=ThresholdRange(max=1),
        template_ref=CrossNamespaceRef(name=ref, namespace=namespace),
        template_variables=FrozenDict(variables),
    )


AUTH = {"data": {"username": b64("perch"), "password": b64("pw")}}
WITH_SECRET = template_object(
    provider={"address": "https://prom:9090", "secretRef": {"name": "prom-auth"}}
)


def resolver(
    templates: Templates, secrets: Secrets, clock: Clock | None = None
) -> TemplateResolver:
    return TemplateResolver(
        templates=templates, secrets=secrets, default=DEFAULT, clock=clock or Clock()
    )


def test_a_secret_is_read_once_per_ttl_not_per_metric_per_tick() -> None:
    secrets, clock = Secrets(**{"prom-auth": AUTH}), Clock()
    other = template_object(
        name="latency",
        provider={"address": "https://prom:9090", "secretRef": {"name": "prom-auth"}},
    )
    resolve = resolver(Templates(WITH_SECRET, other), secrets, clock)
    first = resolve.resolve("test", metric())
    assert isinstance(first, ResolvedTemplate)
    for _ in range(50):  # fifty ticks of two metrics within the TTL
        assert resolve.resolve("test", metric()) == first
        assert isinstance(resolve.resolve("test", metric("latency")), ResolvedTemplate)
        clock.now += 0.5
    assert secrets.gets == [("test", "prom-auth")]
    clock.now += 30
    resolve.resolve("test", metric())
    assert secrets.gets == [("test", "prom-auth")] * 2
    # The same server and credentials share one provider (one connection pool).
    assert resolve.resolve("test", metric("latency")).provider is first.provider  # type: ignore[union-attr]
    assert first.provider.url == "https://prom:9090"
    resolve.close()


def test_a_template_in_another_namespace_reads_its_secret_there() -> None:
    shared = template_object(
        namespace="monitoring",
        provider={"address": "https://prom:9090", "secretRef": {"name": "prom-auth"}},
    )
    secrets = Secrets(**{"prom-auth": AUTH})
    found = resolver(Templates(shared), secrets).resolve("shop", metric(namespace="monitoring"))
    assert isinstance(found, ResolvedTemplate)
    assert secrets.gets == [("monitoring", "prom-auth")]


def failure(found: ResolvedTemplate | MetricResult) -> str:
    assert isinstance(found, MetricResult), found
    assert (found.outcome, found.value) == ("error", None)
    return found.message


def test_a_missing_template_says_which() -> None:
    assert failure(resolver(Templates(), Secrets()).resolve("test", metric())) == (
        "metric error-rate: MetricTemplate error-rate.test not found"
    )
    limited = Templates(namespaces=("test",))
    assert failure(resolver(limited, Secrets()).resolve("test", metric(namespace="elsewhere"))) == (
        "metric error-rate: MetricTemplate error-rate.elsewhere not found (the analyzer watches "
        "MetricTemplates only in the namespaces it analyses, and elsewhere is not one of them)"
    )


def test_an_unknown_variable_fails_before_any_query_naming_it() -> None:
    obj = template_object(query='x{d="{{ variables.direction }}",r="{{ variables.region }}"}')
    message = failure(
        resolver(Templates(obj), Secrets()).resolve("test", metric(direction="inbound"))
    )
    assert message.startswith(
        "metric error-rate: MetricTemplate error-rate.test: unknown placeholder "
        "{{ variables.region }}"
    )
    assert "variables.direction" in message  # what is known, to spot a typo


def test_an_invalid_template_says_what_is_wrong() -> None:
    obj = template_object(provider={"type": "datadog"})
    assert failure(resolver(Templates(obj), Secrets()).resolve("test", metric())).startswith(
        "metric error-rate: MetricTemplate error-rate.test is invalid: spec.provider.type: "
    )


@pytest.mark.parametrize(
    ("secret", "fragment"),
    [
        (
            None,
            "cannot read Secret prom-auth.test of MetricTemplate error-rate.test: not found",
        ),
        (
            403,
            "cannot read Secret prom-auth.test of MetricTemplate error-rate.test: Kubernetes API "
            "answered 403 Forbidden (the analyzer may read only the Secrets the chart names in "
            "analyzer.secretNames)",
        ),
        (
            {"data": {"username": b64("u")}},
            "Secret prom-auth.test of MetricTemplate error-rate.test: it has a username but no "
            "password",
        ),
    ],
)
def test_a_secret_that_cannot_be_read_or_used_says_which(
    secret: dict[str, Any] | int | None, fragment: str
) -> None:
    secrets = Secrets(**({"prom-auth": secret} if secret is not None else {}))
    clock = Clock()
    resolve = resolver(Templates(WITH_SECRET), secrets, clock)
    assert failure(resolve.resolve("test", metric())) == f"metric error-rate: {fragment}"
    # Asked again soon (a fix shows quickly), but not at every tick.
    resolve.resolve("test", metric())
    assert len(secrets.gets) == 1
    clock.now += 5
    resolve.resolve("test", metric())
    assert len(secrets.gets) == 2

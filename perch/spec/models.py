"""The spec document as pydantic models: the top level, ``service``, and the references.

:class:`SpecDocument` is the whole annotation; :mod:`perch.spec.analysis` holds ``analysis``.
The models are the schema: the JSON Schema (``make schema``, docs/spec.schema.json) is exported
from them, the fields' descriptions included, and they are what
:func:`perch.spec.parse_spec` validates the loaded document with. Field names are the document's
(``progressDeadlineSeconds``), so pydantic's error locations are the paths users read.

A model checks what its own fields say together (a validator on the later field, so that errors
stay in field order, or on the model); ``result()`` then builds the frozen result
(:mod:`perch.spec.result`), applying the defaults that depend on other fields and collecting the
warnings, in document order.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Final

from pydantic import Field, ValidationInfo, field_validator

from perch.spec import early
from perch.spec.analysis import AnalysisModel
from perch.spec.base import SpecModel, documented_default
from perch.spec.messages import Refusal, Required
from perch.spec.result import (
    EMPTY,
    Analysis,
    AutoscalerRef,
    CanarySpec,
    FrozenDict,
    GatewayRef,
    HeaderOperations,
    Headers,
    JsonValue,
    Retries,
    Rewrite,
    ScalerReplicas,
    Service,
    TargetRef,
)
from perch.spec.traffic import check_traffic, traffic_warnings
from perch.spec.values import (
    DNS_1035_LABEL,
    DNS_LABEL,
    DNS_SUBDOMAIN,
    Boolean,
    Choice,
    Duration,
    DurationValue,
    FreeMap,
    Integer,
    String,
    StringMap,
    TargetPort,
)
from perch.spec.vocabulary import (
    AUTOSCALER_GROUPS,
    DEFAULT_GATEWAY_GROUP,
    DEFAULT_GATEWAY_KIND,
    DEFAULT_PORT_NAME,
    DEFAULT_PROGRESS_DEADLINE_SECONDS,
    DEFAULT_PROVIDER,
    FLAGGER_ONLY_PROVIDERS,
    PROVIDERS,
    AutoscalerKind,
    Provider,
    SpecForm,
)

__all__ = ["PORT_REQUIRED", "SpecDocument"]

PORT_REQUIRED: Final = "required: the port number the service exposes (e.g. 9898)"

_NOT_A_WHOLE_OBJECT = (
    "the annotation holds only the spec of a Canary, not a whole object: "
    "put the fields of its spec at the top level"
)
_OTHER_ROUTERS = "not supported: Perch routes with provider istio or gatewayapi only"


class TargetRefModel(SpecModel):
    """Flagger's targetRef, tolerated so that a whole Flagger spec can be pasted."""

    apiVersion: Annotated[str | None, String()] = documented_default(
        "apps/v1", description="apps/v1."
    )
    kind: Annotated[str | None, String()] = documented_default(
        "Deployment", description="Deployment."
    )
    name: Annotated[str, String(DNS_SUBDOMAIN)] = Field(
        description="The annotated Deployment's name."
    )

    @field_validator("apiVersion")
    @classmethod
    def _apps_v1(cls, value: str) -> str:
        if value != "apps/v1":
            raise Refusal(f"expected apps/v1, got {value}")
        return value

    @field_validator("kind")
    @classmethod
    def _deployment(cls, value: str) -> str:
        if value != "Deployment":
            raise Refusal(f"Perch's target is a Deployment, got {value}")
        return value


class ScalerReplicasModel(SpecModel):
    minReplicas: Annotated[int | None, Integer(1)] = Field(
        None, description="The primary's minimum replicas while the canary is analysed."
    )
    maxReplicas: Annotated[int | None, Integer(1)] = Field(
        None, description="The primary's maximum replicas while the canary is analysed."
    )

    @field_validator("maxReplicas")
    @classmethod
    def _ordered(cls, high: int, info: ValidationInfo) -> int:
        low = info.data.get("minReplicas")
        if low is not None and low > high:
            raise Refusal(f"minReplicas {low} is more than maxReplicas {high}", "minReplicas", up=1)
        return high


class AutoscalerRefModel(SpecModel):
    """The primary's autoscaler."""

    apiVersion: Annotated[str, String()] = Field(
        description="autoscaling/<version> for an HPA, keda.sh/<version> for a ScaledObject."
    )
    kind: Annotated[
        AutoscalerKind, Choice(AUTOSCALER_GROUPS, "autoscaler kind", non_empty=True)
    ] = Field(
        description=(
            "HorizontalPodAutoscaler (Perch gives the canary a copy) or ScaledObject "
            "(accepted, not copied)."
        )
    )
    name: Annotated[str, String(DNS_SUBDOMAIN)] = Field(
        description="The primary's autoscaler; the canary's is <name>-canary."
    )
    primaryScalerQueries: Annotated[FrozenDict[str] | None, StringMap()] = Field(
        None,
        description=(
            "Accepted from Flagger (KEDA queries of the primary's ScaledObject); no effect."
        ),
    )
    primaryScalerReplicas: ScalerReplicasModel | None = Field(
        None,
        description=(
            "Accepted from Flagger (the primary's replica bounds during the analysis); no effect."
        ),
    )

    @field_validator("kind")
    @classmethod
    def _in_its_group(cls, kind: AutoscalerKind, info: ValidationInfo) -> AutoscalerKind:
        api_version = info.data.get("apiVersion")
        group = AUTOSCALER_GROUPS[kind]
        if api_version is not None and (
            api_version.partition("/")[0] != group or "/" not in api_version
        ):
            example = "autoscaling/v2" if kind == "HorizontalPodAutoscaler" else "keda.sh/v1alpha1"
            raise Refusal(
                f"a {kind} has apiVersion {group}/<version> (e.g. {example}), got {api_version}",
                "apiVersion",
                up=1,
            )
        return kind

    def result(self) -> AutoscalerRef:
        replicas = self.primaryScalerReplicas
        return AutoscalerRef(
            api_version=self.apiVersion,
            kind=self.kind,
            name=self.name,
            primary_scaler_queries=self.primaryScalerQueries or EMPTY,
            primary_scaler_replicas=None
            if replicas is None
            else ScalerReplicas(
                min_replicas=replicas.minReplicas, max_replicas=replicas.maxReplicas
            ),
        )


class GatewayRefModel(SpecModel):
    """A Gateway API parentRef for the HTTPRoute."""

    name: Annotated[str, String(DNS_SUBDOMAIN)] = Field(description="The Gateway's name.")
    namespace: Annotated[str | None, String(DNS_LABEL)] = Field(
        None, description="Its namespace; default the route's."
    )
    sectionName: Annotated[str | None, String(DNS_SUBDOMAIN)] = Field(
        None, description="One of its listeners."
    )
    port: Annotated[int | None, Integer(1, 65535)] = Field(None, description="One of its ports.")
    group: Annotated[str, String()] = Field(
        DEFAULT_GATEWAY_GROUP, description="The parent's API group."
    )
    kind: Annotated[str, String()] = Field(DEFAULT_GATEWAY_KIND, description="The parent's kind.")

    def result(self) -> GatewayRef:
        return GatewayRef(
            name=self.name,
            namespace=self.namespace,
            section_name=self.sectionName,
            port=self.port,
            group=self.group,
            kind=self.kind,
        )


class RetriesModel(SpecModel):
    """Istio's HTTPRetry."""

    attempts: Annotated[int | None, Integer(0)] = Field(None, description="How many retries.")
    perTryTimeout: Annotated[Duration | None, DurationValue()] = Field(
        None, description="The timeout of each try."
    )
    retryOn: Annotated[str | None, String()] = Field(
        None, description="The conditions that are retried, e.g. gateway-error,connect-failure."
    )

    def result(self) -> Retries:
        per_try = self.perTryTimeout
        return Retries(
            attempts=self.attempts,
            per_try_timeout=None if per_try is None else per_try.text,
            per_try_timeout_seconds=None if per_try is None else per_try.seconds,
            retry_on=self.retryOn,
        )


class HeaderOperationsModel(SpecModel):
    set: Annotated[FrozenDict[str] | None, StringMap()] = Field(
        None, description="Headers to set, overwriting."
    )
    add: Annotated[FrozenDict[str] | None, StringMap()] = Field(None, description="Headers to add.")
    remove: tuple[Annotated[str, String()], ...] = Field((), description="Headers to remove.")

    def result(self) -> HeaderOperations:
        return HeaderOperations(set=self.set or EMPTY, add=self.add or EMPTY, remove=self.remove)


class HeadersModel(SpecModel):
    """Istio's Headers: operations on requests and responses."""

    request: HeaderOperationsModel | None = Field(
        None, description="On requests, before they reach the pods."
    )
    response: HeaderOperationsModel | None = Field(
        None, description="On responses, before they reach the client."
    )

    def result(self) -> Headers:
        return Headers(
            request=None if self.request is None else self.request.result(),
            response=None if self.response is None else self.response.result(),
        )


class RewriteModel(SpecModel):
    uri: Annotated[str | None, String()] = Field(
        None, description="Rewrite the path (or its prefix)."
    )
    authority: Annotated[str | None, String()] = Field(
        None, description="Rewrite the Host/Authority header (Istio)."
    )
    type: Annotated[str | None, String()] = Field(
        None, description="Gateway API: ReplacePrefixMatch (default) or ReplaceFullPath."
    )

    def result(self) -> Rewrite:
        return Rewrite(uri=self.uri, authority=self.authority, type=self.type)


class ServiceModel(SpecModel):
    """How the canary is routed."""

    unsupported: ClassVar[Mapping[str, str]] = {
        **dict.fromkeys(
            ("headless", "backendTimeout", "trafficDistribution", "meshName", "backends",
             "delegation", "apex", "canary", "unmanagedMetadata"),
            "not supported by Perch",
        ),
        "mirror": "not supported by Perch (to mirror traffic to the canary use analysis.mirror)",
        "primary": "not supported: Perch never creates or edits a primary Service",
    }  # fmt: skip

    name: Annotated[str | None, String(DNS_1035_LABEL)] = Field(
        None,
        description="The user's Service in front of the primary; default the Deployment's name.",
    )
    port: Annotated[int, Integer(1, 65535), Required(PORT_REQUIRED)] = Field(
        description="The port of the user's Service and of the canary Service."
    )
    portName: Annotated[str, String(DNS_LABEL)] = Field(
        DEFAULT_PORT_NAME, description="The canary Service's port name."
    )
    targetPort: Annotated[int | str | None, TargetPort()] = Field(
        None, description="The pods' port, by number or name; default port."
    )
    portDiscovery: Annotated[bool, Boolean()] = Field(
        False, description="Accepted from Flagger; has no effect."
    )
    appProtocol: Annotated[str | None, String()] = Field(
        None, description="The canary Service port's appProtocol."
    )
    gateways: tuple[Annotated[str, String()], ...] = Field(
        (), description="Istio: the gateways of the VirtualService (the mesh gateway is added)."
    )
    gatewayRefs: tuple[GatewayRefModel, ...] = Field(
        (),
        description=(
            "Gateway API: the HTTPRoute's parents; without them it attaches to the Service (GAMMA)."
        ),
    )
    hosts: tuple[Annotated[str, String()], ...] = Field(
        (), description="Istio: the hosts of the VirtualService."
    )
    trafficPolicy: Annotated[FrozenDict[JsonValue] | None, FreeMap()] = Field(
        None,
        description=(
            "Istio's TrafficPolicy; with it, Perch makes DestinationRules <name>-primary and "
            "<name>-canary."
        ),
    )
    timeout: Annotated[Duration | None, DurationValue()] = Field(
        None, description="The route's timeout."
    )
    retries: RetriesModel | None = Field(None, description="The route's retry policy.")
    headers: HeadersModel | None = Field(None, description="Header operations on the route.")
    match: tuple[Annotated[FrozenDict[JsonValue], FreeMap()], ...] = Field(
        (), description="The route's match conditions (Istio HTTPMatchRequests)."
    )
    rewrite: RewriteModel | None = Field(None, description="The route's rewrite.")
    corsPolicy: Annotated[FrozenDict[JsonValue] | None, FreeMap()] = Field(
        None, description="Istio's CorsPolicy for the route."
    )

    def result(self, provider: Provider, warnings: list[str]) -> Service:
        if provider == "gatewayapi" and self.gateways:
            warnings.append(
                "perch.dev/spec: service.gateways is for Istio and has no effect with provider "
                "gatewayapi (use service.gatewayRefs)"
            )
        if provider == "istio" and self.gatewayRefs:
            warnings.append(
                "perch.dev/spec: service.gatewayRefs is for the Gateway API and has no effect "
                "with provider istio (use service.gateways)"
            )
        return Service(
            port=self.port,
            target_port=self.port if self.targetPort is None else self.targetPort,
            name=self.name,
            port_name=self.portName,
            port_discovery=self.portDiscovery,
            app_protocol=self.appProtocol,
            gateways=self.gateways,
            gateway_refs=tuple(ref.result() for ref in self.gatewayRefs),
            hosts=self.hosts,
            traffic_policy=self.trafficPolicy,
            timeout=None if self.timeout is None else self.timeout.text,
            timeout_seconds=None if self.timeout is None else self.timeout.seconds,
            retries=None if self.retries is None else self.retries.result(),
            headers=None if self.headers is None else self.headers.result(),
            match=self.match,
            rewrite=None if self.rewrite is None else self.rewrite.result(),
            cors_policy=self.corsPolicy,
        )


class _ProviderChoice(Choice):
    def unknown(self, value: str) -> str:
        if value in FLAGGER_ONLY_PROVIDERS:
            return (
                f"Flagger's provider {value} is not supported by Perch "
                f"(one of: {', '.join(PROVIDERS)})"
            )
        return super().unknown(value)


class SpecDocument(SpecModel):
    """The perch.dev/spec annotation: the spec of a Flagger Canary without targetRef."""

    unsupported: ClassVar[Mapping[str, str]] = {
        "metricsServer": "not supported: Perch queries the Prometheus configured for its analyzer",
        "ingressRef": _OTHER_ROUTERS,
        "routeRef": _OTHER_ROUTERS,
        "upstreamRef": _OTHER_ROUTERS,
        **dict.fromkeys(("apiVersion", "kind", "metadata", "spec", "status"), _NOT_A_WHOLE_OBJECT),
    }

    provider: Annotated[str, _ProviderChoice(PROVIDERS, "provider", non_empty=True)] = Field(
        DEFAULT_PROVIDER,
        description=(
            "The router: istio, or gatewayapi (gatewayapi:v1 or gatewayapi:v1beta1 names the "
            "Gateway API's version)."
        ),
    )
    progressDeadlineSeconds: Annotated[int, Integer(1)] = Field(
        DEFAULT_PROGRESS_DEADLINE_SECONDS,
        description="Canary pods not ready this long after the phase began: roll back.",
    )
    autoscalerRef: AutoscalerRefModel | None = Field(
        None, description="The primary's autoscaler; Perch gives the canary a copy (<name>-canary)."
    )
    service: Annotated[ServiceModel, Required(PORT_REQUIRED, "port")] = Field(
        description="How the canary is routed."
    )
    analysis: AnalysisModel | None = Field(
        None, description="How the canary is analysed; default Flagger's."
    )
    canaryAnalysis: AnalysisModel | None = Field(
        None,
        json_schema_extra={"deprecated": True},
        description="Flagger's early name for analysis, read as analysis.",
    )
    skipAnalysis: Annotated[bool, Boolean()] = Field(
        False, description="Let new revisions through as plain rollouts."
    )
    suspend: Annotated[bool, Boolean()] = Field(
        False, description="Hold new revisions as canaries but do not analyse them."
    )
    revertOnDeletion: Annotated[bool, Boolean()] = Field(
        False,
        description=(
            "Accepted from Flagger; deleting the primary deletes the canary's objects anyway."
        ),
    )
    targetRef: TargetRefModel | None = Field(
        None, description="Accepted from Flagger's Canary: the annotated Deployment is the target."
    )

    @classmethod
    def check_mapping(cls, present: dict[str, Any]) -> None:
        if "analysis" in present and "canaryAnalysis" in present:
            raise Refusal(early.BOTH_FORMS, "canaryAnalysis")

    @field_validator("analysis", "canaryAnalysis")
    @classmethod
    def _routable(cls, analysis: AnalysisModel, info: ValidationInfo) -> AnalysisModel:
        if "provider" in info.data and "service" in info.data:  # otherwise already refused
            provider, version = PROVIDERS[info.data["provider"]]
            check_traffic(
                analysis,
                provider=provider,
                gateway_api_version=version,
                service_matches=len(info.data["service"].match),
            )
        return analysis

    def result(self) -> CanarySpec:
        warnings: list[str] = []
        form: SpecForm = "analysis" if self.canaryAnalysis is None else "canaryAnalysis"
        if form == "canaryAnalysis":
            warnings.append(early.CANARY_ANALYSIS_NOTE)
        provider, gateway_api_version = PROVIDERS[self.provider]
        target_ref = None
        if self.targetRef is not None:
            warnings.append(
                "perch.dev/spec: targetRef is not needed: the annotated Deployment is the target"
            )
            target_ref = TargetRef(name=self.targetRef.name)
        service = self.service.result(provider, warnings)
        written = self.canaryAnalysis or self.analysis
        analysis = Analysis() if written is None else written.result(form, warnings)
        if written is not None:
            warnings.extend(traffic_warnings(written, form))
        if not analysis.metrics and not self.skipAnalysis:
            warnings.append(
                "perch.dev/spec: the analysis has no metrics: the canary is judged on readiness "
                "and webhooks alone"
            )
        return CanarySpec(
            service=service,
            provider=provider,
            gateway_api_version=gateway_api_version,
            progress_deadline_seconds=self.progressDeadlineSeconds,
            autoscaler_ref=None if self.autoscalerRef is None else self.autoscalerRef.result(),
            analysis=analysis,
            skip_analysis=self.skipAnalysis,
            suspend=self.suspend,
            revert_on_deletion=self.revertOnDeletion,
            target_ref=target_ref,
            form=form,
            warnings=tuple(warnings),
        )

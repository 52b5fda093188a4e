"""``analysis`` (or the early ``canaryAnalysis``): the steps, gates, alerts and session affinity.

The pydantic models of that part of the document, each with the checks that involve more than one
of its fields, and with ``result()``, which builds the frozen result (:mod:`perch.spec.result`)
once the document is valid. The metric checks are in :mod:`perch.spec.metrics`; what depends on
the router (``provider``) is checked with the whole spec in view, in :mod:`perch.spec.traffic`.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, ValidationInfo, field_validator

from perch.spec.base import SpecModel, documented_default
from perch.spec.messages import Refusal, Required
from perch.spec.metrics import MetricModel, RefModel
from perch.spec.result import (
    EMPTY,
    Alert,
    Analysis,
    FrozenDict,
    JsonValue,
    SessionAffinity,
    Webhook,
)
from perch.spec.values import (
    COOKIE_ATTRIBUTE,
    COOKIE_NAME,
    Boolean,
    Choice,
    Duration,
    DurationValue,
    FreeMap,
    Integer,
    String,
    StringMap,
    Url,
    Weight,
)
from perch.spec.vocabulary import (
    CONFIRM_WEBHOOK_TYPES,
    DEFAULT_CANARY_READY_THRESHOLD,
    DEFAULT_COOKIE_MAX_AGE,
    DEFAULT_INTERVAL,
    DEFAULT_MAX_WEIGHT,
    DEFAULT_ON_TIMEOUT,
    DEFAULT_PRIMARY_READY_THRESHOLD,
    DEFAULT_SEVERITY,
    DEFAULT_STEP_WEIGHT,
    DEFAULT_THRESHOLD,
    DEFAULT_WEBHOOK_TIMEOUT,
    DEFAULT_WEBHOOK_TYPE,
    ON_TIMEOUTS,
    SAME_SITES,
    SEVERITIES,
    WEBHOOK_TYPES,
    OnTimeout,
    SameSite,
    Severity,
    Strategy,
    WebhookType,
)

__all__ = ["AnalysisModel"]


class WebhookModel(SpecModel):
    """A gate or notification hook, called with Flagger's webhook payload."""

    name: Annotated[str, String()] = Field(
        description="The hook's name, in events and notifications."
    )
    type: Annotated[
        WebhookType, Choice(WEBHOOK_TYPES, "webhook type", empty=DEFAULT_WEBHOOK_TYPE)
    ] = Field(DEFAULT_WEBHOOK_TYPE, description="When it is called, and what its answer means.")
    url: Annotated[str, Url()] = Field(description="Where it is called (http or https).")
    timeout: Annotated[Duration | None, DurationValue()] = documented_default(
        DEFAULT_WEBHOOK_TIMEOUT, description="How long one call may take."
    )
    metadata: Annotated[FrozenDict[str] | None, StringMap()] = Field(
        None, description="Strings passed in the payload's metadata."
    )
    muteAlert: Annotated[bool, Boolean()] = Field(
        False, description="Its halts become events, not notifications."
    )
    retries: Annotated[int, Integer(0)] = Field(
        0, description="How many times a failed call is retried."
    )
    disableTLS: Annotated[bool, Boolean()] = Field(
        False, description="Do not verify the server's certificate."
    )
    maxWait: Annotated[Duration | None, DurationValue()] = Field(
        None,
        description=(
            "Confirm gates: how long the canary waits for approval, from when it was first "
            "asked; without it, for ever."
        ),
    )
    onTimeout: Annotated[OnTimeout, Choice(ON_TIMEOUTS, "onTimeout action")] = Field(
        DEFAULT_ON_TIMEOUT,
        description=(
            "Confirm gates with maxWait: what happens once maxWait has passed without approval."
        ),
    )

    @field_validator("maxWait", "onTimeout", mode="before")
    @classmethod
    def _confirm_gates_only(cls, value: Any, info: ValidationInfo) -> Any:
        hook_type = info.data.get("type")
        if hook_type is not None and hook_type not in CONFIRM_WEBHOOK_TYPES:
            raise Refusal(
                f"{info.field_name} only applies to confirm gates "
                f"({', '.join(CONFIRM_WEBHOOK_TYPES)}), not to type {hook_type}"
            )
        return value

    @field_validator("onTimeout")
    @classmethod
    def _after_max_wait(cls, value: OnTimeout, info: ValidationInfo) -> OnTimeout:
        if "maxWait" in info.data and info.data["maxWait"] is None:
            raise Refusal(
                "onTimeout needs maxWait: without maxWait a confirm gate waits for approval "
                "for ever"
            )
        return value

    def result(self) -> Webhook:
        timeout = self.timeout or Duration.of(DEFAULT_WEBHOOK_TIMEOUT)
        return Webhook(
            name=self.name,
            url=self.url,
            type=self.type,
            timeout=timeout.text,
            timeout_seconds=timeout.seconds,
            metadata=self.metadata or EMPTY,
            mute_alert=self.muteAlert,
            retries=self.retries,
            disable_tls=self.disableTLS,
            max_wait=None if self.maxWait is None else self.maxWait.text,
            max_wait_seconds=None if self.maxWait is None else self.maxWait.seconds,
            on_timeout=self.onTimeout,
        )


class AlertModel(SpecModel):
    """Notifications through an AlertProvider."""

    name: Annotated[str, String()] = Field(description="The alert's name.")
    severity: Annotated[Severity, Choice(SEVERITIES, "severity", empty=DEFAULT_SEVERITY)] = Field(
        DEFAULT_SEVERITY,
        description="info: every notification; warn: halts and failures; error: failures.",
    )
    providerRef: Annotated[RefModel, Required("required: the AlertProvider to notify")] = Field(
        description="The AlertProvider to notify."
    )

    def result(self) -> Alert:
        return Alert(name=self.name, provider_ref=self.providerRef.result(), severity=self.severity)


class SessionAffinityModel(SpecModel):
    """Flagger's cookies that keep a user on the version the weights sent them to."""

    cookieName: Annotated[
        str, String(COOKIE_NAME), Required("required: the cookie that keeps a user on the canary")
    ] = Field(description="The cookie that keeps a user on the canary for the whole analysis.")
    maxAge: Annotated[int, Integer(1)] = Field(
        DEFAULT_COOKIE_MAX_AGE, description="Its lifetime in seconds."
    )
    primaryCookieName: Annotated[str | None, String(COOKIE_NAME)] = Field(
        None, description="A cookie that keeps a user on the primary until the next step."
    )
    domain: Annotated[str | None, String(COOKIE_ATTRIBUTE)] = Field(
        None, description="The cookies' Domain attribute."
    )
    path: Annotated[str | None, String(COOKIE_ATTRIBUTE)] = documented_default(
        "/", description="The cookies' Path attribute."
    )
    sameSite: Annotated[SameSite | None, Choice(SAME_SITES, "sameSite", non_empty=True)] = Field(
        None, description="The cookies' SameSite attribute."
    )
    httpOnly: Annotated[bool, Boolean()] = Field(
        False, description="The cookies' HttpOnly attribute."
    )
    secure: Annotated[bool, Boolean()] = Field(False, description="The cookies' Secure attribute.")
    partitioned: Annotated[bool, Boolean()] = Field(
        False, description="The cookies' Partitioned attribute."
    )

    @field_validator("primaryCookieName")
    @classmethod
    def _two_cookies(cls, value: str, info: ValidationInfo) -> str:
        cookie = info.data.get("cookieName")
        if value == cookie:
            raise Refusal(
                f"must differ from cookieName {cookie}: one cookie keeps users on the canary, "
                "the other on the primary"
            )
        return value

    def result(self) -> SessionAffinity:
        return SessionAffinity(
            cookie_name=self.cookieName,
            max_age=self.maxAge,
            primary_cookie_name=self.primaryCookieName,
            domain=self.domain,
            path=self.path,
            same_site=self.sameSite,
            http_only=self.httpOnly,
            secure=self.secure,
            partitioned=self.partitioned,
        )


class AnalysisModel(SpecModel):
    """How the canary is analysed: the steps, and what is checked at each."""

    interval: Annotated[Duration | None, DurationValue()] = documented_default(
        DEFAULT_INTERVAL, description="The time between steps; at least 1s."
    )
    threshold: Annotated[int, Integer(1)] = Field(
        DEFAULT_THRESHOLD, description="Failed checks before the canary is rolled back."
    )
    maxWeight: Annotated[int | None, Weight()] = documented_default(
        DEFAULT_MAX_WEIGHT,
        description="The last step's canary weight (with stepWeights, default the last of them).",
    )
    stepWeight: Annotated[int | None, Weight()] = documented_default(
        DEFAULT_STEP_WEIGHT, description="The weight added at each step."
    )
    stepWeights: tuple[Annotated[int, Weight()], ...] = Field(
        (),
        validate_default=True,
        description="The weights of the steps, strictly increasing (instead of stepWeight).",
    )
    stepWeightPromotion: Annotated[int | None, Weight()] = Field(
        None, description="Shift traffic back to the promoted primary in steps of this size."
    )
    iterations: Annotated[int | None, Integer(1)] = Field(
        None,
        description=(
            "Without stepWeight or stepWeights: the passing iterations at weight 0 before "
            "promotion (A/B testing with match, blue/green without)."
        ),
    )
    mirror: Annotated[bool, Boolean()] = Field(
        False,
        description=(
            "Blue/green: copy live requests to the canary during the iterations (answers dropped)."
        ),
    )
    mirrorWeight: Annotated[int | None, Weight()] = Field(
        None, description="With mirror: the percentage of requests copied; default all."
    )
    primaryReadyThreshold: Annotated[int, Integer(0, 100)] = Field(
        DEFAULT_PRIMARY_READY_THRESHOLD,
        description="The percentage of the primary's pods that must be ready.",
    )
    canaryReadyThreshold: Annotated[int, Integer(0, 100)] = Field(
        DEFAULT_CANARY_READY_THRESHOLD,
        description="The percentage of the canary's pods that must be ready.",
    )
    match: tuple[Annotated[FrozenDict[JsonValue], FreeMap()], ...] = Field(
        (),
        description=(
            "A/B testing: Istio HTTPMatchRequests; a request matching any one goes to the canary."
        ),
    )
    metrics: tuple[MetricModel, ...] = Field((), description="The metric checks of each step.")
    webhooks: tuple[WebhookModel, ...] = Field((), description="Gates and hooks.")
    alerts: tuple[AlertModel, ...] = Field((), description="Notifications through AlertProviders.")
    sessionAffinity: SessionAffinityModel | None = Field(
        None, description="With weights only: keep a user on the side the weights sent them to."
    )

    @field_validator("interval")
    @classmethod
    def _at_least_a_second(cls, value: Duration) -> Duration:
        if value.seconds < 1:
            raise Refusal(f"must be at least 1s, got {value.text}")
        return value

    # stepWeights validates its default too, so that the weights are checked together, right
    # after the three of them are read, whether or not stepWeights is given.
    @field_validator("stepWeights")
    @classmethod
    def _steps(cls, weights: tuple[int, ...], info: ValidationInfo) -> tuple[int, ...]:
        if "maxWeight" not in info.data or "stepWeight" not in info.data:
            return weights  # already refused
        max_weight, step_weight = info.data["maxWeight"], info.data["stepWeight"]
        for index, weight in enumerate(weights):
            if index and weight <= weights[index - 1]:
                raise Refusal(
                    "stepWeights must increase strictly, but "
                    f"{weight} follows {weights[index - 1]}",
                    index,
                )
            if max_weight is not None and weight > max_weight:
                raise Refusal(f"step weight {weight} is more than maxWeight {max_weight}", index)
        if weights:
            return weights
        if step_weight is not None:
            if step_weight > (max_weight or DEFAULT_MAX_WEIGHT):
                suffix = "" if max_weight is not None else " (the default)"
                raise Refusal(
                    f"stepWeight {step_weight} is more than maxWeight "
                    f"{max_weight or DEFAULT_MAX_WEIGHT}{suffix}",
                    "stepWeight",
                    up=1,
                )
        elif max_weight is not None and max_weight < DEFAULT_STEP_WEIGHT:
            raise Refusal(
                f"maxWeight {max_weight} is less than stepWeight {DEFAULT_STEP_WEIGHT} "
                "(the default); set stepWeight too",
                "maxWeight",
                up=1,
            )
        return weights

    @field_validator("metrics")
    @classmethod
    def _distinct(cls, metrics: tuple[MetricModel, ...]) -> tuple[MetricModel, ...]:
        seen: dict[str, int] = {}
        for index, metric in enumerate(metrics):
            builtin = metric.builtin()
            name = builtin[0] if builtin else metric.name
            if name in seen:
                raise Refusal(
                    f"duplicate metric {name} (also {{also}})",
                    index,
                    "name",
                    also=(seen[name],),
                )
            seen[name] = index
        return metrics

    @property
    def strategy(self) -> Strategy:
        if self.stepWeights or self.stepWeight is not None or self.iterations is None:
            return "canary"
        return "ab-testing" if self.match else "blue-green"

    def result(self, path: str, warnings: list[str]) -> Analysis:
        if self.stepWeights and self.stepWeight is not None:
            warnings.append(
                f"perch.dev/spec: {path}.stepWeight has no effect: stepWeights sets the steps"
            )
        if (self.stepWeights or self.stepWeight is not None) and self.iterations is not None:
            warnings.append(
                f"perch.dev/spec: {path}.iterations has no effect with stepWeight or stepWeights"
            )
        metrics = tuple(
            metric.result(f"{path}.metrics[{index}]", warnings)
            for index, metric in enumerate(self.metrics)
        )
        interval = self.interval or Duration.of(DEFAULT_INTERVAL)
        max_weight = self.maxWeight or (self.stepWeights[-1] if self.stepWeights else None)
        return Analysis(
            interval=interval.text,
            interval_seconds=interval.seconds,
            threshold=self.threshold,
            max_weight=max_weight or DEFAULT_MAX_WEIGHT,
            step_weight=self.stepWeight or DEFAULT_STEP_WEIGHT,
            step_weights=self.stepWeights,
            step_weight_promotion=self.stepWeightPromotion,
            iterations=self.iterations,
            strategy=self.strategy,
            mirror=self.mirror,
            mirror_weight=self.mirrorWeight,
            primary_ready_threshold=self.primaryReadyThreshold,
            canary_ready_threshold=self.canaryReadyThreshold,
            match=self.match,
            metrics=metrics,
            webhooks=tuple(hook.result() for hook in self.webhooks),
            alerts=tuple(alert.result() for alert in self.alerts),
            session_affinity=None
            if self.sessionAffinity is None
            else self.sessionAffinity.result(),
        )

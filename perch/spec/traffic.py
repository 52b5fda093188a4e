"""What the analysis asks of the router: A/B match conditions, mirroring, session affinity.

These are checked with the whole spec in view, because what is possible depends on the provider
(Istio's VirtualService can say more than the Gateway API's HTTPRoute) and on the strategy the
analysis amounts to (weights, A/B testing or blue/green). A request the router cannot express is
refused here, naming the field, rather than by the API server when the analyzer writes the route,
or silently; a field that has no effect with the strategy is accepted with a warning.

Match conditions stay free-form (Flagger's, which are Istio's ``HTTPMatchRequest``), because the
routers copy or translate them as they are; only what each router cannot express is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Final, cast

from perch.spec.messages import Refusal, one_of, unknown_field, wrong_type
from perch.spec.result import FrozenDict, JsonValue
from perch.spec.values import HTTP_TOKEN, Pattern, check_integer, check_string
from perch.spec.vocabulary import GatewayApiVersion, Provider

if TYPE_CHECKING:
    from perch.spec.analysis import AnalysisModel

__all__ = ["check_traffic", "traffic_warnings"]

# Istio's HTTPMatchRequest, the shape of Flagger's match conditions.
_ISTIO_MATCH_FIELDS: Final = (
    "headers", "uri", "method", "queryParams", "sourceLabels", "authority", "scheme", "port",
    "gateways", "ignoreUriCase", "withoutHeaders", "sourceNamespace", "name", "statPrefix",
)  # fmt: skip
# What the Gateway API's HTTPRouteMatch can say of them (Perch translates these).
_GATEWAY_MATCH_FIELDS: Final = ("headers", "uri", "method", "queryParams")
_STRING_MATCH_KINDS: Final = ("exact", "prefix", "regex")
_HTTP_METHODS: Final = (
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
)  # fmt: skip
# Gateway API limit on the matches of one rule (analysis.match x service.match).
_GATEWAY_MAX_MATCHES: Final = 64

_Path = tuple[str | int, ...]


def _string(
    value: object, at: _Path, *, pattern: Pattern | None = None, allow_empty: bool = False
) -> str:
    """check_string, refusing at ``at`` (relative to the analysis)."""
    try:
        return check_string(value, pattern=pattern, allow_empty=allow_empty)
    except Refusal as refusal:
        raise Refusal(refusal.reason, *at) from None


def _string_match(value: object, at: _Path, *, kinds: tuple[str, ...], where: str) -> None:
    """One of Flagger's (Istio's) StringMatch: exactly one of exact, prefix, regex."""
    if not isinstance(value, Mapping):
        raise wrong_type(f"a mapping with one of {', '.join(kinds)}", value, *at)
    if len(value) != 1:
        raise Refusal(f"give exactly one of {', '.join(kinds)}", *at)
    ((kind, text),) = value.items()
    if kind not in _STRING_MATCH_KINDS:
        raise Refusal(one_of(kind, kinds, "match kind"), *at, kind)
    if kind not in kinds:
        hint = "; write it as a regex, e.g. '^value.*'" if kind == "prefix" else ""
        raise Refusal(f"{where} has no {kind} match (only {', '.join(kinds)}){hint}", *at, kind)
    _string(text, (*at, kind))


def _name_matches(
    value: object, at: _Path, *, kinds: tuple[str, ...], where: str, provider: Provider
) -> None:
    """headers, queryParams, withoutHeaders: a mapping of names to string matches."""
    if not isinstance(value, Mapping) or not value:
        raise wrong_type("a mapping of names to matches", value, *at)
    for name, match in value.items():
        here = (*at, name)
        if provider == "gatewayapi":
            _string(name, here, pattern=HTTP_TOKEN)
        elif at[-1] in ("headers", "withoutHeaders") and name != name.lower():
            # Istio refuses (or never matches) upper-case header names.
            raise Refusal(f"Istio matches header names in lower case: write {name.lower()}", *here)
        _string_match(match, here, kinds=kinds, where=where)


def _check_match(items: tuple[FrozenDict[JsonValue], ...], *, provider: Provider) -> None:
    """Refuses a match condition the provider's route cannot express, naming the field."""
    gateway = provider == "gatewayapi"
    router = "the Gateway API's" if gateway else "Istio's"
    known = _GATEWAY_MATCH_FIELDS if gateway else _ISTIO_MATCH_FIELDS
    for index, item in enumerate(items):
        if not item:
            raise Refusal(
                "an empty match condition matches every request; give headers, uri, "
                "method or queryParams", "match", index,
            )  # fmt: skip
        for key, value in item.items():
            at: _Path = ("match", index, key)
            if key not in known:
                if gateway and key in _ISTIO_MATCH_FIELDS:
                    raise Refusal(
                        f"the Gateway API cannot match on {key} (Istio can); with provider "
                        f"gatewayapi a match has {', '.join(_GATEWAY_MATCH_FIELDS)}",
                        *at,
                    )
                raise Refusal(unknown_field(key, known), *at)
            if key in ("headers", "withoutHeaders"):
                kinds = ("exact", "regex") if gateway else _STRING_MATCH_KINDS
                _name_matches(
                    value, at, kinds=kinds, where=f"{router} header match", provider=provider
                )
            elif key == "queryParams":
                # Istio has no prefix match for query parameters either.
                _name_matches(
                    value,
                    at,
                    kinds=("exact", "regex"),
                    where=f"{router} query parameter match",
                    provider=provider,
                )
            elif key == "method" and gateway:
                _string_match(value, at, kinds=("exact",), where="the Gateway API's method match")
                method = cast(Mapping[str, str], value)["exact"]
                if method not in _HTTP_METHODS:
                    raise Refusal(one_of(method, _HTTP_METHODS, "method"), *at, "exact")
            elif key in ("uri", "scheme", "method", "authority"):
                _string_match(value, at, kinds=_STRING_MATCH_KINDS, where=f"{router} {key} match")
                kind, uri = next(iter(cast(Mapping[str, str], value).items()))
                if gateway and kind != "regex" and not uri.startswith("/"):
                    raise Refusal(f"a Gateway API path starts with '/', got {uri!r}", *at, kind)
            elif key == "sourceLabels":
                if not isinstance(value, Mapping) or not value:
                    raise wrong_type("a mapping of label names to values", value, *at)
                for label, label_value in value.items():
                    _string(label_value, (*at, label), allow_empty=True)
            elif key == "gateways":
                if not isinstance(value, tuple):
                    raise wrong_type("a list", value, *at)
                for i, gateway_name in enumerate(value):
                    _string(gateway_name, (*at, i))
            elif key == "port":
                try:
                    check_integer(value, minimum=1, maximum=65535)
                except Refusal as refusal:
                    raise Refusal(refusal.reason, *at) from None
            elif key == "ignoreUriCase":
                if not isinstance(value, bool):
                    raise wrong_type("a boolean (true or false)", value, *at)
            else:
                _string(value, at)


def check_traffic(
    analysis: AnalysisModel,
    *,
    provider: Provider,
    gateway_api_version: GatewayApiVersion | None,
    service_matches: int,
) -> None:
    """Refuses what the strategy has no use for or the provider's route cannot express.

    Refusals name fields of the analysis (``Refusal(reason, "mirror")``); ``service_matches`` is
    the number of ``service.match`` conditions, which multiply the A/B conditions in a route.
    """
    strategy = analysis.strategy
    if analysis.match:
        _check_match(analysis.match, provider=provider)
        if strategy == "ab-testing" and provider == "gatewayapi":
            count = len(analysis.match) * max(1, service_matches)
            if count > _GATEWAY_MAX_MATCHES:
                raise Refusal(
                    f"{len(analysis.match)} conditions for each of the {service_matches} of "
                    f"service.match make {count} matches; an HTTPRoute rule takes at most "
                    f"{_GATEWAY_MAX_MATCHES}",
                    "match",
                )
    if analysis.mirror:
        if strategy != "blue-green":
            why = (
                "with match it is A/B testing, where the matching requests themselves go to "
                "the canary"
                if strategy == "ab-testing"
                else "with weights the canary gets live traffic from its first step"
            )
            raise Refusal(
                "mirroring runs during blue/green iterations (iterations without match, "
                f"stepWeight or stepWeights); {why}",
                "mirror",
            )
        if gateway_api_version == "v1beta1" and analysis.mirrorWeight is not None:
            raise Refusal(
                "the RequestMirror filter of the Gateway API's v1beta1 releases has no percent "
                "(it mirrors every request); use provider gatewayapi:v1 (Gateway API v1.3 or "
                "later) or leave mirrorWeight out",
                "mirrorWeight",
            )
    if analysis.sessionAffinity is not None and strategy != "canary":
        raise Refusal(
            "session affinity keeps users on the side the weighted split sent them to, so it "
            "goes with stepWeight or stepWeights; with iterations the canary gets all the "
            "traffic at once (blue/green) or exactly the requests analysis.match selects (A/B "
            "testing)",
            "sessionAffinity",
        )


def traffic_warnings(analysis: AnalysisModel, path: str) -> list[str]:
    """Traffic fields accepted without effect for the strategy, as admission warnings."""
    warnings = []
    if analysis.match and analysis.strategy != "ab-testing":
        warnings.append(
            f"perch.dev/spec: {path}.match has no effect without iterations: A/B "
            "testing is iterations with match, and no stepWeight or stepWeights"
        )
    if not analysis.mirror and analysis.mirrorWeight is not None:
        warnings.append(f"perch.dev/spec: {path}.mirrorWeight has no effect without mirror: true")
    return warnings

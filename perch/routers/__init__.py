"""Routers: the objects that split a host's traffic between primary and canary, by provider."""

from __future__ import annotations

from perch.routers.base import Router, RouteRef, RouteTarget
from perch.routers.gatewayapi import GatewayAPIRouter
from perch.routers.istio import IstioRouter

ROUTERS: dict[str, Router] = {"istio": IstioRouter(), "gatewayapi": GatewayAPIRouter()}


def router_for(provider: str) -> Router:
    try:
        return ROUTERS[provider]
    except KeyError:
        known = ", ".join(sorted(ROUTERS))
        raise ValueError(f"unknown provider {provider!r}; known: {known}") from None


__all__ = [
    "ROUTERS",
    "GatewayAPIRouter",
    "IstioRouter",
    "RouteRef",
    "RouteTarget",
    "Router",
    "router_for",
]

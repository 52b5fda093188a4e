"""Least privilege, proven by the real authorizer and read back from the API server's audit log.

Every test of the cluster tier runs the webhook and the analyzer with the chart's ServiceAccounts
(tokens from the TokenRequest API) and RBAC, rendered from the chart and applied. After all of
them, this test reads what each identity did from the audit log (kube-up writes one) and compares
it with the chart's rules both ways: every call was granted and none was refused (403), and every
rule the chart grants was used by some call, so the chart grants nothing the code does not need.
"""

from __future__ import annotations

from collections import Counter

import pytest

from tests.support.chart import Access, Use
from tests.support.controlplane import ControlPlane
from tests.support.install import Identity, Installed

pytestmark = pytest.mark.after_cluster_tier

# Granted but not reached by the cluster tier, each with why it is kept.
_ADOPTER = (
    "the webhook deletes the routes it made for a CREATE that a later admission plugin refused "
    "(webhook.effects.Adopter); test_admission.py shows it for the VirtualService, and the code "
    "is the same for every route kind the provider makes"
)
NOT_EXERCISED: dict[tuple[str, str, str, str], str] = {
    ("webhook", "networking.istio.io", "destinationrules", "delete"): _ADOPTER,
    ("webhook", "gateway.networking.k8s.io", "httproutes", "delete"): _ADOPTER,
}
# Calls the tier makes on purpose to show the chart refuses them: (identity, group, resource,
# verb, name) → the test that makes it.
REFUSED_ON_PURPOSE = {
    ("analyzer", "coordination.k8s.io", "leases", "get", "perch-analyzer-other"): (
        "test_leases.py: the analyzer may elect only on its own Lease name"
    ),
}


def uses_of(plane: ControlPlane, identity: Identity) -> tuple[list[Use], Counter[int]]:
    uses: list[Use] = []
    codes: Counter[int] = Counter()
    for event in plane.audit_events():
        if (event.get("user") or {}).get("username") != identity.username:
            continue
        ref = event.get("objectRef")
        if not ref:
            continue  # discovery, /version
        codes[int((event.get("responseStatus") or {}).get("code") or 0)] += 1
        resource = ref["resource"] + (f"/{ref['subresource']}" if ref.get("subresource") else "")
        uses.append(
            Use(
                ref.get("apiGroup", ""),
                resource,
                event["verb"],
                ref.get("namespace"),
                ref.get("name"),
            )
        )
    return uses, codes


def test_each_identity_used_exactly_what_the_chart_grants_it(
    plane: ControlPlane, installed: Installed
) -> None:
    if plane.audit_log is None:
        pytest.skip("the cluster was not started by this session: no audit log to read")
    release = installed.release
    unused: list[tuple[str, str, str, str]] = []
    for component, identity in (("webhook", installed.webhook), ("analyzer", installed.analyzer)):
        uses, codes = uses_of(plane, identity)
        assert uses, f"the audit log has no call by {identity.username}"
        access = Access(
            release, service_account=identity.service_account, namespace=identity.namespace
        )
        # Every call the code made was granted, and the authorizer refused none but those the
        # tier makes on purpose.
        denied = sorted(
            {
                u
                for u in uses
                if not access.allows(u)
                and (component, u.group, u.resource, u.verb, u.name) not in REFUSED_ON_PURPOSE
            }
        )
        assert denied == [], f"{component} made calls the chart does not grant: {denied}"
        on_purpose = sum(
            1
            for u in uses
            if (component, u.group, u.resource, u.verb, u.name) in REFUSED_ON_PURPOSE
        )
        assert codes[403] == on_purpose, f"{component}: {codes[403]} calls refused"
        # Every rule was needed.
        for grant in access.grants:
            used = any(grant.allows(u) for u in uses)
            key = (component, grant.group, grant.resource, grant.verb)
            if not used and key not in NOT_EXERCISED:
                unused.append(key)
    assert sorted(set(unused)) == [], "granted by the chart but never used by the code"

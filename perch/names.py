"""Names Perch reads and writes: annotations, labels, object names.

Kept in one module so that the webhook, the analyzer, the chart and the docs agree on every key.
"""

from __future__ import annotations

GROUP = "perch.dev"
CANARY_API_VERSION = "perch.dev/v1alpha1"
CANARY_KIND = "Canary"
CANARY_PLURAL = "canaries"

# Opt-in and configuration, set by the user on the primary Deployment.
ANNOTATION_ENABLED = "perch.dev/enabled"
ANNOTATION_SPEC = "perch.dev/spec"
# Control without editing the git-owned spec; the analyzer acts on it and clears it.
ANNOTATION_ACTION = "perch.dev/action"

# Bookkeeping Perch writes on the primary through the admission patch.
# The revision of the template the primary actually runs (the stable one).
ANNOTATION_REVISION = "perch.dev/revision"
# The revision the user asked for and Perch holds back while it is analysed (or after it failed).
# A later admission plugin may reject the request after Perch answered: then this annotation never
# lands, which is how the analyzer tells an admitted release from an orphaned canary.
ANNOTATION_CANARY_REVISION = "perch.dev/canary-revision"
# The analyzer's promotion mark: set together with the canary template when it promotes.
ANNOTATION_PROMOTED_REVISION = "perch.dev/promoted-revision"

# kubectl rollout restart stamps this annotation on the pod template.
RESTARTED_AT_ANNOTATION = "kubectl.kubernetes.io/restartedAt"

LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY_VALUE = "perch"
LABEL_TRACK = "perch.dev/track"
TRACK_CANARY = "canary"
# On objects Perch made before the primary had a uid (admission of a CREATE): names the primary so
# that they can be adopted (given an ownerReference) once it exists.
LABEL_TARGET = "perch.dev/target"

CANARY_SUFFIX = "-canary"
PRIMARY_SUFFIX = "-primary"


def canary_name(primary: str) -> str:
    """Name of the canary Deployment, Service and HPA for a primary."""
    return primary + CANARY_SUFFIX


def is_opted_in(annotations: dict[str, str] | None) -> bool:
    # Exactly "true", as the registration's matchConditions test it, so both agree on who is in.
    return (annotations or {}).get(ANNOTATION_ENABLED) == "true"


def json_pointer(*parts: str) -> str:
    """A JSON Pointer (RFC 6901) from raw keys: `perch.dev/spec` becomes `perch.dev~1spec`."""
    return "".join("/" + p.replace("~", "~0").replace("/", "~1") for p in parts)

"""The checks admission applies to an opted-in Deployment's `perch.dev/spec`, and their wording.

The webhook denies a release whose spec fails them; `kubectl perch validate` runs the very same
checks offline, so that a manifest that validates in CI is one the webhook admits, and one that
does not gets the message kubectl would print. Pure: no I/O.
"""

from __future__ import annotations

from perch.spec import CanarySpec, SpecError
from perch.speccache import cached_parse_spec


def check_spec(text: str | None, *, deployment: str) -> CanarySpec:
    """The parsed spec of the Deployment named `deployment`; SpecError names what is wrong.

    Beyond parsing: a `targetRef` (accepted for Flagger users moving a Canary's spec over) must
    name the Deployment the annotation is on.
    """
    spec = cached_parse_spec(text)
    if spec.target_ref is not None and spec.target_ref.name != deployment:
        raise SpecError(
            "targetRef.name", f"names {spec.target_ref.name!r}, but this is {deployment!r}"
        )
    return spec


def denial_message(err: SpecError) -> str:
    """The admission denial, as kubectl prints it after "denied the request: "."""
    return f"perch: invalid {err}"


def spec_warnings(spec: CanarySpec) -> tuple[str, ...]:
    """The admission warnings about the spec itself (kubectl prints each after "Warning: ")."""
    return tuple(f"perch: {w}" for w in spec.warnings)

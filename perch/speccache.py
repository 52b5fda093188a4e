"""parse_spec with a cache: the spec is pure and immutable, and the same annotation text is parsed
on every admission and every tick of a canary; the YAML loader costs milliseconds each time."""

from __future__ import annotations

import functools

from perch.spec import CanarySpec, parse_spec

# Bounded: a spec is at most 64 KiB, so the cache holds at most 16 MiB of text.
MAX_CACHED_SPECS = 256


@functools.lru_cache(maxsize=MAX_CACHED_SPECS)
def cached_parse_spec(text: str | None) -> CanarySpec:
    """As perch.spec.parse_spec; a SpecError is raised again each time (errors are not cached)."""
    return parse_spec(text)

"""Prometheus-style durations: ``30s``, ``1m30s``, ``500ms``, ``2h``; a bare integer is seconds.

One syntax for every duration in the spec (analysis and metric intervals, webhook and route
timeouts), because metric intervals are rendered into PromQL range selectors
(``[{{ interval }}]``) and must be valid PromQL. Go's ``time.ParseDuration`` (which Flagger uses
for some fields) also takes fractions (``1.5s``); those are refused with a hint to write
``1500ms`` instead, so that a value that passes here is valid in PromQL, in Istio and (through
:func:`format_duration`) in the Gateway API.

Pure: no I/O, no imports beyond the standard library.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = [
    "DURATION_UNITS",
    "DurationError",
    "format_duration",
    "is_prometheus_duration",
    "parse_duration",
]

# Seconds per unit, largest first: components must appear in this order, as in Prometheus.
DURATION_UNITS: Final[dict[str, float]] = {
    "y": 365 * 86400.0,
    "w": 7 * 86400.0,
    "d": 86400.0,
    "h": 3600.0,
    "m": 60.0,
    "s": 1.0,
    "ms": 0.001,
}

# At most 12 digits per component: far beyond any sensible duration, and it keeps int() and float()
# away from pathological inputs (Python refuses to parse ints of more than 4300 digits).
_NUMBER = r"[0-9]{1,12}"
_PROMETHEUS = re.compile("".join(f"(?:(?P<{unit}>{_NUMBER}){unit})?" for unit in DURATION_UNITS))
_BARE_SECONDS = re.compile(_NUMBER)
_COMPONENT = re.compile(r"([0-9]+(?:\.[0-9]*)?)([a-zA-Zµ]*)")

_EXAMPLES = "e.g. 30s, 1m30s, 500ms or 2h"


class DurationError(ValueError):
    """A duration that is not a non-negative Prometheus-style duration; str() says why."""


def is_prometheus_duration(text: str) -> bool:
    """True when ``text`` is a valid PromQL duration with a unit (so not a bare number)."""
    return bool(text) and _PROMETHEUS.fullmatch(text) is not None


def parse_duration(text: str | int) -> float:
    """Parse a duration into seconds.

    Accepts Prometheus syntax (``y w d h m s ms``, largest unit first, whole numbers, e.g.
    ``1h30m``, ``1m30s``, ``250ms``), and a bare non-negative integer (as ``int`` or as digits in
    a string) meaning seconds. Raises :class:`DurationError` with the reason otherwise.
    """
    if isinstance(text, bool) or not isinstance(text, (str, int)):
        raise DurationError(f"expected a duration ({_EXAMPLES}), got {type(text).__name__}")
    if isinstance(text, int):
        if text < 0:
            raise DurationError(f"negative duration {text}: a duration must be 0 or more")
        if text > 10**12:
            raise DurationError(f"duration {text} is too large")
        return float(text)
    value = text.strip()
    if not value:
        raise DurationError(f"empty duration; expected a duration ({_EXAMPLES})")
    if _BARE_SECONDS.fullmatch(value):
        return float(int(value))
    match = _PROMETHEUS.fullmatch(value)
    if match is not None:
        return sum(
            int(amount) * DURATION_UNITS[unit]
            for unit, amount in match.groupdict().items()
            if amount is not None
        )
    raise DurationError(_explain(value))


def _explain(value: str) -> str:
    """Say what is wrong with a duration that did not parse, as precisely as cheaply possible."""
    shown = value if len(value) <= 40 else value[:37] + "..."
    if value.startswith("-"):
        return f'negative duration "{shown}": a duration must be 0 or more'
    components = _COMPONENT.findall(value)
    if "".join(number + unit for number, unit in components) == value:
        units = [unit for _, unit in components]
        for number, unit in components:
            if "." in number:
                return (
                    f'invalid duration "{shown}": use whole numbers of a unit '
                    f"(e.g. 1500ms instead of 1.5s, 1m30s instead of 1.5m)"
                )
            if unit not in DURATION_UNITS:
                return (
                    f'invalid duration "{shown}": unknown unit "{unit}"; '
                    f"the units are {', '.join(DURATION_UNITS)}"
                )
            if len(number) > 12:
                return f'invalid duration "{shown}": the number is too large'
        order = list(DURATION_UNITS)
        positions = [order.index(unit) for unit in units]
        if positions != sorted(set(positions)):
            return (
                f'invalid duration "{shown}": give each unit once, '
                f"largest first (e.g. 1h30m, 1m30s)"
            )
    return f'invalid duration "{shown}": expected a Prometheus-style duration ({_EXAMPLES})'


def format_duration(seconds: float) -> str:
    """Render seconds as a duration in h, m, s and ms only, e.g. ``90`` -> ``"1m30s"``.

    The result is valid in PromQL, in Istio and in the Gateway API (GEP-2257 allows only h, m, s
    and ms). Sub-millisecond parts are rounded to the nearest millisecond; 0 is ``"0s"``.
    """
    if seconds < 0:
        raise DurationError(f"negative duration {seconds}: a duration must be 0 or more")
    millis = round(seconds * 1000)
    if millis == 0:
        return "0s"
    parts: list[str] = []
    for unit, size in (("h", 3_600_000), ("m", 60_000), ("s", 1_000), ("ms", 1)):
        amount, millis = divmod(millis, size)
        if amount:
            parts.append(f"{amount}{unit}")
    return "".join(parts)

"""How `kubectl perch` prints: colour as the terminal allows, tables, numbers and durations.

Colour follows the usual rules of command-line tools: only when the output is a terminal, never
when NO_COLOR is set to anything but "" (https://no-color.org), nor on TERM=dumb. Colour only
underlines what the words already say, so nothing is lost without it. Pure: no I/O.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TextIO

import yaml

Tone = Literal["good", "bad", "warn", "active", "muted", "strong", ""]

_SGR: dict[str, str] = {
    "good": "32",  # green
    "bad": "31",  # red
    "warn": "33",  # yellow
    "active": "36",  # cyan
    "muted": "2",  # dim
    "strong": "1",  # bold
}
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def colour_wanted(stream: TextIO, env: Mapping[str, str]) -> bool:
    """Whether to colour what goes to `stream`: a terminal, and neither NO_COLOR nor TERM=dumb."""
    if env.get("NO_COLOR", "") != "" or env.get("TERM") == "dumb":
        return False
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


@dataclass(frozen=True, slots=True)
class Style:
    colour: bool = False

    def __call__(self, text: str, tone: Tone) -> str:
        if not self.colour or not tone or not text:
            return text
        return f"\x1b[{_SGR[tone]}m{text}\x1b[0m"


def visible_len(text: str) -> int:
    return len(_ANSI.sub("", text))


def table(rows: Sequence[Sequence[str]], *, indent: str = "", gap: str = "   ") -> list[str]:
    """Left-aligned columns as wide as their widest (visible) cell; trailing blanks dropped."""
    if not rows:
        return []
    widths = [max(visible_len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [c + " " * (w - visible_len(c)) for c, w in zip(row, widths, strict=True)]
        lines.append((indent + gap.join(cells)).rstrip())
    return lines


def fields(pairs: Sequence[tuple[str, str]], *, width: int = 0) -> list[str]:
    """`Label:  value` lines with the values aligned, as kubectl describe prints them."""
    width = width or max((len(label) for label, _ in pairs), default=0) + 3
    return [f"{label + ':':<{width}}{value}".rstrip() for label, value in pairs]


def number(value: float) -> str:
    """At most two decimals, no trailing zeros: 99.87, 99.5, 500."""
    if not math.isfinite(value):
        return str(value)
    text = f"{value:.2f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def milliseconds(ms: float) -> str:
    """1.515s from 1515, 412ms from 412 (as the analyzer's events word durations)."""
    if abs(ms) >= 1000:
        return f"{ms / 1000:.3f}s"
    return f"{number(ms)}ms"


def duration(seconds: float) -> str:
    """A short age as kubectl prints one: 42s, 3m12s, 2h5m, 3d4h."""
    total = max(0, int(seconds))
    if total < 60:
        return f"{total}s"
    minutes, secs = divmod(total, 60)
    if minutes < 60:
        return f"{minutes}m{secs}s" if secs else f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes}m" if minutes else f"{hours}h"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours}h" if hours else f"{days}d"


def dump(data: Any, output: Literal["json", "yaml"]) -> str:
    """For -o json|yaml: as kubectl prints objects (JSON indented by 4, YAML in block style)."""
    if output == "json":
        return json.dumps(data, indent=4, ensure_ascii=False)
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False)

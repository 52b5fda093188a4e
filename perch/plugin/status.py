"""`kubectl perch status`: the table of canaries, one release at a glance, and following it live.

`status -w NAME` watches the one Canary object (a field-selected watch, resumed from the last
resourceVersion it saw, re-read after a 410) and redraws the view at every change of its status,
until the release ends: Succeeded, Failed, or Terminated (opted out).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from perch.plugin.glance import DONE_PHASES
from perch.plugin.render import Style, table, visible_len
from perch.resources import resource_version
from perch.status import CanaryStatus

COLUMNS = (
    "NAMESPACE",
    "NAME",
    "STATUS",
    "WEIGHT",
    "FAILEDCHECKS",
    "REVISION",
    "LASTTRANSITIONTIME",
)
# A dropped connection is retried this many times in a row, a second apart, before giving up.
MAX_WATCH_RETRIES = 5


def status_rows(canaries: Sequence[Mapping[str, Any]]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = [COLUMNS]
    for obj in sorted(canaries, key=lambda o: (o["metadata"]["namespace"], o["metadata"]["name"])):
        s = CanaryStatus.from_wire(obj.get("status"))
        rows.append(
            (
                obj["metadata"]["namespace"],
                obj["metadata"]["name"],
                s.phase + (" (paused)" if s.paused else ""),
                str(s.canary_weight),
                str(s.failed_checks),
                s.canary_revision or "-",
                s.last_transition_time or "-",
            )
        )
    return rows


def status_table(canaries: Sequence[Mapping[str, Any]], style: Style | None = None) -> str:
    style = style or Style()
    rows = status_rows(canaries)
    header, body = rows[0], rows[1:]
    return "\n".join(table([tuple(style(c, "strong") for c in header), *body]))


def phase_of(canary: Mapping[str, Any]) -> str:
    return CanaryStatus.from_wire(canary.get("status")).phase


# --------------------------------------------------------------------------------------------
# Following one release
# --------------------------------------------------------------------------------------------


class Gone(Exception):
    """The Canary object was deleted while it was followed."""


def follow(
    first: Mapping[str, Any],
    *,
    watch: Callable[[str], Iterable[Mapping[str, Any]]],
    reread: Callable[[], Mapping[str, Any] | None],
    changed: Callable[[Mapping[str, Any]], None],
    sleep: Callable[[float], None] = time.sleep,
) -> Mapping[str, Any]:
    """Follow the Canary `first` until its phase ends a release; returns it then.

    ``watch(resource_version)`` yields watch events (``type``, ``object``) from there on and
    ends when the server closes the watch; ``reread()`` GETs the object (None: not found).
    ``changed(obj)`` is called for each version whose status differs from the last one shown.
    Raises Gone when the object is deleted.
    """
    current = first
    version = resource_version(first)
    retries = 0
    while phase_of(current) not in DONE_PHASES:
        try:
            for event in watch(version):
                kind, obj = event.get("type"), event.get("object") or {}
                version = resource_version(obj) or version
                if kind == "DELETED":
                    raise Gone()
                if kind not in ("ADDED", "MODIFIED"):
                    continue  # BOOKMARK: only the resourceVersion moves on
                retries = 0
                if obj.get("status") != current.get("status"):
                    current = obj
                    changed(obj)
                if phase_of(current) in DONE_PHASES:
                    return current
        except ApiException as exc:
            if exc.status != 410:
                raise
            # Expired: the resourceVersion is too old to resume from; start from the present.
            found = reread()
            if found is None:
                raise Gone() from exc
            version = resource_version(found)
            if found.get("status") != current.get("status"):
                current = found
                changed(found)
        except (HTTPError, OSError):
            retries += 1
            if retries > MAX_WATCH_RETRIES:
                raise
            sleep(1.0)
    return current


@dataclass
class Screen:
    """Shows successive versions of a view: redrawn in place on a terminal, one after another
    (a blank line apart) otherwise, as in a CI log."""

    out: TextIO
    terminal: bool
    columns: int = 80
    _rows: int = field(default=0, init=False)

    def show(self, text: str) -> None:
        if self.terminal and self._rows:
            # Up to the first line of the last view, and clear from there down.
            self.out.write(f"\x1b[{self._rows}F\x1b[J")
        elif self._rows:
            self.out.write("\n")
        self.out.write(text + "\n")
        self.out.flush()
        width = max(self.columns, 1)
        self._rows = sum(max(1, -(-visible_len(line) // width)) for line in text.split("\n"))

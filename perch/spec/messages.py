"""What a refusal says: the error type, field paths, how values are described, typo suggestions.

Every refusal names the field and the reason (``perch.dev/spec: analysis.stepWeight: stepWeight
60 is more than maxWeight 50``), because it reaches the user as an admission denial that has to
be understood without Perch's source at hand. The wording lives here, in one place, so that the
loaders, the value types and the models say things the same way:

* a value of the wrong type is described as the user wrote it ("got the string \"9898\"", "got a
  boolean (true)"), with a hint for YAML's usual traps: unquoted ``yes``/``on`` are booleans, a
  quoted number is a string;
* an unknown field or value gets a suggestion when one is close ("did you mean stepWeight?"),
  otherwise the list of what is allowed there.

Validation runs in pydantic (see :mod:`perch.spec.models`); a validator refuses by raising
:class:`Refusal`, which pydantic records with its location, and :func:`spec_error` turns the first
error pydantic reports into the :class:`SpecError` the rest of Perch sees.
"""

from __future__ import annotations

import difflib
import json
import re
import types
import typing
from collections.abc import Iterable, Sequence
from typing import Any, Final

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from perch.names import ANNOTATION_SPEC

__all__ = [
    "BOOLEAN_HINT",
    "Refusal",
    "Required",
    "SpecError",
    "describe",
    "item_path",
    "join_path",
    "key_path",
    "one_of",
    "short",
    "spec_error",
    "suggest",
    "type_reason",
    "unknown_field",
    "wrong_type",
]


class SpecError(ValueError):
    """The annotation does not parse or validate.

    ``path`` names the field (``analysis.metrics[1].thresholdRange``; empty for the document as a
    whole) and ``reason`` says what is wrong; ``str()`` is the message for the admission denial,
    e.g. ``perch.dev/spec: analysis.stepWeight: stepWeight 60 is more than maxWeight 50``.
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(path, reason)
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        if self.path:
            return f"{ANNOTATION_SPEC}: {self.path}: {self.reason}"
        return f"{ANNOTATION_SPEC}: {self.reason}"


# --------------------------------------------------------------------------------------------
# Paths: analysis.metrics[1].thresholdRange.min, metadata["my key"]
# --------------------------------------------------------------------------------------------

_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


def key_path(path: str, key: str) -> str:
    """``path.key``; a key that is not a plain name is quoted: ``path["my key"]``."""
    if _PLAIN_KEY.fullmatch(key):
        return f"{path}.{key}" if path else key
    return f"{path}[{json.dumps(key)}]"


def item_path(path: str, index: int) -> str:
    return f"{path}[{index}]"


def join_path(path: str, parts: Iterable[str | int]) -> str:
    for part in parts:
        path = item_path(path, part) if isinstance(part, int) else key_path(path, part)
    return path


# --------------------------------------------------------------------------------------------
# Values as the user wrote them
# --------------------------------------------------------------------------------------------


def short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({'true' if value else 'false'})"
    if isinstance(value, (int, float)):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the string {json.dumps(short(value))}"
    if isinstance(value, (list, tuple)):
        return "a list"
    return "a mapping"


BOOLEAN_HINT: Final = "; note that YAML reads unquoted yes, no, on, off, true and false as booleans"


def type_reason(expected: str, value: object) -> str:
    """``expected <expected>, got <value>``, with a hint when the cause is a YAML habit."""
    reason = f"expected {expected}, got {describe(value)}"
    if isinstance(value, bool):
        reason += BOOLEAN_HINT
        if expected.startswith("a string"):
            reason += ", so quote the value"
    elif isinstance(value, str) and expected.startswith(("an integer", "a number")):
        try:
            float(value)
        except ValueError:
            pass
        else:
            reason += "; write numbers without quotes"
    elif isinstance(value, (int, float)) and expected.startswith("a string"):
        reason += "; quote the value"
    return reason


# --------------------------------------------------------------------------------------------
# Suggestions
# --------------------------------------------------------------------------------------------


def _normalised(name: str) -> str:
    return name.replace("_", "").replace("-", "").lower()


def suggest(word: str, candidates: Iterable[str]) -> str | None:
    """The candidate the user probably meant: same up to case and ``_``/``-``, or close."""
    options = list(candidates)
    for option in options:
        if _normalised(option) == _normalised(word):
            return option
    by_lower = {option.lower(): option for option in options}
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=0.75)
    return by_lower[close[0]] if close else None


def one_of(value: str, options: Iterable[str], what: str) -> str:
    """``unknown <what> "<value>"; did you mean <option>? (one of: ...)``."""
    options = list(options)
    reason = f"unknown {what} {json.dumps(short(value))}"
    suggestion = suggest(value, options)
    if suggestion is not None:
        reason += f"; did you mean {suggestion}?"
    return reason + f" (one of: {', '.join(options)})"


def unknown_field(key: str, known: Sequence[str]) -> str:
    """``unknown field "<key>"``, with the field meant or else the fields there are."""
    reason = f"unknown field {json.dumps(short(key))}"
    suggestion = suggest(key, known)
    if suggestion is not None:
        return reason + f"; did you mean {suggestion}?"
    return reason + f"; the fields here are {', '.join(known)}"


# --------------------------------------------------------------------------------------------
# Refusing inside pydantic, and what comes out of it
# --------------------------------------------------------------------------------------------


class Refusal(ValueError):
    """A reason to refuse a value, raised inside the loaders and the validators.

    Pydantic records a ValueError raised in a validator with the location it was validating and
    keeps the exception (``ctx["error"]``), so the reason arrives word for word. The path is that
    location, less ``up`` trailing parts, plus ``at``: a value validator refuses its own field
    (``Refusal(reason)``), a model validator one of its fields (``Refusal(reason, "stepWeight")``),
    and a field validator, whose location is its field, a sibling (``Refusal(reason,
    "minReplicas", up=1)``). ``also``, relative in the same way, fills ``{also}`` in the reason
    with a full path (e.g. the first of two metrics with the same name).
    """

    def __init__(
        self,
        reason: str,
        *at: str | int,
        up: int = 0,
        also: tuple[str | int, ...] | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.at = at
        self.up = up
        self.also = also

    def spec_error(self, location: Sequence[str | int]) -> SpecError:
        base = join_path("", location[: len(location) - self.up])
        reason = self.reason
        if self.also is not None:
            reason = reason.replace("{also}", join_path(base, self.also))
        return SpecError(join_path(base, self.at), reason)


def wrong_type(expected: str, value: object, *at: str | int) -> Refusal:
    return Refusal(type_reason(expected, value), *at)


class Required:
    """Annotated metadata: what a missing required field's refusal says (default "required").

    ``at`` names the field the refusal is about when it is inside the missing one: a missing
    ``service`` is refused as a missing ``service.port``, the field that has no default.
    """

    __slots__ = ("at", "reason")

    def __init__(self, reason: str = "required", *at: str) -> None:
        self.reason = reason
        self.at = at


def spec_error(error: ValidationError, model: type[BaseModel]) -> SpecError:
    """The first error pydantic reports, as a SpecError.

    Pydantic validates fields in the order the models declare them and reports errors in that
    order, nested ones depth first; the first is the one a reader meets first in the document's
    field order.
    """
    first = error.errors(include_url=False)[0]
    location: tuple[str | int, ...] = tuple(first["loc"])
    cause = first.get("ctx", {}).get("error")
    if isinstance(cause, Refusal):
        return cause.spec_error(location)
    if first["type"] == "missing":
        required = _required(model, location)
        return SpecError(join_path("", (*location, *required.at)), required.reason)
    if first["type"] in ("list_type", "tuple_type"):
        return SpecError(join_path("", location), type_reason("a list", first["input"]))
    # Not reached by any document (every value type refuses with a Refusal); kept so that a
    # pydantic error of a kind not foreseen still names the field.
    return SpecError(join_path("", location), str(first["msg"]))


def _required(model: type[BaseModel], location: Sequence[str | int]) -> Required:
    """The Required metadata of the field at ``location``, found through the models' fields."""
    current: Any = model
    info: FieldInfo | None = None
    for part in location:
        if isinstance(part, int):
            current = _item_type(current)
            continue
        fields = getattr(current, "model_fields", None)
        info = None if fields is None else fields.get(part)
        if info is None:
            break
        current = _unwrap_optional(info.annotation)
    if info is not None:
        for marker in info.metadata:
            if isinstance(marker, Required):
                return marker
    return Required()


def _unwrap_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        options = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return options[0] if len(options) == 1 else annotation
    return annotation


def _item_type(annotation: Any) -> Any:
    arguments = typing.get_args(annotation)
    return arguments[0] if arguments else None

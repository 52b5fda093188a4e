"""The kinds of value a spec field holds, as pydantic field types: ``Annotated[int, Integer(1)]``.

Each kind checks a value the way the whole spec does (no coercion between types: ``"9898"`` is not
a port, YAML's ``yes`` is not a number, ``98.0`` is the integer 98), refuses with its own wording
(:mod:`perch.spec.messages`), and describes itself in the JSON Schema. They are pydantic "plain"
validators rather than pydantic's own strict types, because the refusals must say what the user
wrote and what was expected in Perch's words (``must be from 1 to 65535, got 0``, ``is not a DNS
label: ...``), and the translation of pydantic's messages would need the field's bounds and
pattern back anyway; a check is a few lines of Python that run once per field.

A field that is null counts as absent (the models drop nulls before validating), so none of these
sees None except as a list item or map value, where it is refused like any other wrong type.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple, cast
from urllib.parse import urlsplit

from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, core_schema

from perch.durations import DURATION_UNITS, DurationError, is_prometheus_duration, parse_duration
from perch.spec.messages import Refusal, one_of, short, wrong_type
from perch.spec.result import FrozenDict, JsonValue, freeze

__all__ = [
    "COOKIE_ATTRIBUTE",
    "COOKIE_NAME",
    "DNS_1035_LABEL",
    "DNS_LABEL",
    "DNS_SUBDOMAIN",
    "HTTP_TOKEN",
    "PORT_NAME",
    "Boolean",
    "Choice",
    "Duration",
    "DurationValue",
    "FreeMap",
    "Integer",
    "Number",
    "Pattern",
    "String",
    "StringMap",
    "TargetPort",
    "Url",
    "Weight",
    "check_integer",
    "check_string",
]


@dataclass(frozen=True, slots=True)
class Pattern:
    regex: re.Pattern[str]
    description: str


# Kubernetes name rules, checked here so that a bad name is refused at admission with its field
# rather than by the API server when the analyzer creates an object.
DNS_LABEL = Pattern(
    re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"),
    "a DNS label: at most 63 lowercase letters, digits and '-', starting and ending "
    "with a letter or digit",
)
DNS_1035_LABEL = Pattern(
    re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?"),
    "a DNS-1035 label: at most 63 lowercase letters, digits and '-', starting with a letter "
    "and ending with a letter or digit",
)
DNS_SUBDOMAIN = Pattern(
    re.compile(r"(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"),
    "a DNS subdomain: lowercase letters, digits, '-' and '.', at most 253 characters",
)
PORT_NAME = Pattern(
    re.compile(r"(?=.{1,15}$)(?=[^a-z]*[a-z])[a-z0-9]([a-z0-9]|-(?=[a-z0-9]))*"),
    "a port name: at most 15 lowercase letters, digits and single '-', with at least one letter",
)
# The Gateway API's HTTPHeaderName (also its query parameter names): an RFC 7230 token.
HTTP_TOKEN = Pattern(
    re.compile(r"[A-Za-z0-9!#$%&'*+\-.^_`|~]{1,256}"),
    "an HTTP header name: letters, digits and !#$%&'*+-.^_`|~",
)
COOKIE_NAME = Pattern(
    re.compile(r"[A-Za-z0-9_.-]{1,128}"),
    "a cookie name: letters, digits, '_', '.' and '-'",
)
COOKIE_ATTRIBUTE = Pattern(
    re.compile(r"[\x21-\x3a\x3c-\x7e]{1,256}"),
    "a cookie attribute: printable characters without spaces or ';'",
)


def check_string(
    value: object, *, pattern: Pattern | None = None, allow_empty: bool = False
) -> str:
    if not isinstance(value, str):
        raise wrong_type("a string", value)
    if not value and not allow_empty:
        raise Refusal("must not be empty")
    if pattern is not None and not pattern.regex.fullmatch(value):
        raise Refusal(f"{_quoted(value)} is not {pattern.description}")
    return value


def check_integer(value: object, *, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float):
            raise Refusal(f"expected a whole number, got {value}")
        raise wrong_type("an integer", value)
    if value < minimum or (maximum is not None and value > maximum):
        if maximum is None:
            raise Refusal(f"must be {minimum} or more, got {value}")
        raise Refusal(f"must be from {minimum} to {maximum}, got {value}")
    return value


def _quoted(text: str) -> str:
    return json.dumps(short(text))


class _Value:
    """Annotated metadata that makes the field's type this kind of value."""

    def check(self, value: Any) -> Any:
        raise NotImplementedError

    def json_schema(self) -> JsonSchemaValue:
        raise NotImplementedError

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        return core_schema.no_info_plain_validator_function(self.check)

    def __get_pydantic_json_schema__(
        self, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return self.json_schema()


def _anchored(pattern: Pattern) -> str:
    return f"^(?:{pattern.regex.pattern})$"


@dataclass(frozen=True, slots=True)
class String(_Value):
    pattern: Pattern | None = None
    allow_empty: bool = False

    def check(self, value: Any) -> str:
        return check_string(value, pattern=self.pattern, allow_empty=self.allow_empty)

    def json_schema(self) -> JsonSchemaValue:
        schema: JsonSchemaValue = {"type": "string"}
        if not self.allow_empty:
            schema["minLength"] = 1
        if self.pattern is not None:
            schema["pattern"] = _anchored(self.pattern)
        return schema


@dataclass(frozen=True, slots=True)
class Integer(_Value):
    """A whole number (``98.0`` reads as 98, ``98.5`` is refused) within the bounds."""

    minimum: int
    maximum: int | None = None

    def check(self, value: Any) -> int:
        return check_integer(value, minimum=self.minimum, maximum=self.maximum)

    def json_schema(self) -> JsonSchemaValue:
        schema: JsonSchemaValue = {"type": "integer", "minimum": self.minimum}
        if self.maximum is not None:
            schema["maximum"] = self.maximum
        return schema


@dataclass(frozen=True, slots=True)
class Weight(_Value):
    """A traffic weight: a whole percentage from 1 to 100."""

    def check(self, value: Any) -> int:
        weight = check_integer(value, minimum=-(2**63))
        if not 0 < weight <= 100:
            raise Refusal(f"a weight is a percentage from 1 to 100, got {weight}")
        return weight

    def json_schema(self) -> JsonSchemaValue:
        return {"type": "integer", "minimum": 1, "maximum": 100}


@dataclass(frozen=True, slots=True)
class Number(_Value):
    """Any number, read as a float; with ``minimum``, also finite and at least that."""

    minimum: float | None = None

    def check(self, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong_type("a number", value)
        number = float(value)
        if self.minimum is not None:
            if not math.isfinite(number):
                raise Refusal(f"expected a finite number, got {number}")
            if number < self.minimum:
                raise Refusal(f"must be {self.minimum:g} or more, got {number:g}")
        return number

    def json_schema(self) -> JsonSchemaValue:
        if self.minimum is None:
            return {"type": "number"}
        return {"type": "number", "minimum": self.minimum}


@dataclass(frozen=True, slots=True)
class Boolean(_Value):
    def check(self, value: Any) -> bool:
        if not isinstance(value, bool):
            raise wrong_type("a boolean (true or false)", value)
        return value

    def json_schema(self) -> JsonSchemaValue:
        return {"type": "boolean"}


class Duration(NamedTuple):
    """A positive duration: its PromQL-valid text (``"90s"`` for a bare 90) and its seconds."""

    text: str
    seconds: float

    @classmethod
    def of(cls, text: str) -> Duration:
        return cls(text, parse_duration(text))


_DURATION_PATTERN = "^\\s*(?:[0-9]+|{})\\s*$".format(
    "".join(f"(?:[0-9]+{unit})?" for unit in DURATION_UNITS)
)


@dataclass(frozen=True, slots=True)
class DurationValue(_Value):
    """A Prometheus-style duration (``30s``, ``1m30s``, ``500ms``) or a whole number of seconds;
    more than 0."""

    def check(self, value: Any) -> Duration:
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise wrong_type("a duration such as 30s, 1m30s or 500ms", value)
        try:
            seconds = parse_duration(value)
        except DurationError as error:
            raise Refusal(str(error)) from None
        if seconds <= 0:
            raise Refusal("must be more than 0")
        text = value.strip() if isinstance(value, str) else str(value)
        return Duration(text if is_prometheus_duration(text) else f"{int(seconds)}s", seconds)

    def json_schema(self) -> JsonSchemaValue:
        return {
            "anyOf": [
                {"type": "string", "pattern": _DURATION_PATTERN},
                {"type": "integer", "minimum": 1},
            ]
        }


# \s is str.isspace()'s whitespace; with the C0 controls, what a URL must not contain.
_WHITESPACE_OR_CONTROL = re.compile(r"[\s\x00-\x1f]")


@dataclass(frozen=True, slots=True)
class Url(_Value):
    """An http(s) URL with a host, without whitespace."""

    def check(self, value: Any) -> str:
        text = check_string(value)
        shown = _quoted(text)
        if _WHITESPACE_OR_CONTROL.search(text):
            raise Refusal(f"malformed URL {shown}: it contains whitespace")
        try:
            parts = urlsplit(text)
            _ = parts.port  # raises ValueError for a port that is not a number in range
        except ValueError as error:
            raise Refusal(f"malformed URL {shown}: {error}") from None
        if parts.scheme not in ("http", "https"):
            raise Refusal(f"malformed URL {shown}: it must start with http:// or https://")
        if not parts.hostname:
            raise Refusal(f"malformed URL {shown}: it has no host")
        return text

    def json_schema(self) -> JsonSchemaValue:
        return {"type": "string", "format": "uri", "pattern": "^https?://[^\\s]+$"}


@dataclass(frozen=True, slots=True)
class StringMap(_Value):
    """A mapping of strings to strings (empty strings allowed), frozen."""

    def check(self, value: Any) -> FrozenDict[str]:
        if not isinstance(value, dict):
            raise wrong_type("a mapping of strings to strings", value)
        for name, item in value.items():
            if not isinstance(item, str):
                raise wrong_type("a string", item, name)
        return FrozenDict(value)

    def json_schema(self) -> JsonSchemaValue:
        return {"type": "object", "additionalProperties": {"type": "string"}}


@dataclass(frozen=True, slots=True)
class FreeMap(_Value):
    """A free-form mapping (an Istio or Gateway API structure Perch copies), frozen."""

    def check(self, value: Any) -> FrozenDict[JsonValue]:
        if not isinstance(value, dict):
            raise wrong_type("a mapping", value)
        return cast(FrozenDict[JsonValue], freeze(value))

    def json_schema(self) -> JsonSchemaValue:
        return {"type": "object"}


class Choice(_Value):
    """One of a closed set of strings, refused with a suggestion (``did you mean pass?``).

    ``empty``: what ``""`` stands for, when it stands for the default (Flagger writes ``type:
    ""`` for a rollout gate); ``non_empty``: refuse ``""`` as an empty string rather than as an
    unknown choice.
    """

    __slots__ = ("empty", "non_empty", "options", "what")

    def __init__(
        self,
        options: Iterable[str],
        what: str,
        *,
        empty: str | None = None,
        non_empty: bool = False,
    ) -> None:
        self.options = tuple(options)
        self.what = what
        self.empty = empty
        self.non_empty = non_empty

    def check(self, value: Any) -> str:
        if not isinstance(value, str):
            raise wrong_type("a string", value)
        if not value:
            if self.empty is not None:
                return self.empty
            if self.non_empty:
                raise Refusal("must not be empty")
        if value not in self.options:
            raise Refusal(self.unknown(value))
        return value

    def unknown(self, value: str) -> str:
        return one_of(value, self.options, self.what)

    def json_schema(self) -> JsonSchemaValue:
        options = [*self.options, ""] if self.empty is not None else list(self.options)
        return {"type": "string", "enum": options}


@dataclass(frozen=True, slots=True)
class TargetPort(_Value):
    """A port number, or the name of a port of the pods."""

    def check(self, value: Any) -> int | str:
        if isinstance(value, str):
            return check_string(value, pattern=PORT_NAME)
        return check_integer(value, minimum=1, maximum=65535)

    def json_schema(self) -> JsonSchemaValue:
        return {
            "anyOf": [
                {"type": "integer", "minimum": 1, "maximum": 65535},
                {"type": "string", "pattern": _anchored(PORT_NAME)},
            ]
        }

"""From the annotation's text to plain data: JSON or YAML into dicts, lists and JSON scalars.

The text comes from anyone who may edit a Deployment, so the loading is defensive, and refuses
before the models see anything:

* the size is checked before parsing (at most 64 KiB);
* YAML aliases (and so every "billion laughs" bomb) are refused at the first ``*alias``, before
  anything is expanded;
* nesting is capped while composing, before Python's recursion limit could be reached;
* duplicate keys are refused (both parsers would silently keep the last), with the line and
  column of both;
* values that are not JSON (timestamps, binary, sets, custom tags, NaN/infinity, non-string keys)
  are refused, so that YAML and JSON mean the same and nothing is coerced later;
* syntax errors say where: ``not valid YAML: line 2, column 1: ...``.

Every refusal is a :class:`~perch.spec.messages.SpecError` naming the path of the offending node
(empty for the document as a whole).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from perch.spec.messages import SpecError, describe, item_path, key_path, short
from perch.spec.vocabulary import MAX_DEPTH, MAX_SPEC_BYTES

__all__ = ["check_size", "load_document"]


class _Refusal(Exception):
    """Raised inside the loaders, where a SpecError must not be mistaken for a syntax error."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(path, reason)
        self.path = path
        self.reason = reason


def _where(mark: Any) -> str:
    # Any: the pure-Python and the libyaml loaders have different Mark classes.
    if mark is None:
        return "an unknown position"
    return f"line {mark.line + 1}, column {mark.column + 1}"


_TAG_PREFIX = "tag:yaml.org,2002:"
_STR_TAG, _INT_TAG, _FLOAT_TAG = _TAG_PREFIX + "str", _TAG_PREFIX + "int", _TAG_PREFIX + "float"
_BOOL_TAG, _NULL_TAG = _TAG_PREFIX + "bool", _TAG_PREFIX + "null"
_MAP_TAG, _SEQ_TAG = _TAG_PREFIX + "map", _TAG_PREFIX + "seq"


def _show_tag(tag: str) -> str:
    return "!!" + tag.removeprefix(_TAG_PREFIX) if tag.startswith(_TAG_PREFIX) else tag


class _Loader(yaml.SafeLoader):
    """A SafeLoader that produces JSON-compatible data only.

    Implicit resolution is YAML 1.1's (as kubectl reads manifests) for booleans and null, but
    without timestamps (``2024-01-01`` stays a string), merge keys (``<<``) and value (``=``)
    keys, and without base-60 numbers (``1:30`` stays a string); a number with an exponent and no
    dot (``1e3``) is a float, as in JSON. Aliases are refused outright, which defuses every
    alias-expansion bomb before anything is expanded; nesting is capped while composing, with the
    path of the offending node.

    Pure Python on purpose: libyaml's CParser composes in C, out of reach of these hooks. The
    price is speed on hostile input: the scanner looks up to 1024 characters ahead for simple
    keys, so 64 KiB of ``[`` costs about a quarter of a second before the cap refuses it.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._path: list[str] = [""]
        self._depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        event = self.peek_event()  # type: ignore[no-untyped-call]
        path = self._path[-1]
        if isinstance(parent, SequenceNode) and isinstance(index, int):
            path = item_path(path, index)
        elif isinstance(parent, MappingNode) and isinstance(index, ScalarNode):
            path = key_path(path, index.value)
        if isinstance(event, yaml.AliasEvent):
            raise _Refusal(
                path,
                f"YAML aliases are not allowed (*{event.anchor} at {_where(event.start_mark)}); "
                "write the value out",
            )
        collection = isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent))
        if collection:
            if isinstance(parent, MappingNode) and index is None:
                raise _Refusal(path, f"mapping keys must be strings ({_where(event.start_mark)})")
            if self._depth >= MAX_DEPTH:
                raise _Refusal(
                    path,
                    f"nested deeper than {MAX_DEPTH} levels ({_where(event.start_mark)})",
                )
        self._path.append(path)
        self._depth += collection
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= collection
            self._path.pop()


# Start from no implicit resolvers at all rather than from SafeLoader's, so that nothing is
# inherited by accident (timestamps, merge keys, base-60 numbers).
_Loader.yaml_implicit_resolvers = {}
for _tag, _pattern, _first in (
    (
        _BOOL_TAG,
        r"^(?:yes|Yes|YES|no|No|NO|true|True|TRUE|false|False|FALSE|on|On|ON|off|Off|OFF)$",
        "yYnNtTfFoO",
    ),
    (
        _INT_TAG,
        r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$",
        "-+0123456789",
    ),
    (
        _FLOAT_TAG,
        r"^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$",
        "-+0123456789.",
    ),
    (_NULL_TAG, r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
):
    _Loader.add_implicit_resolver(_tag, re.compile(_pattern), list(_first))


def _from_node(loader: _Loader, node: Node, path: str) -> object:
    if isinstance(node, MappingNode):
        if node.tag != _MAP_TAG:
            raise _Refusal(path, f"YAML tag {_show_tag(node.tag)} is not allowed")
        result: dict[str, object] = {}
        seen: dict[str, Node] = {}
        for key_node, value_node in node.value:
            key = _from_node(loader, key_node, path)
            if not isinstance(key, str):
                raise _Refusal(
                    path,
                    f"mapping keys must be strings, got {describe(key)} "
                    f"({_where(key_node.start_mark)})",
                )
            if key == "<<" and isinstance(key_node, ScalarNode) and key_node.style is None:
                raise _Refusal(path, "YAML merge keys (<<) are not allowed")
            if key in seen:
                raise _Refusal(
                    key_path(path, key),
                    f"duplicate key {json.dumps(key)} ({_where(key_node.start_mark)}; "
                    f"first at {_where(seen[key].start_mark)})",
                )
            seen[key] = key_node
            result[key] = _from_node(loader, value_node, key_path(path, key))
        return result
    if isinstance(node, SequenceNode):
        if node.tag != _SEQ_TAG:
            raise _Refusal(path, f"YAML tag {_show_tag(node.tag)} is not allowed")
        return [_from_node(loader, item, item_path(path, i)) for i, item in enumerate(node.value)]
    assert isinstance(node, ScalarNode)
    try:
        if node.tag == _STR_TAG:
            return loader.construct_yaml_str(node)
        if node.tag == _NULL_TAG:
            return None
        if node.tag == _BOOL_TAG:
            return loader.construct_yaml_bool(node)
        if node.tag == _INT_TAG:
            return loader.construct_yaml_int(node)
        if node.tag == _FLOAT_TAG:
            number = loader.construct_yaml_float(node)
            if not math.isfinite(number):
                raise _Refusal(path, f"{node.value} is not a finite number (not valid in JSON)")
            return number
    except ValueError:  # e.g. an integer of more than 4300 digits, or "0b_"
        raise _Refusal(path, f"{short(node.value)} is not a valid number or is too large") from None
    raise _Refusal(
        path,
        f"YAML tag {_show_tag(node.tag)} is not allowed; the spec holds strings, numbers, "
        "booleans, lists and mappings only",
    )


class _Pairs(list[tuple[str, object]]):
    """A JSON object as its key/value pairs in order, so that duplicates can be found later."""


def _json_constant(name: str) -> object:
    raise _Refusal("", f"{name} is not a JSON number")


def _from_json(value: object, path: str, depth: int = 0) -> object:
    if isinstance(value, (_Pairs, list)) and depth >= MAX_DEPTH:
        raise _Refusal(path, f"nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, _Pairs):
        result: dict[str, object] = {}
        for key, item in value:
            if key in result:
                raise _Refusal(key_path(path, key), f"duplicate key {json.dumps(key)}")
            result[key] = _from_json(item, key_path(path, key), depth + 1)
        return result
    if isinstance(value, list):
        return [_from_json(item, item_path(path, i), depth + 1) for i, item in enumerate(value)]
    if isinstance(value, float) and not math.isfinite(value):
        raise _Refusal(path, "the number is too large")
    return value


def _load_json(text: str) -> object:
    """Parse JSON; raises json.JSONDecodeError on syntax errors, _Refusal on refused content."""
    try:
        data = json.loads(text, object_pairs_hook=_Pairs, parse_constant=_json_constant)
    except RecursionError:
        raise _Refusal("", f"nested deeper than {MAX_DEPTH} levels") from None
    except json.JSONDecodeError:
        raise
    except ValueError:  # e.g. an integer of more than 4300 digits
        raise _Refusal("", "a number is too large") from None
    return _from_json(data, "")


def _load_yaml(text: str) -> object:
    """Parse YAML; raises yaml.YAMLError on syntax errors, _Refusal on refused content."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        return None if node is None else _from_node(loader, node, "")
    finally:
        loader.dispose()


def _yaml_syntax(error: yaml.YAMLError) -> SpecError:
    if isinstance(error, yaml.MarkedYAMLError):
        problem = error.problem or "invalid syntax"
        if error.context:
            problem = f"{problem} ({error.context} at {_where(error.context_mark)})"
        return SpecError("", f"not valid YAML: {_where(error.problem_mark)}: {problem}")
    return SpecError("", f"not valid YAML: {error}")


def _load(text: str) -> object:
    """Parse the annotation: JSON when it looks like a JSON object and is one, YAML otherwise."""
    text = text.removeprefix("\ufeff")
    try:
        if not text.lstrip().startswith("{"):
            try:
                return _load_yaml(text)
            except yaml.YAMLError as error:
                raise _yaml_syntax(error) from None
        try:
            return _load_json(text)
        except json.JSONDecodeError as json_error:
            # A flow-style YAML mapping ({port: 9898}) is not JSON; when neither parses, report
            # the parser that got further, which is the one the author meant.
            try:
                return _load_yaml(text)
            except yaml.YAMLError as yaml_error:
                mark = getattr(yaml_error, "problem_mark", None)
                if isinstance(mark, yaml.Mark) and mark.index > json_error.pos:
                    raise _yaml_syntax(yaml_error) from None
                raise SpecError(
                    "",
                    f"not valid JSON: line {json_error.lineno}, column {json_error.colno}: "
                    f"{json_error.msg}",
                ) from None
    except _Refusal as refusal:
        raise SpecError(refusal.path, refusal.reason) from None


def check_size(text: str) -> None:
    # len() first: it is free and bounds the encoding work; utf-8 is at most 4 bytes a character.
    if len(text) > MAX_SPEC_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_SPEC_BYTES:
        raise SpecError(
            "",
            f"the annotation is larger than {MAX_SPEC_BYTES // 1024} KiB; "
            "a canary spec is a few hundred bytes",
        )


def load_document(text: str) -> object:
    """The annotation's text as plain data (None for a document without content).

    Raises SpecError when the text is too large, does not parse, or holds what JSON cannot.
    """
    check_size(text)
    return _load(text)

"""`kubectl perch validate -f FILE`: the webhook's checks of `perch.dev/spec`, offline.

Reads manifests as `kubectl apply -f` takes them (multi-document YAML, a stream of JSON objects,
`kind: List` and other lists with `items`; a directory's .yaml, .yml and .json files) and checks
every Deployment's spec with the code admission runs (perch.speccheck), so that the answer in CI
is the webhook's answer at apply time: the same denial, naming the field, and the same warnings.

A Deployment without `perch.dev/enabled: "true"` is not opted in: the webhook lets it through
unchecked, and so does this. Only reading files touches the outside world; checking is pure.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from perch.names import ANNOTATION_ENABLED, ANNOTATION_SPEC, is_opted_in
from perch.plugin.render import Style, Tone
from perch.spec import SpecError
from perch.speccheck import check_spec, denial_message, spec_warnings

Result = Literal["valid", "invalid", "not-opted-in", "error"]
STDIN = "-"
MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")
# A manifest whose aliases would expand past this many nodes is refused rather than built (a
# "billion laughs" in a pull request must not take the CI runner down).
MAX_EXPANDED_NODES = 1_000_000
_SPACE = re.compile(r"\s*")


@dataclass(frozen=True, slots=True)
class Finding:
    """What validate says about one Deployment, or about a file it could not read."""

    file: str
    line: int | None
    result: Result
    name: str = ""
    namespace: str = ""
    message: str = ""
    # The spec field the message is about (SpecError.path), for invalid specs.
    field: str | None = None
    warnings: tuple[str, ...] = ()
    # Where in the line a file stops parsing, for errors.
    column: int | None = None

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"file": self.file, "line": self.line}
        if self.column is not None:
            wire["column"] = self.column
        if self.result != "error":
            wire.update(kind="Deployment", name=self.name)
            if self.namespace:
                wire["namespace"] = self.namespace
        wire["result"] = self.result
        if self.field is not None:
            wire["field"] = self.field
        if self.message:
            wire["message"] = self.message
        wire["warnings"] = list(self.warnings)
        return wire


class ManifestError(Exception):
    def __init__(self, line: int | None, reason: str, *, column: int | None = None) -> None:
        super().__init__(line, reason)
        self.line = line
        self.column = column
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Source:
    """One manifest's text, named as the user named it ("stdin" for -f -)."""

    name: str
    text: str


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """2 when a file could not be read, else 1 when a spec is invalid, else 0."""
        results = {f.result for f in self.findings}
        if "error" in results:
            return 2
        return 1 if "invalid" in results else 0


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def read_sources(
    paths: Sequence[str], *, stdin: Any, recursive: bool = False
) -> Iterator[Source | Finding]:
    """The texts of -f arguments, in order: a Source per file, or a Finding of result "error"
    for one that cannot be read."""
    for path in paths:
        if path == STDIN:
            try:
                yield Source("stdin", stdin.read())
            except UnicodeDecodeError as err:
                yield Finding("stdin", None, "error", message=f"not UTF-8 text: {err.reason}")
            continue
        where = Path(path)
        if where.is_dir():
            pattern = "**/*" if recursive else "*"
            found = sorted(
                p for p in where.glob(pattern) if p.is_file() and p.suffix in MANIFEST_SUFFIXES
            )
            if not found:
                yield Finding(path, None, "error", message="no .yaml, .yml or .json files in it")
            for file in found:
                yield _read(str(file))
        else:
            yield _read(path)


def _read(path: str) -> Source | Finding:
    try:
        return Source(path, Path(path).read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        return Finding(path, None, "error", message="no such file or directory")
    except UnicodeDecodeError as err:
        return Finding(path, None, "error", message=f"not UTF-8 text: {err.reason}")
    except OSError as err:
        return Finding(path, None, "error", message=err.strerror or str(err))


def documents(text: str) -> Iterator[tuple[int, Any]]:
    """(line, object) for each document, and for each item of a list; ManifestError (with the
    line) for text that does not parse."""
    text = text.removeprefix("\ufeff")
    if text.lstrip().startswith("{"):
        yield from _json_documents(text)
    else:
        yield from _yaml_documents(text)


def _json_documents(text: str) -> Iterator[tuple[int, Any]]:
    decoder = json.JSONDecoder()
    at = _SPACE.match(text, 0).end()  # type: ignore[union-attr]
    while at < len(text):
        try:
            obj, end = decoder.raw_decode(text, at)
        except json.JSONDecodeError as err:
            raise ManifestError(err.lineno, err.msg, column=err.colno) from err
        line = text.count("\n", 0, at) + 1
        yield from _flatten(obj, line, None)
        at = _SPACE.match(text, end).end()  # type: ignore[union-attr]


_Loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _yaml_documents(text: str) -> Iterator[tuple[int, Any]]:
    loader = _Loader(text)
    try:
        while True:
            try:
                if not loader.check_node():
                    break
                node = loader.get_node()
                if node is None:
                    continue
                _check_expansion(node)
                obj = loader.construct_document(node)
            except yaml.MarkedYAMLError as err:
                raise _yaml_error(err) from err
            except yaml.YAMLError as err:
                raise ManifestError(None, str(err)) from err
            except RecursionError as err:
                raise ManifestError(None, "the YAML is nested too deeply") from err
            yield from _flatten(obj, node.start_mark.line + 1, node)
    finally:
        loader.dispose()


def _yaml_error(err: yaml.MarkedYAMLError) -> ManifestError:
    """Where the parser stopped, what it found, and what it was in the middle of (PyYAML's
    "while parsing a flow mapping" names where that began)."""
    mark = err.problem_mark or err.context_mark
    reason = err.problem or err.context or "invalid YAML"
    if err.problem and err.context:
        started = err.context_mark
        reason += f" ({err.context}" + (
            f" that starts at line {started.line + 1})"
            if started is not None and started.line != getattr(mark, "line", None)
            else ")"
        )
    if mark is None:
        return ManifestError(None, reason)
    return ManifestError(mark.line + 1, reason, column=mark.column + 1)


def _check_expansion(root: Node) -> None:
    """Refuse a document whose aliases expand beyond MAX_EXPANDED_NODES, or refer to themselves,
    before any of it is built."""
    sizes: dict[int, int] = {}
    open_: set[int] = set()

    def size(node: Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_:
            raise ManifestError(node.start_mark.line + 1, "an alias refers to itself")
        open_.add(key)
        total = 1
        if isinstance(node, SequenceNode):
            total += sum(size(child) for child in node.value)
        elif isinstance(node, MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        open_.discard(key)
        if total > MAX_EXPANDED_NODES:
            raise ManifestError(
                root.start_mark.line + 1,
                f"the document's aliases expand to more than {MAX_EXPANDED_NODES} nodes",
            )
        sizes[key] = total
        return total

    size(root)


def _item_lines(node: Node | None) -> list[int] | None:
    """The line of each entry of a list document's `items`, when the YAML node is at hand."""
    if not isinstance(node, MappingNode):
        return None
    for key, value in node.value:
        if isinstance(key, ScalarNode) and key.value == "items" and isinstance(value, SequenceNode):
            return [child.start_mark.line + 1 for child in value.value]
    return None


def _flatten(obj: Any, line: int, node: Node | None) -> Iterator[tuple[int, Any]]:
    if obj is None:
        return  # an empty document
    if not isinstance(obj, dict):
        raise ManifestError(line, f"a document must be an object, got {type(obj).__name__}")
    kind = obj.get("kind")
    if not isinstance(kind, str) or not kind:
        raise ManifestError(line, "the object has no kind")
    items = obj.get("items")
    if kind.endswith("List") and isinstance(items, list):
        lines = _item_lines(node) or []
        for i, item in enumerate(items):
            item_line = lines[i] if i < len(lines) else line
            if not isinstance(item, dict) or not item.get("kind"):
                raise ManifestError(item_line, f"items[{i}] is not an object with a kind")
            yield item_line, item
        return
    yield line, obj


# --------------------------------------------------------------------------------------------
# Checking
# --------------------------------------------------------------------------------------------


def is_deployment(obj: Mapping[str, Any]) -> bool:
    api_version = obj.get("apiVersion")
    return (
        obj.get("kind") == "Deployment"
        and isinstance(api_version, str)
        and api_version.startswith("apps/")
    )


def check_deployment(obj: Mapping[str, Any], *, file: str, line: int | None) -> Finding:
    """What admission would say about this Deployment's spec."""
    meta = obj.get("metadata")
    meta = meta if isinstance(meta, dict) else {}
    name = str(meta.get("name") or meta.get("generateName") or "")
    namespace = str(meta.get("namespace") or "")

    def found(result: Result, message: str = "", **extra: Any) -> Finding:
        return Finding(file, line, result, name, namespace, message, **extra)

    annotations = meta.get("annotations")
    annotations = annotations if isinstance(annotations, dict) else {}
    for key in (ANNOTATION_ENABLED, ANNOTATION_SPEC):
        value = annotations.get(key)
        if value is not None and not isinstance(value, str):
            # The API server refuses the object before any webhook sees it.
            hint = 'quote it: "true"' if key == ANNOTATION_ENABLED else f"write it as '{key}: |'"
            return found(
                "invalid",
                f"metadata.annotations: {key} must be a string, got {type(value).__name__}; {hint}",
            )
    if not is_opted_in(annotations):
        return found("not-opted-in", _not_opted_in(annotations))
    try:
        spec = check_spec(annotations.get(ANNOTATION_SPEC), deployment=name)
    except SpecError as err:
        return found("invalid", denial_message(err), field=err.path)
    return found("valid", warnings=spec_warnings(spec))


def _not_opted_in(annotations: Mapping[str, Any]) -> str:
    enabled = annotations.get(ANNOTATION_ENABLED)
    if enabled is not None:
        return (
            f'{ANNOTATION_ENABLED} is {json.dumps(enabled)}, not "true"; '
            f"the webhook does not check its {ANNOTATION_SPEC}"
        )
    if ANNOTATION_SPEC in annotations:
        return (
            f'{ANNOTATION_SPEC} is set but {ANNOTATION_ENABLED}: "true" is not; '
            "the webhook does not check it"
        )
    return ""


def validate(sources: Sequence[Source | Finding]) -> Report:
    report = Report()
    for source in sources:
        if isinstance(source, Finding):
            report.findings.append(source)
            continue
        try:
            for line, obj in documents(source.text):
                if is_deployment(obj):
                    report.findings.append(check_deployment(obj, file=source.name, line=line))
        except ManifestError as err:
            report.findings.append(
                Finding(source.name, err.line, "error", message=err.reason, column=err.column)
            )
    return report


# --------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------

_RESULT_TONE: dict[Result, Tone] = {"valid": "good", "invalid": "bad", "not-opted-in": "muted"}


def location(finding: Finding) -> str:
    """FILE, FILE:LINE or FILE:LINE:COLUMN, as compilers and editors name a place."""
    where = finding.file
    if finding.line is not None:
        where += f":{finding.line}"
        if finding.column is not None:
            where += f":{finding.column}"
    return where


def render_finding(finding: Finding, style: Style) -> str:
    """`deployment/NAME (FILE): valid`, the webhook's denial, or `not opted in`; the webhook's
    warnings follow, one a line, as kubectl prints them."""
    head = f"deployment/{finding.name or '(no name)'} ({finding.file})"
    if finding.result == "valid":
        body = style("valid", "good")
    elif finding.result == "not-opted-in":
        body = style("not opted in", "muted")
        if finding.message:
            body += style(f" ({finding.message})", "muted")
    else:
        body = style(finding.message, _RESULT_TONE.get(finding.result, "bad"))
    lines = [f"{head}: {body}"]
    lines += [f"  {style('Warning:', 'warn')} {w}" for w in finding.warnings]
    return "\n".join(lines)


def render_error(finding: Finding) -> str:
    return f"kubectl perch: error: {location(finding)}: {finding.message}"

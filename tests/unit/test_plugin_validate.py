"""`kubectl perch validate`: manifests read as kubectl apply -f reads them, each Deployment's spec
checked as the webhook checks it, with the webhook's words, and exit codes CI can act on."""

from __future__ import annotations

import copy
import io
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from perch.plugin import main
from perch.plugin.render import Style
from perch.plugin.validate import Finding, render_finding
from tests.seed import SEED_SPEC_CURRENT, SEED_SPEC_EARLY, admission_review, podinfo
from webhook.admission import parse_review
from webhook.review import Observed, review

TOO_BIG_STEP = SEED_SPEC_CURRENT.replace("stepWeight: 5", "stepWeight: 80")
SERVICE = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "podinfo"}}


def deployment(name: str = "podinfo", **kw: Any) -> dict[str, Any]:
    dep = podinfo(uid=None, defaulted=False, **kw)
    dep["metadata"]["name"] = name
    return dep


def write(path: Path, *docs: dict[str, Any]) -> str:
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return str(path)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["validate", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_valid_spec(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path / "podinfo.yaml", deployment(spec=SEED_SPEC_CURRENT))
    assert run(capsys, "-f", path) == (0, f"deployment/podinfo ({path}): valid\n", "")


def test_multi_document_file_reports_each_deployment_and_skips_other_kinds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(
        tmp_path / "app.yaml",
        SERVICE,
        deployment("podinfo", spec=SEED_SPEC_CURRENT),
        deployment("api", spec=TOO_BIG_STEP),
        deployment("worker", spec=None, enabled=False),
    )
    code, out, err = run(capsys, "-f", path)
    assert code == 1
    assert err == ""
    assert out.splitlines() == [
        f"deployment/podinfo ({path}): valid",
        f"deployment/api ({path}): perch: invalid perch.dev/spec: analysis.stepWeight: "
        "stepWeight 80 is more than maxWeight 50",
        f"deployment/worker ({path}): not opted in",
    ]


def test_warnings_follow_the_deployment_as_kubectl_prints_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path / "seed.yaml", deployment(spec=SEED_SPEC_EARLY))
    code, out, _ = run(capsys, "-f", path)
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"deployment/podinfo ({path}): valid"
    assert lines[1] == (
        "  Warning: perch: perch.dev/spec: canaryAnalysis is Flagger's early name for analysis "
        "and is read as analysis"
    )


@pytest.mark.parametrize(
    "spec",
    [
        SEED_SPEC_CURRENT,
        SEED_SPEC_EARLY,
        TOO_BIG_STEP,
        None,
        "analysis: [1",
        "service: {port: 9898}\nanalysis: {interval: -1s}",
        "service: {port: 9898}\ntargetRef: {name: other}",
        "service: {port: 9898}\ntargetRef: {name: podinfo}",
        "service: {port: 9898}\nanalysis:\n  metrics:\n  - name: errors\n    query: up",
        "service: {port: 9898}\nanalysis:\n  webhooks:\n  - {name: x, url: 'not a url'}",
    ],
)
def test_the_same_answer_as_the_webhook(
    spec: str | None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Offline and at admission, one verdict: the denial's message, or the spec's warnings."""
    dep = deployment(spec=spec)
    path = write(tmp_path / "d.yaml", dep)
    code, out, _ = run(capsys, "-f", path, "-o", "json")
    (found,) = json.loads(out)
    req = parse_review(admission_review(operation="CREATE", obj=copy.deepcopy(dep)))
    now = datetime(2026, 11, 26, tzinfo=UTC)
    decision = review(req, None, now=now)
    if decision.reason == "observe":
        decision = review(req, Observed(), now=now)
    if decision.allowed:
        assert (code, found["result"], found["warnings"]) == (0, "valid", list(decision.warnings))
    else:
        assert (code, found["result"], found["message"]) == (1, "invalid", decision.message)


def test_the_field_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path / "d.yaml", deployment(spec=TOO_BIG_STEP))
    code, out, _ = run(capsys, "-f", path, "-o", "json")
    assert code == 1
    assert json.loads(out) == [
        {
            "file": path,
            "line": 1,
            "kind": "Deployment",
            "name": "podinfo",
            "namespace": "test",
            "result": "invalid",
            "field": "analysis.stepWeight",
            "message": "perch: invalid perch.dev/spec: analysis.stepWeight: stepWeight 80 is "
            "more than maxWeight 50",
            "warnings": [],
        }
    ]


def test_stdin(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    text = yaml.safe_dump_all([deployment(spec=SEED_SPEC_CURRENT), deployment("b", spec=None)])
    monkeypatch.setattr("sys.stdin", io.StringIO(text))
    code, out, _ = run(capsys, "-f", "-")
    assert code == 1
    assert out.splitlines()[0] == "deployment/podinfo (stdin): valid"
    assert out.splitlines()[1].startswith(
        "deployment/b (stdin): perch: invalid perch.dev/spec: service.port: required"
    )


def test_several_files_and_stdin_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    one = write(tmp_path / "one.yaml", deployment("one", spec=SEED_SPEC_CURRENT))
    two = write(tmp_path / "two.yaml", deployment("two", spec=SEED_SPEC_CURRENT))
    monkeypatch.setattr("sys.stdin", io.StringIO(yaml.safe_dump(deployment("three", spec=None))))
    code, out, _ = run(capsys, "-f", one, "--filename", two, "-f", "-")
    assert code == 1
    assert [line.split(" (")[0] for line in out.splitlines()] == [
        "deployment/one",
        "deployment/two",
        "deployment/three",
    ]
    with pytest.raises(SystemExit) as exit_:
        main(["validate", "-f", "-", "-f", "-"])
    assert exit_.value.code == 2


def test_a_list_in_yaml_and_in_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    items = [
        SERVICE,
        deployment("good", spec=SEED_SPEC_CURRENT),
        deployment("bad", spec=TOO_BIG_STEP),
    ]
    listed = {"apiVersion": "v1", "kind": "List", "items": items}
    as_yaml = write(tmp_path / "list.yaml", listed)
    as_json = tmp_path / "list.json"
    as_json.write_text(json.dumps(listed, indent=2))
    code, out, _ = run(capsys, "-f", as_yaml, "-f", str(as_json), "-o", "json")
    assert code == 1
    found = json.loads(out)
    assert [(f["file"], f["name"], f["result"]) for f in found] == [
        (as_yaml, "good", "valid"),
        (as_yaml, "bad", "invalid"),
        (str(as_json), "good", "valid"),
        (str(as_json), "bad", "invalid"),
    ]
    # In YAML each item's own line; JSON gives the document's.
    text = Path(as_yaml).read_text().splitlines()
    assert text[found[1]["line"] - 1].lstrip("- ").startswith("apiVersion: apps/v1")
    assert found[2]["line"] == 1


def test_a_stream_of_json_objects(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "stream.json"
    path.write_text(
        json.dumps(deployment("a", spec=SEED_SPEC_CURRENT), indent=2)
        + "\n"
        + json.dumps(deployment("b", spec=SEED_SPEC_CURRENT))
    )
    code, out, _ = run(capsys, "-f", str(path))
    assert code == 0
    assert len(out.splitlines()) == 2


def test_not_opted_in_is_not_an_error_and_says_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plain = deployment("plain", spec=None, enabled=False)
    near = deployment("near", spec=TOO_BIG_STEP, enabled=False)
    near["metadata"]["annotations"]["perch.dev/enabled"] = "True"
    forgot = deployment("forgot", spec=TOO_BIG_STEP, enabled=False)
    path = write(tmp_path / "off.yaml", plain, near, forgot)
    code, out, _ = run(capsys, "-f", path)
    assert code == 0
    assert out.splitlines() == [
        f"deployment/plain ({path}): not opted in",
        f'deployment/near ({path}): not opted in (perch.dev/enabled is "True", not "true"; '
        "the webhook does not check its perch.dev/spec)",
        f"deployment/forgot ({path}): not opted in (perch.dev/spec is set but perch.dev/enabled: "
        '"true" is not; the webhook does not check it)',
    ]


def test_an_annotation_that_is_not_a_string(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "d.yaml"
    path.write_text(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: x\n  annotations:\n"
        "    perch.dev/enabled: true\n"
    )
    code, out, _ = run(capsys, "-f", str(path))
    assert code == 1
    assert "perch.dev/enabled must be a string, got bool; quote it" in out


def test_a_yaml_error_names_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = write(tmp_path / "good.yaml", deployment(spec=SEED_SPEC_CURRENT))
    broken = tmp_path / "broken.yaml"
    broken.write_text(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: x\n---\napiVersion: apps/v1\n"
        "kind: Deployment\nmetadata:\n  name: y\n  labels: {a: b\n---\n"
    )
    code, out, err = run(capsys, "-f", str(broken), "-f", good)
    assert code == 2
    assert err == (
        f"kubectl perch: error: {broken}:11:1: did not find expected ',' or '}}' "
        "(while parsing a flow mapping that starts at line 10)\n"
    )
    # The other files are still checked.
    assert out == f"deployment/podinfo ({good}): valid\n"


def test_a_json_error_names_file_line_and_column(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "d.json"
    path.write_text('{\n  "kind": "Deployment",\n  "metadata": {]\n}\n')
    code, _, err = run(capsys, "-f", str(path), "-o", "json")
    assert code == 2
    assert err.startswith(f"kubectl perch: error: {path}:3:16: ")


def test_a_missing_file_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "-f", str(tmp_path / "nope.yaml"), "-o", "json")
    assert code == 2
    assert err == f"kubectl perch: error: {tmp_path / 'nope.yaml'}: no such file or directory\n"
    assert json.loads(out) == [
        {
            "file": str(tmp_path / "nope.yaml"),
            "line": None,
            "result": "error",
            "message": "no such file or directory",
            "warnings": [],
        }
    ]


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("- a\n- b\n", "a document must be an object, got list"),
        ("metadata: {name: x}\n", "the object has no kind"),
        ("a: &a [*a]\nkind: X\n", "an alias refers to itself"),
    ],
)
def test_documents_kubectl_could_not_apply(
    text: str, why: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "d.yaml"
    path.write_text(text)
    code, _, err = run(capsys, "-f", str(path))
    assert code == 2
    assert err.endswith(f": {why}\n")


def test_a_yaml_bomb_is_refused_before_it_is_built(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 12)]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join([*lines, "kind: X"]))
    code, _, err = run(capsys, "-f", str(path))
    assert code == 2
    assert "aliases expand to more than" in err


def test_a_directory_and_recursion(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path / "a.yaml", deployment("a", spec=SEED_SPEC_CURRENT))
    (tmp_path / "notes.txt").write_text("not a manifest")
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "b.yml", deployment("b", spec=SEED_SPEC_CURRENT))
    code, out, _ = run(capsys, "-f", str(tmp_path))
    assert (code, [line.split(" ")[0] for line in out.splitlines()]) == (0, ["deployment/a"])
    code, out, _ = run(capsys, "-f", str(tmp_path), "-R")
    assert [line.split(" ")[0] for line in out.splitlines()] == ["deployment/a", "deployment/b"]


def test_no_deployments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path / "svc.yaml", SERVICE)
    assert run(capsys, "-f", path) == (0, f"No Deployments found in {path}.\n", "")


def test_validate_needs_no_cluster(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.setenv("HOME", str(tmp_path))
    path = write(tmp_path / "d.yaml", deployment(spec=SEED_SPEC_CURRENT))
    assert run(capsys, "--kubeconfig", str(tmp_path / "none"), "-n", "x", "-f", path)[0] == 0


def test_all_namespaces_means_nothing_to_validate(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["validate", "-A", "-f", str(tmp_path)])
    assert exit_.value.code == 2


def test_colour_only_when_asked() -> None:
    finding = Finding("f.yaml", 1, "invalid", "api", message="perch: invalid perch.dev/spec: x")
    plain = render_finding(finding, Style(colour=False))
    assert "\x1b[" not in plain
    coloured = render_finding(finding, Style(colour=True))
    assert "\x1b[31mperch: invalid" in coloured
    assert coloured.replace("\x1b[31m", "").replace("\x1b[0m", "") == plain

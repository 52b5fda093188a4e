"""The two images, checked where no Docker engine runs.

Dockerfile.webhook and Dockerfile.analyzer are read with a small line parser (continuation lines,
comments) and held to what the chart relies on: a pinned slim base, a builder stage whose venv is
the only thing the final stage copies, a numeric non-root user, and an exec-form ENTRYPOINT naming
a console script of this package. That script is then run with ``--help`` from this venv: the same
entry point, installed the same way (pip from the package metadata), that the image runs.

scripts/build-images.sh (``make images``) is run for real: against the real docker CLI with no
engine behind it, and against a stand-in ``docker`` that records its arguments.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SCRIPTS: dict[str, str] = PYPROJECT["project"]["scripts"]
BUILD_SCRIPT = ROOT / "scripts" / "build-images.sh"

# Dockerfile -> the console script its image runs.
IMAGES = {"Dockerfile.webhook": "perch-webhook", "Dockerfile.analyzer": "perch-analyzer"}

# A deadline for a broken script (one that hangs), never a measurement.
SCRIPT_DEADLINE = 120.0

BUILD_TOOLS = re.compile(
    r"\b(gcc|g\+\+|cc|clang|make|build-essential|[\w.+-]+-dev|git|curl|wget)\b"
)


# --- a Dockerfile parser ------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    line: int


@dataclass
class Stage:
    image: str
    alias: str | None
    line: int
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for instruction in self.all("ENV"):
            words = shlex.split(instruction.args)
            if words and "=" not in words[0]:  # the legacy `ENV KEY value` form
                values[words[0]] = " ".join(words[1:])
                continue
            for word in words:
                key, _, value = word.partition("=")
                values[key] = value
        return values

    def labels(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for instruction in self.all("LABEL"):
            for word in shlex.split(instruction.args):
                key, _, value = word.partition("=")
                values[key] = value
        return values


def parse_instructions(text: str) -> list[Instruction]:
    """Docker's line rules: `\\` continues a line; comment and blank lines inside one are dropped."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not pending:
            start = number
        if line.endswith("\\"):
            pending.append(line[:-1].strip())
            continue
        pending.append(line)
        keyword, _, args = " ".join(part for part in pending if part).partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
        pending = []
    assert not pending, f"the last instruction (line {start}) ends with a dangling '\\'"
    return instructions


def parse_stages(path: Path) -> list[Stage]:
    stages: list[Stage] = []
    for instruction in parse_instructions(path.read_text()):
        if instruction.keyword == "FROM":
            words = [w for w in instruction.args.split() if not w.startswith("--")]
            alias = words[2] if len(words) == 3 and words[1].lower() == "as" else None
            assert len(words) in (1, 3), f"{path.name}:{instruction.line}: FROM {instruction.args}"
            stages.append(Stage(words[0], alias, instruction.line))
        else:
            assert stages or instruction.keyword == "ARG", (
                f"{path.name}:{instruction.line}: {instruction.keyword} before the first FROM"
            )
            if stages:
                stages[-1].instructions.append(instruction)
    return stages


def copy_parts(instruction: Instruction) -> tuple[dict[str, str], list[str], str]:
    """A COPY's flags (--from=builder -> {"from": "builder"}), sources and destination."""
    words = shlex.split(instruction.args)
    flags = {}
    while words and words[0].startswith("--"):
        key, _, value = words.pop(0)[2:].partition("=")
        flags[key] = value
    assert not words[0].startswith("["), "COPY's JSON form is not parsed here"
    return flags, words[:-1], words[-1]


def dockerfile(name: str) -> list[Stage]:
    return parse_stages(ROOT / name)


def image_version(image: str) -> tuple[int, ...]:
    """python:3.11.14-slim-bookworm -> (3, 11, 14); fails on anything but an exact version tag."""
    reference = image.split("@", 1)[0]
    _, _, tag = reference.rpartition(":")
    found = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)(?:-[a-z0-9.-]+)?", tag)
    assert found, f"{image}: the tag must be an exact version like 3.11.14-slim-bookworm"
    return tuple(int(part) for part in found.groups())


def script_path(script: str) -> Path:
    return Path(sys.executable).with_name(script)


# --- the Dockerfiles ----------------------------------------------------------------------------


def test_parser_joins_continuations_and_drops_comments() -> None:
    parsed = parse_instructions(
        "# syntax=docker/dockerfile:1\nFROM a:1.2.3 AS b\nRUN one \\\n  # a comment\n"
        "  && two \\\n\n  && three\nUSER 1:1\n"
    )
    assert [(i.keyword, i.args, i.line) for i in parsed] == [
        ("FROM", "a:1.2.3 AS b", 2),
        ("RUN", "one && two && three", 3),
        ("USER", "1:1", 8),
    ]
    with pytest.raises(AssertionError, match="dangling"):
        parse_instructions("FROM a:1.2.3\nRUN one \\\n")


@pytest.mark.parametrize("name", IMAGES)
def test_base_images_are_pinned_to_an_exact_version(name: str) -> None:
    stages = dockerfile(name)
    aliases: set[str] = set()
    for stage in stages:
        if stage.image in aliases:
            continue  # FROM an earlier stage
        assert "$" not in stage.image, f"{name}:{stage.line}: resolve the base image, not an ARG"
        assert not stage.image.endswith(":latest") and ":" in stage.image.split("/")[-1], (
            f"{name}:{stage.line}: {stage.image} is not pinned"
        )
        version = image_version(stage.image)
        assert stage.image.split("/")[-1].startswith("python:"), stage.image
        assert "slim" in stage.image, f"{stage.image}: the issue asks for a slim base"
        # The package's own floor: `requires-python = ">=3.11"`.
        floor = PYPROJECT["project"]["requires-python"].removeprefix(">=")
        assert version[:2] >= tuple(int(p) for p in floor.split(".")), (stage.image, floor)
        if stage.alias:
            aliases.add(stage.alias)


@pytest.mark.parametrize("name", IMAGES)
def test_is_multi_stage_and_ships_only_the_builders_venv(name: str) -> None:
    stages = dockerfile(name)
    assert len(stages) >= 2, f"{name}: a builder stage and a final stage"
    final, earlier = stages[-1], {s.alias: s for s in stages[:-1] if s.alias}

    copies = [copy_parts(i) for i in final.all("COPY")]
    assert copies, f"{name}: the final stage copies nothing"
    assert not final.all("ADD"), f"{name}: ADD in the final stage"
    venvs = []
    for flags, sources, destination in copies:
        # Anything without --from comes from the build context: the source tree.
        assert flags.get("from") in earlier, f"{name}: COPY {sources} from the build context"
        builder = earlier[flags["from"]]
        # The venv's python is a symlink into the base image: both stages must share it.
        assert builder.image == final.image, f"{name}: {builder.image} != {final.image}"
        venvs.append((builder, sources, destination))
    assert len(venvs) == 1, f"{name}: the final stage should copy the venv alone: {venvs}"
    builder, sources, destination = venvs[0]
    assert sources == [destination], f"{name}: keep the venv at the path it was created at"

    # The builder makes that venv from this project's wheel.
    run = " && ".join(i.args for i in builder.all("RUN"))
    assert re.search(r"pip wheel\b[^&]*--no-deps", run), f"{name}: no `pip wheel --no-deps`"
    assert f"venv {destination}" in run, f"{name}: the builder creates no venv at {destination}"
    assert re.search(rf"{re.escape(destination)}/bin/pip install\b[^&]*\.whl", run), (
        f"{name}: the project's wheel is not installed into {destination}"
    )
    assert "--no-cache-dir" in run or builder.env().get("PIP_NO_CACHE_DIR") == "1"

    # The ENTRYPOINT's bare script name resolves through PATH to that venv.
    path = final.env().get("PATH", "")
    assert path.split(":")[0] == f"{destination}/bin", f"{name}: PATH={path!r}"


@pytest.mark.parametrize("name", IMAGES)
def test_final_stage_runs_as_a_numeric_non_root_user(name: str) -> None:
    final = dockerfile(name)[-1]
    users = final.all("USER")
    assert users, f"{name}: the final stage runs as root"
    user = users[-1].args
    assert re.fullmatch(r"\d+(:\d+)?", user), (
        f"{name}: USER {user}: runAsNonRoot can only verify a numeric uid"
    )
    assert int(user.split(":")[0]) != 0, f"{name}: USER {user} is root"
    assert final.instructions.index(users[-1]) > max(
        final.instructions.index(i) for i in final.instructions if i.keyword in {"COPY", "RUN"}
    ), f"{name}: USER must come after the last COPY/RUN"


@pytest.mark.parametrize(("name", "expected"), IMAGES.items())
def test_entrypoint_is_an_installed_console_script_that_runs(name: str, expected: str) -> None:
    final = dockerfile(name)[-1]
    entrypoints = final.all("ENTRYPOINT")
    assert len(entrypoints) == 1, f"{name}: one ENTRYPOINT"
    try:
        command = json.loads(entrypoints[0].args)
    except json.JSONDecodeError:
        pytest.fail(f"{name}: ENTRYPOINT {entrypoints[0].args} is not exec form (a JSON list)")
    assert isinstance(command, list) and all(isinstance(w, str) for w in command), command
    assert command[0] == expected, f"{name}: ENTRYPOINT {command}"
    assert command[0] in SCRIPTS, f"{command[0]} is not in pyproject's [project.scripts]"
    assert not final.all("CMD") or command[1:] == [], "arguments belong to the pod spec"

    done = subprocess.run(
        [str(script_path(command[0])), *command[1:], "--help"],
        capture_output=True,
        text=True,
        timeout=SCRIPT_DEADLINE,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout.lower(), done.stdout


def test_webhook_image_carries_perch_certs() -> None:
    # The chart's pre-install Job runs `perch-certs ensure` in the webhook image.
    assert "perch-certs" in SCRIPTS
    builder = next(s for s in dockerfile("Dockerfile.webhook") if s.alias)
    run = " ".join(i.args for i in builder.all("RUN"))
    # The whole wheel is installed, so every console script of the package is on PATH.
    assert re.search(r"pip install\b[^&]*/perch-\*\.whl", run), run
    done = subprocess.run(
        [str(script_path("perch-certs")), "ensure", "--help"],
        capture_output=True,
        text=True,
        timeout=SCRIPT_DEADLINE,
        check=False,
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(("name", "expected"), IMAGES.items())
def test_final_stage_has_no_build_tools_or_healthcheck(name: str, expected: str) -> None:
    stages = dockerfile(name)
    final = stages[-1]
    for run in final.all("RUN"):
        installs = re.findall(r"(?:apt-get|apt|apk)\s+(?:-\S+\s+)*(?:install|add)\b(.*)", run.args)
        for packages in installs:
            assert not BUILD_TOOLS.search(packages), f"{name}:{run.line}: {run.args}"
        assert "pip install" not in run.args, f"{name}:{run.line}: install in the builder"
    for stage in stages:
        assert not stage.all("HEALTHCHECK"), f"{name}: Kubernetes probes replace HEALTHCHECK"

    env = final.env()
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1"
    assert env.get("PYTHONUNBUFFERED") == "1"
    labels = final.labels()
    assert labels.get("org.opencontainers.image.title") == expected
    assert (
        labels.get("org.opencontainers.image.licenses") == PYPROJECT["project"]["license"]["text"]
    )
    assert {"org.opencontainers.image.version", "org.opencontainers.image.revision"} <= set(labels)


# --- the build context --------------------------------------------------------------------------


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, closely enough: the last matching pattern wins; a match on a directory
    covers everything below it; `**/` also matches at the root."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    verdict = False
    for raw in patterns:
        negated = raw.startswith("!")
        pattern = raw.lstrip("!").strip("/")
        candidates = {pattern, pattern.removeprefix("**/")}
        if any(fnmatch.fnmatchcase(p, c) for p in prefixes for c in candidates):
            verdict = not negated
    return verdict


def test_dockerignore_matcher() -> None:
    patterns = ["**/__pycache__", ".git", "docs", "!docs/keep.md"]
    assert ignored("perch/__pycache__/x.pyc", patterns)
    assert ignored("__pycache__", patterns)
    assert ignored(".git/HEAD", patterns)
    assert not ignored(".github", patterns)
    assert ignored("docs/a.md", patterns)
    assert not ignored("docs/keep.md", patterns)


def test_dockerignore_keeps_environments_and_caches_out() -> None:
    patterns = dockerignore_patterns()
    for path in (
        ".venv/bin/python",
        ".git/HEAD",
        "perch/__pycache__/spec.cpython-311.pyc",
        ".pytest_cache/README.md",
        ".mypy_cache/3.11/x.json",
        ".ruff_cache/CACHEDIR.TAG",
        "perch.egg-info/PKG-INFO",
        "build/lib/perch/__init__.py",
        "benchmarks/admission_latency.last.json",
        "tests/conftest.py",
    ):
        assert ignored(path, patterns), f".dockerignore lets {path} into the build context"


@pytest.mark.parametrize("name", IMAGES)
def test_builder_copies_every_package_and_nothing_is_ignored(name: str) -> None:
    builder = next(s for s in dockerfile(name) if s.alias)
    copied = {
        source.rstrip("/")
        for flags, sources, _ in (copy_parts(i) for i in builder.all("COPY"))
        if "from" not in flags
        for source in sources
    }
    includes = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {
        d.name
        for d in ROOT.iterdir()
        if (d / "__init__.py").is_file() and any(fnmatch.fnmatchcase(d.name, p) for p in includes)
    }
    assert packages, includes
    needed = packages | {"pyproject.toml", PYPROJECT["project"]["readme"]}
    assert needed <= copied, f"{name}: the builder does not copy {sorted(needed - copied)}"
    patterns = dockerignore_patterns()
    for source in sorted(copied):
        assert (ROOT / source).exists(), f"{name}: COPY {source}: no such path"
        assert not ignored(source, patterns), f".dockerignore drops {source}, which {name} copies"


# --- scripts/build-images.sh --------------------------------------------------------------------

FAKE_DOCKER = """#!/usr/bin/env bash
# A stand-in docker CLI: records each call, answers `info` as FAKE_DOCKER_INFO says.
printf '%s' "$PWD" >> "$FAKE_DOCKER_LOG"
for arg in "$@"; do printf '\\x1f%s' "$arg" >> "$FAKE_DOCKER_LOG"; done
printf '\\n' >> "$FAKE_DOCKER_LOG"
if [ "$1" = info ]; then
  case "$FAKE_DOCKER_INFO" in
    ok) echo "Server Version: 28.0.0"; exit 0 ;;
    hang) exec sleep 300 ;;
    *) echo "Cannot connect to the Docker daemon at unix:///fake.sock." >&2; exit 1 ;;
  esac
fi
exit 0
"""


def run_build_script(
    *args: str, env: dict[str, str], cwd: Path = ROOT
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(BUILD_SCRIPT), *args],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("PERCH_")} | env,
        cwd=cwd,
        timeout=SCRIPT_DEADLINE,
        check=False,
    )


@pytest.fixture
def fake_docker(tmp_path: Path) -> tuple[Path, Path]:
    binary = tmp_path / "docker"
    binary.write_text(FAKE_DOCKER)
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    return binary, tmp_path / "calls.log"


def recorded_calls(log: Path) -> list[tuple[str, list[str]]]:
    calls = []
    for line in log.read_text().splitlines():
        cwd, *args = line.split("\x1f")
        calls.append((cwd, args))
    return calls


@pytest.mark.skipif(shutil.which("docker") is None, reason="the docker CLI is not installed here")
def test_build_script_says_no_engine_is_reachable(tmp_path: Path) -> None:
    # The real docker CLI, pointed at a socket with nothing behind it.
    done = run_build_script(env={"DOCKER_HOST": f"unix://{tmp_path}/absent.sock"})
    assert done.returncode != 0
    assert "no Docker engine is reachable" in done.stderr, done.stderr
    assert "absent.sock" in done.stderr, "the message should carry docker's own reason"
    assert "make images" in done.stderr


def test_build_script_without_the_docker_cli(tmp_path: Path) -> None:
    done = run_build_script(env={"DOCKER": str(tmp_path / "no-such-docker")})
    assert done.returncode != 0
    assert "docker CLI" in done.stderr and "not installed" in done.stderr, done.stderr


def test_build_script_builds_nothing_when_info_fails(fake_docker: tuple[Path, Path]) -> None:
    binary, log = fake_docker
    done = run_build_script(
        env={"DOCKER": str(binary), "FAKE_DOCKER_LOG": str(log), "FAKE_DOCKER_INFO": "fail"}
    )
    assert done.returncode != 0
    assert "no Docker engine is reachable" in done.stderr
    assert "Cannot connect to the Docker daemon" in done.stderr
    assert [args[0] for _, args in recorded_calls(log)] == ["info"]


def test_build_script_gives_up_on_an_engine_that_never_answers(
    fake_docker: tuple[Path, Path],
) -> None:
    binary, log = fake_docker
    done = run_build_script(
        env={
            "DOCKER": str(binary),
            "FAKE_DOCKER_LOG": str(log),
            "FAKE_DOCKER_INFO": "hang",
            "DOCKER_INFO_TIMEOUT": "1",
        }
    )
    assert done.returncode != 0
    assert "no Docker engine is reachable" in done.stderr
    assert "no answer within 1s" in done.stderr, done.stderr
    assert [args[0] for _, args in recorded_calls(log)] == ["info"]


@pytest.mark.parametrize(
    ("env", "tags"),
    [
        ({}, ("perch-webhook:dev", "perch-analyzer:dev")),
        (
            {
                "PERCH_WEBHOOK_IMAGE": "registry.example/perch-webhook:1.2.3",
                "PERCH_ANALYZER_IMAGE": "registry.example/perch-analyzer:1.2.3",
            },
            ("registry.example/perch-webhook:1.2.3", "registry.example/perch-analyzer:1.2.3"),
        ),
    ],
)
def test_build_script_builds_both_images_from_the_repository_root(
    fake_docker: tuple[Path, Path], tmp_path: Path, env: dict[str, str], tags: tuple[str, str]
) -> None:
    binary, log = fake_docker
    done = run_build_script(
        "--no-cache",
        env={"DOCKER": str(binary), "FAKE_DOCKER_LOG": str(log), "FAKE_DOCKER_INFO": "ok"} | env,
        cwd=tmp_path,  # `make images` may run from anywhere
    )
    assert done.returncode == 0, done.stderr
    calls = recorded_calls(log)
    assert [args[0] for _, args in calls] == ["info", "build", "build"]
    built = []
    for cwd, args in calls[1:]:
        assert Path(cwd) == ROOT, "the build context must be the repository root"
        assert args[-1] == ".", args
        assert "--no-cache" in args, "extra arguments are passed on to docker build"
        built.append((args[args.index("--file") + 1], args[args.index("--tag") + 1]))
        version = f"VERSION={PYPROJECT['project']['version']}"
        assert args[args.index("--build-arg") + 1] == version, args
    assert built == [("Dockerfile.webhook", tags[0]), ("Dockerfile.analyzer", tags[1])]

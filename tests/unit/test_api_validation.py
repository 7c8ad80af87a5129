"""MoEDeployment validation: invalid documents rejected with the field named; examples pass."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from moe_operator.cli import app
from moe_operator.validation import problems
from spec_cases import INVALID, edited

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def test_at_least_thirty_cases() -> None:
    assert len(INVALID) >= 30


@pytest.mark.parametrize(
    ("path", "value", "expected"), INVALID, ids=[f"{p}={v!r}"[:60] for p, v, _ in INVALID]
)
def test_invalid_document_names_the_field(path: str, value: Any, expected: str) -> None:
    found = problems(edited(path, value))
    assert found, f"{path}={value!r} was accepted"
    assert any(expected in message for message in found), found


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.name for e in EXAMPLES])
def test_examples_are_valid(example: Path) -> None:
    for document in yaml.safe_load_all(example.read_text()):
        assert problems(document) == []


def test_validate_command(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump_all([edited("spec.parallelism.pods", 0), edited("spec.extra", 1)])
    )
    result = CliRunner().invoke(app, ["validate", str(bad), *map(str, EXAMPLES)])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2
    assert "(document 1): spec.parallelism.pods" in lines[0]
    assert "(document 2): spec.extra: unknown field" in lines[1]
    assert result.stdout.count(": valid") == len(EXAMPLES)
    ok = CliRunner().invoke(app, ["validate", *map(str, EXAMPLES)])
    assert ok.exit_code == 0


def test_validate_refuses_empty_and_binary_files_in_one_line(tmp_path: Path) -> None:
    empty, binary = tmp_path / "empty.yaml", tmp_path / "binary.yaml"
    empty.write_text("")
    binary.write_bytes(bytes(range(128, 256)))
    for path, said in ((empty, "no MoEDeployment in it"), (binary, "cannot read")):
        result = CliRunner().invoke(app, ["validate", str(path)])
        assert result.exit_code == 1, result.stderr
        assert f"{path}: {said}" in result.stderr and "Traceback" not in result.stderr
        rendered = CliRunner().invoke(app, ["render", str(path)])
        assert rendered.exit_code == 2 and "Traceback" not in rendered.stderr

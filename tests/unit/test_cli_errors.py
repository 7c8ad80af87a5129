"""Every subcommand on broken input: a non-zero exit, one ``error:`` line naming the file, field
or flag and the rule, and no traceback (issue 19). Missing extras name the pip command."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from moe_operator import cli
from moe_operator.cli import app

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "examples" / "tiny.yaml"


def tiny(**edits: object) -> dict:
    """examples/tiny.yaml with dotted-path edits (a value of None deletes the field)."""
    document = yaml.safe_load(TINY.read_text())
    for path, value in edits.items():
        *parents, leaf = path.split("__")
        node = document
        for part in parents:
            node = node[part]
        if value is None:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return document


@dataclass
class Case:
    name: str
    make: Callable[[Path], list[str]]  # tmp dir -> argv
    expect: tuple[str, ...]  # what the error line must contain
    code: int = 2


def write(tmp: Path, name: str, content: str | bytes) -> str:
    path = tmp / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return str(path)


def deployment_file(tmp: Path, **edits: object) -> str:
    return write(tmp, "d.yaml", yaml.safe_dump(tiny(**edits)))


BINARY = bytes(range(256)) * 4


def loads_file(tmp: Path, values: np.ndarray | None = None) -> str:
    path = tmp / "loads.npy"
    np.save(path, np.ones((2, 8)) if values is None else values)
    return str(path)


def checkpoint_dir(tmp: Path) -> str:
    """A directory that passes serve's checks of MODEL_DIR (config, weights, tokenizer files
    present; they are not read before the draft's checks)."""
    model = tmp / "model"
    model.mkdir()
    write(model, "config.json", '{"model_type": "qwen3_moe", "num_experts": 8}')
    write(model, "model.safetensors", "")
    write(model, "tokenizer.json", "{}")
    return str(model)


def plan(tmp: Path, *extra: str, loads: str | None = None) -> list[str]:
    base = ["plan", "--loads", loads or loads_file(tmp), "--gpus", "2", "--slots", "8"]
    return [*base, *extra]


CASES = [
    # validate
    Case(
        "validate binary", lambda t: ["validate", write(t, "b.yaml", BINARY)], ("cannot read",), 1
    ),
    Case("validate empty", lambda t: ["validate", write(t, "e.yaml", "")], ("empty",), 1),
    Case(
        "validate list", lambda t: ["validate", write(t, "l.yaml", "- a\n- b\n")], ("mapping",), 1
    ),
    Case("validate missing", lambda t: ["validate", str(t / "none.yaml")], ("none.yaml",), 1),
    Case(
        "validate true as int",
        lambda t: ["validate", deployment_file(t, spec__model__numExperts=True)],
        ("spec.model.numExperts", "integer"),
        1,
    ),
    Case(
        "validate unknown field",
        lambda t: ["validate", deployment_file(t, spec__model__numExpert=4)],
        ("spec.model.numExpert", "unknown field"),
        1,
    ),
    # render
    Case("render binary", lambda t: ["render", write(t, "b.yaml", BINARY)], ("cannot read",)),
    Case(
        "render no image",
        lambda t: ["render", deployment_file(t, spec__image=None)],
        ("spec.image", "required"),
    ),
    Case("render missing", lambda t: ["render", str(t / "none.yaml")], ("none.yaml",)),
    # run
    Case("run binary", lambda t: ["run", write(t, "b.yaml", BINARY)], ("cannot read",)),
    Case(
        "run bad duration",
        lambda t: ["run", deployment_file(t), "--duration", "0"],
        ("--duration", "> 0"),
    ),
    Case("run bad port", lambda t: ["run", str(TINY), "--port", "70000"], ("--port", "65535")),
    Case("run bad device", lambda t: ["run", str(TINY), "--device", "tpu"], ("--device", "cpu")),
    Case(
        "run invalid",
        lambda t: ["run", deployment_file(t, spec__parallelism__pods=0)],
        ("spec.parallelism.pods",),
    ),
    # plan
    Case("plan no out folder", lambda t: plan(t, "--out", str(t / "no" / "p.json")), ("--out",)),
    Case("plan plot not png", lambda t: plan(t, "--plot", str(t / "p.txt")), ("--plot", ".png")),
    Case(
        "plan binary loads",
        lambda t: plan(t, loads=write(t, "l.npy", BINARY)),
        ("--loads",),
    ),
    Case(
        "plan NaN loads",
        lambda t: plan(t, loads=loads_file(t, np.full((2, 8), np.nan))),
        ("--loads",),
    ),
    Case("plan zero gpus", lambda t: plan(t)[:-4] + ["--gpus", "0", "--slots", "8"], ("--gpus",)),
    Case("plan bad policy", lambda t: plan(t, "--policy", "nope"), ("nope", "balanced")),
    Case("plan json value", lambda t: plan(t, "--json", "true"), ("true",)),
    # verify
    Case(
        "verify no checkpoint",
        lambda t: [
            "verify",
            "--checkpoint",
            str(t / "none"),
            "--ep-size",
            "2",
            "--input",
            loads_file(t),
            "--output",
            str(t / "o.npy"),
        ],
        ("none",),
    ),  # fmt: skip
    Case(
        "verify no output folder",
        lambda t: [
            "verify",
            "--checkpoint",
            str(t),
            "--ep-size",
            "2",
            "--input",
            loads_file(t),
            "--output",
            str(t / "no" / "o.npy"),
        ],
        ("--output", "does not exist"),
    ),  # fmt: skip
    # worker
    Case(
        "worker YAML error",
        lambda t: ["worker", "--config", write(t, "w.yaml", "model: [unclosed\n")],
        ("w.yaml",),
    ),
    Case(
        "worker true as int",
        lambda t: ["worker", "--config", write(t, "w.yaml", "epSize: true\n")],
        ("w.yaml", "epSize", "integer"),
    ),
    Case(
        "worker unknown field",
        lambda t: ["worker", "--config", write(t, "w.yaml", "modle: {}\n")],
        ("w.yaml", "modle"),
    ),
    Case("worker missing", lambda t: ["worker", "--config", str(t / "none.yaml")], ("none.yaml",)),
    # serve
    Case("serve no model", lambda t: ["serve", str(t / "none")], ("none",)),
    Case("serve ep size", lambda t: ["serve", str(t), "--ep-size", "0"], ("--ep-size", ">= 1")),
    Case(
        "serve speculative without draft",
        lambda t: ["serve", str(t), "--speculative-tokens", "2"],
        ("--speculative-tokens", "--draft"),
    ),
    Case(
        "serve draft missing",
        lambda t: ["serve", checkpoint_dir(t), "--draft", str(t / "nodraft")],
        ("--draft", "nodraft", "no such directory"),
    ),
    Case(
        "serve bad config",
        lambda t: ["serve", str(t), "--config", write(t, "c.yaml", "- 1\n")],
        ("--config", "mapping"),
    ),
    # bench-serve
    Case(
        "bench-serve rate twice",
        lambda t: ["bench-serve", "http://127.0.0.1:9", "--rate", "1", "--rate-profile", "0:1"],
        ("--rate",),
    ),
    Case(
        "bench-serve bad profile",
        lambda t: ["bench-serve", "http://127.0.0.1:9", "--rate-profile", "soon"],
        ("--rate-profile", "SECONDS:REQUESTS_PER_S"),
    ),
    Case(
        "bench-serve no out folder",
        lambda t: ["bench-serve", "http://127.0.0.1:9", "--out", str(t / "no" / "r.json")],
        ("--out", "does not exist"),
    ),
    Case(
        "plan previous garbage",
        lambda t: plan(t, "--previous", write(t, "p.json", "garbage")),
        ("--previous",),
    ),
    Case("validate folder", lambda t: ["validate", str(t)], ("cannot read",), 1),
    Case(
        "plan ragged loads",
        lambda t: plan(t, loads=write(t, "r.json", '{"counts": [[1, 2], [3]]}')),
        ("--loads", "rectangular"),
    ),
    Case(
        "bench-serve no server",
        lambda t: ["bench-serve", "http://127.0.0.1:9", "--requests", "1", "--concurrency", "1"],
        ("http://127.0.0.1:9",),
    ),
]


def invoke(argv: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(app, argv)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"{argv}: raised {result.exception!r}") from result.exception
    return result.exit_code, result.stderr


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.lower().startswith("error:")]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_broken_input_is_one_error_line(case: Case, tmp_path: Path) -> None:
    code, stderr = invoke(case.make(tmp_path))
    assert code == case.code, stderr
    assert "Traceback" not in stderr
    errors = error_lines(stderr)
    assert len(errors) == 1, stderr
    for part in case.expect:
        assert part in errors[0], (part, stderr)


def test_verify_rejects_non_finite_input(tmp_path: Path) -> None:
    from hf_checkpoints import save_checkpoint

    checkpoint = save_checkpoint(tmp_path / "ckpt", "qwen3_moe")
    hidden = np.zeros((4, 32), dtype=np.float32)
    hidden[1, 3] = np.nan
    argv = [
        "verify", "--checkpoint", str(checkpoint), "--ep-size", "2", "--input",
        loads_file(tmp_path, hidden), "--output", str(tmp_path / "o.npy"),
    ]  # fmt: skip
    code, stderr = invoke(argv)
    assert code == 2 and "Traceback" not in stderr
    (line,) = error_lines(stderr)
    assert "--input" in line and "NaN" in line
    assert not (tmp_path / "o.npy").exists()


@pytest.mark.parametrize(
    ("blocked", "argv", "expect"),
    [
        ("torch", ["worker", "--config", "w.yaml"], "pip install 'moe-eplb[worker]'"),
        ("torch", ["verify", "--checkpoint", ".", "--ep-size", "1", "--input", "i", "--output",
                   "o"], "pip install 'moe-eplb[worker]'"),
        ("aiohttp", ["run", str(TINY)], "pip install 'moe-eplb[worker]'"),
        ("fastapi", ["serve", "."], "pip install 'moe-eplb[worker]'"),
        ("httpx", ["bench-serve", "http://127.0.0.1:9"], "pip install 'moe-eplb[worker]'"),
    ],
)  # fmt: skip
def test_a_missing_extra_names_the_install(
    blocked: str, argv: list[str], expect: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, blocked, None)  # as if it were not installed
    code, stderr = invoke(argv)
    assert code == 2
    (line,) = error_lines(stderr)
    assert blocked in line and expect in line


def test_the_console_script_turns_a_late_missing_module_into_the_hint(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A module of an extra that a command imports without checking first (a safety net)."""

    def crd() -> None:
        raise ModuleNotFoundError("No module named 'kopf'", name="kopf")

    monkeypatch.setattr(sys, "argv", ["moe-eplb", "crd"])
    monkeypatch.setattr("moe_operator.crdgen.render", crd)
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "kopf" in line and "pip install 'moe-eplb[operator]'" in line


def test_help_shows_flags_without_a_value_and_keeps_brackets() -> None:
    result = CliRunner().invoke(app, ["plan", "--help"])
    assert result.exit_code == 0
    assert "<bool>" not in result.stdout
    assert "[layers, experts]" in result.stdout
    json_line = next(line for line in result.stdout.splitlines() if "--json" in line)
    assert "BOOLEAN" not in json_line and "<" not in json_line


def test_validate_and_render_show_what_they_assume(tmp_path: Path) -> None:
    path = deployment_file(
        tmp_path, spec__model=None, spec__eplb__numRedundantExperts=3
    )  # EP 2 does not divide 16 + 3
    result = CliRunner().invoke(app, ["validate", path])
    assert result.exit_code == 0
    assert "valid" in result.stdout
    notes = [line for line in result.stderr.splitlines() if line.startswith("note:")]
    assert any("spec.model: not given" in n and "numExperts 16" in n for n in notes), notes
    assert any("numRedundantExperts: 3 asked, 4 used" in n for n in notes), notes
    rendered = CliRunner().invoke(app, ["render", path])
    assert rendered.exit_code == 0
    assert rendered.stderr.count("note:") == 2
    manifests = list(yaml.safe_load_all(rendered.stdout))  # stdout stays pure YAML
    config_map = next(m for m in manifests if m["kind"] == "ConfigMap")
    worker = yaml.safe_load(next(iter(config_map["data"].values())))
    assert worker["model"]["numExperts"] == 16
    assert worker["eplb"]["numRedundantExperts"] == 4
    # A deployment that spells everything out gets no notes.
    quiet = CliRunner().invoke(app, ["validate", str(TINY)])
    assert quiet.exit_code == 0 and "note:" not in quiet.stderr


def test_run_ends_when_a_pod_crash_loops(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pods' command dies at once with an error (as a worker without its checkpoint does):
    `run` stops restarting it after CRASH_LIMIT tries, exits 1 and prints what the pod said."""
    from moe_operator.runtime import local

    def failing(self: local.LocalPods, ordinal: int) -> tuple[list[str], dict[str, str]]:
        said = f"print('error: pod {ordinal}: /models/x: not a directory', file=sys.stderr)"
        return [sys.executable, "-c", f"import sys; {said}; sys.exit(3)"], {}

    monkeypatch.setattr(local.LocalPods, "_command", failing)
    monkeypatch.setattr(local, "read_summaries", lambda workdir: [])
    report = tmp_path / "run.json"
    argv = ["run", str(TINY), "--device", "cpu", "--report", str(report), "--duration", "120"]
    code, stderr = invoke(argv)
    assert code == 1 and "Traceback" not in stderr
    (line,) = error_lines(stderr)
    assert "exited 3 times in a row" in line and "last exit code 3" in line
    assert "/models/x: not a directory" in stderr  # the pod's own last lines follow
    assert "exited 3 times in a row" in yaml.safe_load(report.read_text())["failure"]


@pytest.mark.parametrize(
    ("exits", "looping"),
    [
        ([(1, 2.0), (1, 2.0), (1, 2.0)], True),
        ([(1, 2.0), (1, 2.0)], False),  # not yet
        ([(1, 2.0), (0, 2.0), (1, 2.0)], False),  # one clean exit between
        ([(1, 2.0), (1, 300.0), (1, 2.0)], False),  # it ran a long while in between
        ([(1, 2.0), (1, 2.0), (1, 2.0), (0, 9.0)], False),  # the latest was clean
    ],
)
def test_crash_looping(exits: list[tuple[int, float]], looping: bool) -> None:
    from moe_operator.runtime.local import crash_looping

    records = [{"pod": 0, "code": c, "lived_s": s} for c, s in exits]
    records.insert(1, {"pod": 1, "code": 1, "lived_s": 1.0})  # another pod's exits don't count
    assert crash_looping(records, 0) is looping


@pytest.mark.parametrize(
    ("blocked", "argv", "then"),
    [
        ("kopf", ["run", str(TINY), "--duration", "0"], "--duration"),  # no API server here
        ("torch", ["bench-serve", "http://127.0.0.1:9", "--concurrency", "1"], "127.0.0.1:9"),
    ],
)
def test_commands_ask_only_for_what_they_import(
    blocked: str, argv: list[str], then: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, blocked, None)
    code, stderr = invoke(argv)
    (line,) = error_lines(stderr)
    assert code == 2 and "pip install" not in line and then in line


def test_the_extras_named_are_the_packages_extras() -> None:
    import tomllib

    from moe_operator.extras import COMMAND_NEEDS, EXTRA_MODULES

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert set(EXTRA_MODULES) <= set(declared)
    assert {extra for _, extra in COMMAND_NEEDS.values()} <= set(declared)

"""`moe-eplb plan`: outputs, files, and one-line errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from moe_operator.cli import app

TRACES = Path(__file__).resolve().parents[2].parent / "shared" / "traces"


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["plan", *args])
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture()
def loads_json(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "loads.json"
    path.write_text(json.dumps({"counts": rng.integers(0, 1000, size=(4, 16)).tolist()}))
    return path


def test_json_report_and_out_file(loads_json: Path, tmp_path: Path) -> None:
    out = tmp_path / "placement.json"
    code, stdout, _ = run(
        "--loads", str(loads_json), "--gpus", "4", "--slots", "20", "--out", str(out), "--json"
    )
    assert code == 0
    report = json.loads(stdout)
    assert report["policy"] == "balanced"
    assert report["balancedness_after"] > report["balancedness_before"]
    assert report["balancedness_after"] <= report["balancedness_bound"] + 1e-9
    placement = json.loads(out.read_text())
    assert np.asarray(placement["phy2log"]).shape == (4, 20)
    assert np.asarray(placement["replica_count"]).sum(axis=1).tolist() == [20] * 4


def test_previous_gives_moved_copies(loads_json: Path, tmp_path: Path) -> None:
    out = tmp_path / "placement.json"
    assert (
        run("--loads", str(loads_json), "--gpus", "4", "--slots", "20", "--out", str(out))[0] == 0
    )
    code, stdout, _ = run(
        "--loads",
        str(loads_json),
        "--gpus",
        "4",
        "--slots",
        "20",
        "--policy",
        "incremental",
        "--previous",
        str(out),
        "--json",
    )
    assert code == 0
    report = json.loads(stdout)
    assert report["baseline"] == "previous"
    assert report["moved_copies"] == 0  # same load: nothing needs to move


def test_table_output_and_plot(loads_json: Path, tmp_path: Path) -> None:
    plot = tmp_path / "plot.png"
    code, stdout, _ = run(
        "--loads", str(loads_json), "--gpus", "4", "--slots", "20", "--plot", str(plot)
    )
    assert code == 0
    assert "balancedness after" in stdout and "upper bound" in stdout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_npy_and_real_trace(tmp_path: Path) -> None:
    counts = json.loads((TRACES / "qwen2_57b_a14b_sharegpt.json").read_text())["counts"]
    path = tmp_path / "trace.npy"
    np.save(path, np.asarray(counts))
    code, stdout, _ = run("--loads", str(path), "--gpus", "8", "--slots", "72", "--json")
    assert code == 0
    # DeepSeek's EPLB reaches 0.9938 on this trace with 8 GPUs and 72 slots (traces README).
    assert json.loads(stdout)["balancedness_after"] > 0.9938


@pytest.mark.parametrize(
    ("content", "args", "message"),
    [
        ([1, 2, 3], ["--gpus", "2", "--slots", "4"], "2-D"),
        ([[1, -2, 3, 4]], ["--gpus", "2", "--slots", "4"], "non-negative"),
        (
            [[1, 2, 3, 4]],
            ["--gpus", "3", "--slots", "4"],
            "--slots: must be divisible by num_gpus 3",
        ),
        (
            [[1, 2, 3, 4]],
            ["--gpus", "2", "--slots", "2"],
            "--slots: must be >= the number of experts 4",
        ),
        (
            [[1, 2, 3, 4]],
            ["--gpus", "2", "--slots", "4", "--policy", "magic"],
            "available: balanced",
        ),
        ({"rows": []}, ["--gpus", "2", "--slots", "4"], '"counts" field'),
        (
            [[1, 2, 3, 4]],
            ["--gpus", "2", "--slots", "4", "--out", "/nonexistent-folder/p.json"],
            "--out: folder /nonexistent-folder does not exist",
        ),
        (
            [[1, 2, 3, 4]],
            ["--gpus", "2", "--slots", "4", "--plot", "plot.txt"],
            "--plot: must name a .png file",
        ),
    ],
)
def test_bad_input_one_line_error(
    tmp_path: Path, content: object, args: list[str], message: str
) -> None:
    path = tmp_path / "loads.json"
    path.write_text(json.dumps(content))
    code, stdout, stderr = run("--loads", str(path), *args)
    assert code != 0
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert message in lines[0]


def test_previous_of_another_shape(loads_json: Path, tmp_path: Path) -> None:
    previous = tmp_path / "previous.json"
    previous.write_text(json.dumps({"phy2log": [[0, 1, 2, 3]]}))
    code, _, stderr = run(
        "--loads", str(loads_json), "--gpus", "4", "--slots", "20", "--previous", str(previous)
    )
    assert code != 0
    assert stderr.startswith("error: --previous") and len(stderr.strip().splitlines()) == 1


def test_missing_file(tmp_path: Path) -> None:
    code, _, stderr = run("--loads", str(tmp_path / "nope.json"), "--gpus", "2", "--slots", "4")
    assert code != 0 and "nope.json" in stderr

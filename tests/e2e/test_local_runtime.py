"""`moe-eplb run`: the tiny deployment as local processes under the operator's policy loop."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_run_remaps_on_low_balancedness_and_writes_the_report(tmp_path: Path) -> None:
    document = yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())
    # Remap as soon as balancedness is below 0.999 (always, with skewed routing).
    document["spec"]["remap"] = {
        "balancednessThreshold": 0.999,
        "sustainedSeconds": 2,
        "minIntervalSeconds": 5,
    }
    document["spec"]["eplb"]["stepInterval"] = 1000000  # only the operator's remaps
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(document))
    report = tmp_path / "out" / "run.json"
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "moe-eplb"),
            "run",
            str(path),
            "--duration",
            "30",
            "--report",
            str(report),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    timeline = json.loads(report.read_text())
    assert report.with_suffix(".png").stat().st_size > 10_000
    assert timeline["points"], "no metrics snapshots"
    assert all(p["ep_size"] == 2 for p in timeline["points"])
    remaps = [a for a in timeline["actions"] if a["action"] == "remap"]
    assert remaps and "below 0.999" in remaps[0]["reason"]
    # The workers carried the remaps out: the mapping generation moved after the first one.
    after = [p for p in timeline["points"] if p["t"] > remaps[0]["t"]]
    assert max(p["mapping_generation"] for p in after) >= 1
    assert "remaps" in result.stdout


def test_run_rejects_an_invalid_file_with_the_field_named(tmp_path: Path) -> None:
    document = yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())
    document["spec"]["parallelism"]["expertParallelSize"] = 0
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(document))
    result = subprocess.run(
        [str(Path(sys.executable).parent / "moe-eplb"), "run", str(path), "--duration", "5"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "spec.parallelism.expertParallelSize" in result.stderr

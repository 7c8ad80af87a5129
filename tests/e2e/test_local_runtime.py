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


def run_tiny(tmp_path: Path, document: dict, duration: int) -> tuple[dict, str]:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(document))
    report = tmp_path / "out" / "run.json"
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "moe-eplb"),
            "run",
            str(path),
            "--duration",
            str(duration),
            "--report",
            str(report),
            "--check-outputs",
        ],
        capture_output=True,
        text=True,
        timeout=duration + 180,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert report.with_suffix(".png").stat().st_size > 10_000
    return json.loads(report.read_text()), result.stdout


def test_run_remaps_and_resizes_live_with_outputs_equal_to_the_reference(tmp_path: Path) -> None:
    """The tiny example, its load phases shortened: remaps, then EP 2 -> 3 -> 4 -> 3 -> 2 live."""
    document = yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())
    # 15 s per load phase; the burst comes in the third, so the volume stays put while the
    # policy remaps the drifting skew in the first 30 s (a burst changes the skew at once: a
    # placement planned just before it reads ~0.8 right after it, whatever the policy did).
    document["spec"]["workload"].update(profilePeriodSteps=300, loadProfile=[1, 1, 3, 1])
    # As in the example, only the policy remaps within the run (the workers' periodic rebalance
    # is 150 s away), and the hot experts move every 15 s: longer than the policy's 5 s of
    # patience plus the remap, so the remapped placement serves a while before the next shift.
    assert document["spec"]["eplb"]["stepInterval"] >= 3000
    assert document["spec"]["workload"]["driftPeriod"] == 2400
    document["spec"]["elastic"].update(scaleUpCooldownSeconds=4, scaleDownCooldownSeconds=4)
    report, stdout = run_tiny(tmp_path, document, duration=75)
    threshold = report["threshold"]
    points, actions = report["points"], report["actions"]

    # only what the leader accepted counts; each accepted remap is seen done (the mapping
    # generation moved) and the report says when
    remaps = [a for a in actions if a["action"] == "remap" and a["outcome"] == "done"]
    assert remaps, f"no remap of the sagging balancedness was accepted and done: {actions}"
    assert all(r["finished_t"] >= r["t"] for r in remaps)
    assert all(
        a["outcome"] == "done" or a["outcome"].startswith("refused")
        for a in actions
        if a["action"] == "remap" and a["t"] < report["points"][-1]["t"] - 10
    ), actions
    # A remap lifts the measured balancedness (over a refilled window: a layer's reading waits
    # for half a window after its maps change) above the threshold within 8 s.
    lifted = [
        (r["t"], p["t"], p["balancedness"])
        for r in remaps
        for p in points
        if r["t"] < p["t"] <= r["t"] + 8 and p["balancedness"] > threshold
    ]
    assert lifted, f"no snapshot above {threshold} within 8 s of any remap: {remaps}"

    resizes = [
        (a["from_ep_size"], a["to_ep_size"])
        for a in actions
        if a["action"] == "resize" and a["outcome"] == "done"
    ]
    assert resizes[:4] == [(2, 3), (3, 4), (4, 3), (3, 2)], resizes
    done = [e["event"] for e in report["events"]]
    assert done[:4] == [f"resize to {n}: done" for n in (3, 4, 3, 2)], done
    sizes = [p["ep_size"] for p in points]
    assert 4 in sizes and sizes[-1] == 2

    # Under load, no step failed (no pod died, no recovery) and every rank's every step equals
    # the dense reference, including the ranks that joined and later retired.
    assert report["podRestarts"] == 0
    ranks = report["ranks"]
    assert len([r for r in ranks if r["retired"]]) >= 2, "ranks 2 and 3 retired"
    assert all(r["recoveries"] == 0 and r["outputMismatches"] == 0 for r in ranks), ranks
    assert sum(r["outputsChecked"] for r in ranks) > 500
    assert "0 differ" in stdout


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

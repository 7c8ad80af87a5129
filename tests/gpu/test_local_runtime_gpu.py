"""`moe-eplb run` with local GPUs: `--device auto` puts every rank on its own GPU (one local pod
per GPU), the workload's requests are served there with none failing, and the check answers
equal the single-process reference's (on the CPU). Runs on a machine with at least one CUDA GPU
(as many ranks as GPUs, up to 2); skips elsewhere."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_run_auto_puts_each_rank_on_its_own_gpu(tmp_path: Path) -> None:
    ranks = min(torch.cuda.device_count(), 2)
    document = yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())
    spec = document["spec"]
    spec["parallelism"] = {"pods": ranks, "gpusPerPod": 1}
    spec["elastic"] = {"enabled": False}
    spec["eplb"]["stepInterval"] = 100  # rebalances move weights on the GPUs too
    path = tmp_path / "gpu.yaml"
    path.write_text(yaml.safe_dump(document))
    report = tmp_path / "out" / "run.json"
    command = [sys.executable, "-m", "moe_operator.cli", "run", str(path), "--duration", "40"]
    command += ["--report", str(report), "--check-outputs"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "device: local GPUs" in result.stdout, result.stdout[-2000:]
    written = json.loads(report.read_text())
    summaries = written["ranks"]
    assert sorted(s["rank"] for s in summaries) == list(range(ranks)), summaries
    # One GPU per local pod: each sees only its own, as cuda:0.
    assert all(s["device"] == "cuda:0" for s in summaries), summaries
    assert all(s["requestsFinished"] > 0 for s in summaries), summaries
    assert all("ok" in s.get("rebalances", []) for s in summaries), summaries
    traffic, checks = written["traffic"], written["checks"]
    assert traffic["requests_failed"] == 0 and traffic["requests_completed"] > 50, traffic
    assert checks["checked"] >= 5 and checks["mismatches"] == [] and checks["errors"] == []

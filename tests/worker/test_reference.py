"""The single-process reference that `moe-eplb run --check-outputs` compares answers with equals
transformers' own greedy generate on the same checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from hf_checkpoints import E, save_checkpoint
from serving_harness import reference_greedy, same_greedy


def run_reference(directory: Path) -> subprocess.CompletedProcess[str]:
    """``python -m moe_worker.reference`` on worker.yaml and in.json in ``directory``."""
    command = [sys.executable, "-m", "moe_worker.reference"]
    command += [
        "--config",
        str(directory / "worker.yaml"),
        "--requests",
        str(directory / "in.json"),
    ]
    command += ["--out", str(directory / "out.json")]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_reference_answers_equal_transformers_generate(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model_dir = save_checkpoint(tmp_path / "model", "qwen3_moe")
    config = {
        "model": {"source": "checkpoint", "path": str(model_dir), "numExperts": E},
        # what a deployment's ranks run: EP 2 with redundant slots, EPLB on, serving
        "epSize": 2,
        "eplb": {"numRedundantExperts": 2},
        "serving": {"enabled": True, "port": 8000},
    }
    (tmp_path / "worker.yaml").write_text(yaml.safe_dump(config))
    prompts = [[5, 9, 200, 31], [77] * 3, list(range(40, 60))]
    (tmp_path / "in.json").write_text(json.dumps({"prompts": prompts, "maxTokens": 7}))
    done = run_reference(tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    answers = json.loads((tmp_path / "out.json").read_text())["answers"]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for prompt, got in zip(prompts, answers, strict=True):
        assert same_greedy(model, prompt, reference_greedy(model, prompt, 7), got) is None


def test_reference_names_a_bad_requests_file(tmp_path: Path) -> None:
    (tmp_path / "worker.yaml").write_text("{}")
    (tmp_path / "in.json").write_text('{"prompts": [[1, 2]]}')
    done = run_reference(tmp_path)
    assert done.returncode == 2 and "maxTokens" in done.stderr

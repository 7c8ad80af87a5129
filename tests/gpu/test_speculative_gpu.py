"""Speculative decoding and a vision-language MoE checkpoint on a CUDA GPU (float32): the
serving engine's greedy output against transformers' own generate on the same GPU (for the
vision-language checkpoint through the same wrapper). Skips without a GPU."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from hf_checkpoints import VISION_LANGUAGE, E, save_checkpoint
from serving_harness import generate_in_process, reference_greedy, same_greedy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [40, 41], [200, 7, 7, 9, 100], [3] * 17]
TOKENS = 16


def cuda_engine(main: Path, draft: Path) -> Any:
    from moe_worker.config import WorkerConfig
    from moe_worker.engine import create_engine

    config = WorkerConfig.model_validate(
        {
            "model": {
                "source": "checkpoint",
                "path": str(main),
                "numExperts": E,
                "draft": {"source": "checkpoint", "path": str(draft), "numExperts": E},
            },
            "serving": {"enabled": True, "maxBatchTokens": 16, "maxRunningRequests": 8},
            "eplb": {"numRedundantExperts": 2, "windowSize": 200, "stepInterval": 100000},
            "device": "cuda",
        }
    )
    return create_engine(config, device=torch.device("cuda", 0))


def reference(path: Path) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    config = json.loads((path / "config.json").read_text())
    auto = AutoModelForImageTextToText if "vision_config" in config else AutoModelForCausalLM
    return auto.from_pretrained(path, dtype=torch.float32).to("cuda").eval()


@pytest.mark.parametrize(
    ("main", "draft"),
    [("qwen3_moe", "qwen3_moe"), ("qwen3_moe", "deepseek_v3"), (VISION_LANGUAGE, VISION_LANGUAGE)],
)
def test_speculative_serving_on_a_gpu_equals_transformers(
    main: str, draft: str, tmp_path: Path
) -> None:
    main_dir = save_checkpoint(tmp_path / "main", main, seed=0)
    draft_dir = main_dir if draft == main else save_checkpoint(tmp_path / "draft", draft, seed=4)
    engine = cuda_engine(main_dir, draft_dir)
    got = generate_in_process(engine, PROMPTS, TOKENS)
    ref = reference(main_dir)
    problems = [
        same_greedy(ref, p, reference_greedy(ref, p, TOKENS), g)
        for p, g in zip(PROMPTS, got, strict=True)
    ]
    assert problems == [None] * len(PROMPTS), problems
    assert engine.proposed_tokens > 0
    if draft == main:
        assert engine.accepted_tokens == engine.proposed_tokens
    assert list(engine.eplb.models) == ["main", "draft"]

"""Elastic EP under the serving engine: a live resize 2 -> 3 and a killed rank's replacement
move the transformers model's experts as they move the simulator's, and every rank's answers
still equal transformers' own greedy generate afterwards."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from distributed import free_port
from hf_checkpoints import E, save_checkpoint
from rank_processes import RankProcesses
from serving_harness import complete_ids, reference_greedy, same_greedy


def answers_equal_reference(model: Any, urls: list[str], seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 256, (n,), generator=generator).tolist() for n in (4, 11, 23)]
    jobs = [(url, prompt) for url in urls for prompt in prompts]
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda job: complete_ids(job[0], job[1], 8), jobs))
    problems = [
        same_greedy(model, prompt, reference_greedy(model, prompt, 8), got)
        for (_, prompt), got in zip(jobs, answers, strict=True)
    ]
    assert problems == [None] * len(jobs), problems


def test_resize_and_recovery_keep_answers_equal_to_transformers(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model_dir = save_checkpoint(tmp_path / "model", "qwen2_moe", layout="fused")
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    api_port = free_port(consecutive=4)
    config = {
        "deployment": "serving-elastic",
        "model": {"source": "checkpoint", "path": str(model_dir), "numExperts": E},
        "serving": {
            "enabled": True,
            "port": api_port,
            "maxBatchTokens": 16,
            "maxRunningRequests": 8,
        },
        # 2 ranks x 5 slots; at 3 ranks the same 5 slots per rank hold 7 redundant copies.
        "eplb": {"numRedundantExperts": 2, "windowSize": 50, "stepInterval": 100000},
        "elastic": {"collectiveTimeoutS": 20, "replacementTimeoutS": 60},
    }
    ranks = RankProcesses(tmp_path, config, world=2)
    urls = [f"http://127.0.0.1:{api_port + rank}" for rank in range(3)]
    try:
        for rank in (0, 1):
            ranks.start(rank)
        ranks.wait(lambda: all(ranks.readyz(r)[0] == 200 for r in (0, 1)), 120, "ready")
        answers_equal_reference(reference, urls[:2], seed=1)

        ranks.start(2)  # a scale-up's new pod: it waits on standby until the resize takes it
        ranks.wait(lambda: ranks.readyz(2)[1].get("status") == "standby", 120, "standby")
        assert ranks.readyz(2)[0] == 503  # it admits no request before it is in the group
        assert ranks.state()["standbyRanks"] == [2]
        code, body = ranks.control("POST", "/v1/ep/resize", {"epSize": 3})
        assert code == 202, body
        state = ranks.wait(
            lambda: (
                (s := ranks.state())["epSize"] == 3 and s["resize"]["phase"] == "committed" and s
            ),
            120,
            "the resize to commit",
        )
        assert state["topologyGeneration"] == 1
        ranks.wait(
            lambda: ranks.readyz(2)[0] == 200 and ranks.readyz(2)[1]["status"] == "ready",
            60,
            "the joiner to serve",
        )
        answers_equal_reference(reference, urls, seed=2)

        ranks.kill(1)
        ranks.expected_exits.add(1)
        ranks.wait(
            lambda: ranks.state()["resize"].get("phase") == "recovering", 60, "the death noticed"
        )
        ranks.expected_exits.discard(1)
        ranks.start(1)  # the restarted pod keeps its ordinal
        state = ranks.wait(
            lambda: (
                (s := ranks.state())["recoveries"] >= 1
                and s["resize"]["phase"] == "committed"
                and s
            ),
            120,
            "the recovery",
        )
        assert state["resize"]["lostRanks"] == [1] and state["epSize"] == 3
        ranks.wait(lambda: ranks.readyz(1)[0] == 200, 60, "the replacement to serve")
        answers_equal_reference(reference, urls, seed=3)
    finally:
        ranks.stop()

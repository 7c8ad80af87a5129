"""Real inference end to end: ``moe-eplb serve`` on tiny checkpoints of every family, at EP 1,
2 and 4 under random placements, against transformers' own greedy ``generate``.

Eight requests of different lengths are in flight together (chunked prefill: a 16-token step
budget); then eight more, and a rebalance requested through the router commits while they
generate. Every answer must equal the reference token for token (a difference is accepted only
at a near tie of the reference's top-2 logits).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from hf_checkpoints import FAMILIES, MOE_LAYERS, E, save_checkpoint
from serving_harness import (
    ServeProcess,
    complete_ids,
    random_placement_config,
    reference_greedy,
    same_greedy,
    wait_for,
)

PROMPT_LENGTHS = (1, 3, 7, 12, 18, 25, 33, 41)
FIRST_TOKENS, SECOND_TOKENS = 10, 96


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    # Both layouts: transformers' save (per-expert, sharded) and fused tensors.
    return {
        family: save_checkpoint(
            root / family, family, layout="saved" if i % 2 == 0 else "fused", shards=2, seed=i
        )
        for i, family in enumerate(FAMILIES)
    }


def prompts(seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]


def check_all(model: Any, batch: list[list[int]], answers: list[list[int]], tokens: int) -> None:
    problems = []
    for index, (prompt, got) in enumerate(zip(batch, answers, strict=True)):
        want = reference_greedy(model, prompt, tokens)
        problem = same_greedy(model, prompt, want, got)
        if problem:
            problems.append(f"request {index} (prompt of {len(prompt)}): {problem}")
    assert not problems, "\n".join(problems)


# Every family at EP 1 (no communication) and at EP 2 or 4 (the all-to-alls), each EP size
# more than once (the suite's time: CI runs on two cores).
SERVING_CASES = [(f, 1) for f in FAMILIES] + [
    ("mixtral", 2),
    ("qwen2_moe", 2),
    ("deepseek_v2", 2),
    ("qwen3_moe", 4),
    ("deepseek_v3", 2),
]


@pytest.mark.parametrize(("family", "ep_size"), SERVING_CASES)
def test_greedy_generations_equal_transformers(
    family: str, ep_size: int, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    model_dir = checkpoints[family]
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    config = random_placement_config(
        tmp_path / "placement.json",
        len(MOE_LAYERS[family]),
        E,
        E + 2 * ep_size,
        seed=ep_size,
        policy="balanced",
    )
    with ServeProcess(model_dir, ep_size, config, tmp_path) as server:
        first = prompts(seed=ep_size)
        with ThreadPoolExecutor(len(first)) as pool:
            answers = list(pool.map(lambda p: complete_ids(server.url, p, FIRST_TOKENS), first))
        check_all(reference, first, answers, FIRST_TOKENS)

        # Eight more, streamed; a rebalance is requested once they all generate, and must
        # commit while some are still running.
        second = prompts(seed=100 + ep_size)
        open_streams = [0]
        lock = threading.Lock()
        started = threading.Barrier(len(second) + 1)

        def streamed(prompt: list[int]) -> list[int]:
            with lock:
                open_streams[0] += 1
            try:
                started.wait(timeout=60)
                return complete_ids(server.url, prompt, SECOND_TOKENS, stream=True)
            finally:
                with lock:
                    open_streams[0] -= 1

        state_before = server.state()
        generation_before, step_before = state_before["mappingGeneration"], state_before["step"]
        committed_while_running: list[bool] = []

        def committed() -> bool:
            state = server.state()
            if state["mappingGeneration"] > generation_before:
                with lock:
                    committed_while_running.append(open_streams[0] > 0)
                return True
            return False

        with ThreadPoolExecutor(len(second)) as pool:
            futures = [pool.submit(streamed, p) for p in second]
            started.wait(timeout=60)
            wait_for(
                lambda: server.state()["step"] > step_before + 3, 60, "the second batch to run"
            )
            assert server.rebalance().status_code == 202
            wait_for(committed, 120, "the rebalance to commit")
            answers = [f.result(timeout=300) for f in futures]
        last = server.state()["lastRebalance"]
        assert last["result"] == "ok", last
        if ep_size > 1:  # one rank is balanced whatever it holds: nothing to move
            assert last["copiesMoved"] > 0, last
        assert committed_while_running == [True], f"committed after the requests finished: {last}"
        check_all(reference, second, answers, SECOND_TOKENS)
    assert server.process.returncode == 0, "\n".join(server.lines[-20:])


def test_openai_client_streamed_and_not_agree(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """The official client against the served model (EP 2): completions and chat, streamed or
    not, give the same tokens; bad requests get 400 naming the field; control needs the token."""
    import httpx
    import openai

    with ServeProcess(checkpoints["qwen3_moe"], 2, None, tmp_path) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        (model,) = [m.id for m in client.models.list().data]
        assert model == "qwen3_moe"
        prompt = "MoE experts on two ranks"
        plain = client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=12,
            temperature=0,
            extra_body={"ignore_eos": True, "return_token_ids": True},
        )
        streamed = client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True, "return_token_ids": True},
        )
        chunks = list(streamed)
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        ids = [
            i
            for c in chunks
            if c.choices
            for i in (c.choices[0].model_extra or {}).get("token_ids") or []
        ]
        assert plain.choices[0].model_extra["token_ids"] == ids
        assert plain.choices[0].text == text
        assert plain.usage.completion_tokens == 12 == chunks[-1].usage.completion_tokens
        assert plain.usage.prompt_tokens == len(prompt.encode())  # byte-level tokenizer

        messages = [{"role": "user", "content": "Which expert is hot?"}]
        chat = client.chat.completions.create(
            model=model,
            messages=messages,
            max_completion_tokens=10,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        chat_stream = client.chat.completions.create(
            model=model,
            messages=messages,
            max_completion_tokens=10,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        chat_text = "".join(c.choices[0].delta.content or "" for c in chat_stream if c.choices)
        assert chat.choices[0].message.content == chat_text
        assert chat.choices[0].finish_reason == "length"

        for body, field in (
            ({"prompt": [5, 1 << 20], "max_tokens": 2}, "prompt"),
            ({"prompt": "x", "max_tokens": 10**6}, "max_tokens"),
            ({"prompt": "x", "model": "no-such-model"}, "model"),
            ({"prompt": "", "max_tokens": 2}, "prompt"),
            ({"prompt": "x", "temperature": -1}, "temperature"),
        ):
            response = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
            assert response.status_code == 400, (body, response.text)
            assert response.json()["error"]["param"] == field, response.text
        assert httpx.post(server.url + "/v1/eplb/rebalance", timeout=30).status_code == 401
        assert httpx.get(server.url + "/health", timeout=30).status_code == 200


def test_serve_rejects_bad_model_dirs_in_one_line(
    tmp_path: Path, checkpoints: dict[str, Path]
) -> None:
    import json
    import shutil

    from typer.testing import CliRunner

    from moe_operator.cli import app

    def error(model_dir: Path) -> str:
        result = CliRunner().invoke(app, ["serve", str(model_dir), "--port", "0"])
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        return lines[0]

    assert "no such directory" in error(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    assert "no config.json" in error(tmp_path / "empty")
    llama = shutil.copytree(checkpoints["mixtral"], tmp_path / "llama")
    config = json.loads((llama / "config.json").read_text())
    (llama / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    assert "'llama' is not supported; supported: deepseek_v2, deepseek_v3, mixtral" in error(llama)
    dense = shutil.copytree(checkpoints["mixtral"], tmp_path / "dense")
    config.pop("num_local_experts")
    (dense / "config.json").write_text(json.dumps({**config, "model_type": "qwen3"}))
    assert "no expert count" in error(dense) and "needs an MoE draft (--draft)" in error(dense)
    bare = shutil.copytree(checkpoints["mixtral"], tmp_path / "bare")
    for file in bare.glob("tokenizer*"):
        file.unlink()
    assert "no tokenizer" in error(bare)

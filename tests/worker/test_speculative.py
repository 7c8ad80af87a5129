"""Speculative decoding with a draft model, and vision-language MoE checkpoints, served for
real: outputs against transformers' own ``generate`` (for a vision-language checkpoint through
the same wrapper), EPLB on both models, rebalances of both mid-generation at EP 2.

The verification rule is checked on its own: greedy keeps the main model's argmax path, and
rejection sampling emits tokens distributed as the main model alone samples them.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from hf_checkpoints import DENSE, VISION_LANGUAGE, E, save_checkpoint
from moe_worker.config import WorkerConfig
from moe_worker.engine import create_engine
from moe_worker.serving.backend import SamplingParams
from moe_worker.serving.sampling import token_probs
from moe_worker.serving.speculative import verify_greedy, verify_sampled
from serving_harness import (
    ServeProcess,
    complete_ids,
    generate_in_process,
    random_placement_config,
    reference_greedy,
    same_greedy,
    wait_for,
)

PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [40, 41], [200, 7, 7, 9, 100], [3] * 17]
TOKENS = 12


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("speculative")
    return {
        "main": save_checkpoint(root / "main", "qwen3_moe", seed=0),
        "unrelated": save_checkpoint(root / "unrelated", "deepseek_v3", seed=5),
        "dense": save_checkpoint(root / "dense", DENSE, seed=2),
        "vl": save_checkpoint(root / "vl", VISION_LANGUAGE, seed=1),
    }


def reference_model(path: Path) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    config = json.loads((path / "config.json").read_text())
    auto = AutoModelForImageTextToText if "vision_config" in config else AutoModelForCausalLM
    return auto.from_pretrained(path, dtype=torch.float32).eval()


def check_greedy(reference: Any, prompts: list[list[int]], answers: list[list[int]]) -> None:
    problems = [
        f"prompt {i}: {problem}"
        for i, (prompt, got) in enumerate(zip(prompts, answers, strict=True))
        if (
            problem := same_greedy(
                reference, prompt, reference_greedy(reference, prompt, TOKENS), got
            )
        )
    ]
    assert not problems, "\n".join(problems)


def engine_for(main: Path, draft: Path | None, k: int = 3, **eplb: Any) -> Any:
    """An in-process serving engine (EP 1) of ``main`` with ``draft`` proposing ``k`` tokens."""
    model: dict[str, Any] = {"source": "checkpoint", "path": str(main), "numExperts": E}
    if draft is not None:
        model["draft"] = {
            "source": "checkpoint",
            "path": str(draft),
            "numExperts": E,
            "numSpeculativeTokens": k,
        }
    config = WorkerConfig.model_validate(
        {
            "model": model,
            "serving": {"enabled": True, "maxBatchTokens": 8, "maxRunningRequests": 4},
            "eplb": {"numRedundantExperts": 2, "windowSize": 500, "stepInterval": 100000, **eplb},
        }
    )
    return create_engine(config)


# --- the verification rule -------------------------------------------------------------------


def test_greedy_verification_keeps_the_main_models_argmax_path() -> None:
    logits = torch.full((4, 10), -1.0)
    for row, best in enumerate([3, 5, 7, 9]):
        logits[row, best] = 1.0
    assert verify_greedy([3, 5, 7], logits).tokens == [3, 5, 7, 9]  # all kept + bonus
    assert verify_greedy([3, 6, 7], logits).tokens == [3, 5]  # the second is corrected
    first = verify_greedy([0, 5, 7], logits)
    assert (first.tokens, first.accepted) == ([3], 0)


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_rejection_sampling_emits_the_main_models_distribution(top_p: float) -> None:
    """Whatever the draft proposes (drawn from its own distribution q), the first emitted
    token is distributed as the main model's p (after temperature and top-p, whose cut leaves
    zeros in both): the empirical frequencies of 40000 seeded trials lie within 0.01 of p in
    every token (and far from q)."""
    params = SamplingParams(max_new_tokens=4, temperature=0.7, top_p=top_p)
    target_logits = torch.tensor([[2.0, 0.5, 0.0, -1.0, 1.0, 0.3], [0.0] * 6, [0.0] * 6])
    draft_logits = torch.tensor([-1.0, 2.0, 1.0, 0.5, -0.5, 0.0])
    p, q = token_probs(target_logits[0], params), token_probs(draft_logits, params)
    p, q = p / p.sum(), q / q.sum()
    if top_p < 1:
        assert (p == 0).any() and (q == 0).any()  # the nucleus cut something in both
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(6)
    trials = 40000
    for _ in range(trials):
        proposed = int(torch.multinomial(q, 1, generator=generator))
        verdict = verify_sampled([proposed, 0], [q, q], target_logits, params, generator)
        counts[verdict.tokens[0]] += 1
    frequencies = counts / trials
    assert torch.max(torch.abs(frequencies - p)) < 0.01, (frequencies, p)
    assert torch.max(torch.abs(frequencies - q)) > 0.2


# --- in process (EP 1) -----------------------------------------------------------------------


def test_a_draft_equal_to_the_main_model_has_every_proposal_accepted(
    checkpoints: dict[str, Path],
) -> None:
    reference = reference_model(checkpoints["main"])
    engine = engine_for(checkpoints["main"], checkpoints["main"], k=4)
    answers = generate_in_process(engine, PROMPTS, TOKENS)
    check_greedy(reference, PROMPTS, answers)
    assert engine.proposed_tokens > 0
    assert engine.accepted_tokens == engine.proposed_tokens
    assert list(engine.eplb.models) == ["main", "draft"]

    # Sampled requests: the draft's distribution is the main model's, so rejection sampling
    # keeps every proposal too; the tokens are valid ids and as many as asked.
    sampled = engine_for(checkpoints["main"], checkpoints["main"], k=4)
    tokens: list[int] = []
    params = SamplingParams(max_new_tokens=TOKENS, temperature=0.9, seed=7, ignore_eos=True)
    sampled.submit("s", PROMPTS[0], params, lambda out: tokens.append(out.token_id))
    while sampled.has_work():
        sampled.step()
    assert len(tokens) == TOKENS and all(0 <= t < 320 for t in tokens)
    assert sampled.accepted_tokens == sampled.proposed_tokens > 0


def test_a_stop_token_among_kept_proposals_ends_the_request_there(
    checkpoints: dict[str, Path],
) -> None:
    """Verification may keep several proposals at once; a stop token among them ends the
    request at that token, the rest unsent."""
    reference = reference_model(checkpoints["main"])
    want = reference_greedy(reference, PROMPTS[0], TOKENS)
    index = next(i for i in range(5, TOKENS) if want[i] not in want[:i])
    engine = engine_for(checkpoints["main"], checkpoints["main"], k=4)
    outputs: list[Any] = []
    params = SamplingParams(
        max_new_tokens=TOKENS, temperature=0, ignore_eos=True, stop_token_ids=(want[index],)
    )
    engine.submit("r", PROMPTS[0], params, outputs.append)
    while engine.has_work():
        engine.step()
    assert [o.token_id for o in outputs] == want[: index + 1]
    assert outputs[-1].finish_reason == "stop"
    assert engine.requests_finished == 1 and not engine.sequences


def test_draft_slots_round_up_to_whole_ranks() -> None:
    from moe_worker.serving.engine import draft_slots

    assert draft_slots(8, 2, 2) == 10
    assert draft_slots(8, 4, 3) == 12
    assert draft_slots(7, 4, 3) == 12  # 11 rounded up: every rank holds 4
    assert draft_slots(60, 0, 8) == 64


def test_a_draft_model_refuses_recovery_naming_it() -> None:
    """A dead rank's replacement would not carry the draft's experts: with a draft the ranks
    exit (ElasticError) and the deployment restarts."""
    from types import SimpleNamespace

    from moe_worker.elastic import ElasticError
    from moe_worker.membership import Membership

    config = WorkerConfig.model_validate(
        {"model": {"draft": {"numExperts": 8}}, "serving": {"enabled": True}}
    )
    membership = object.__new__(Membership)  # recover() decides before touching its state
    with pytest.raises(ElasticError, match="model.draft: a dead rank's replacement"):
        membership.recover(SimpleNamespace(config=config), 0, RuntimeError("peer died"))


def test_input_major_fused_experts_read_as_the_model_lays_them_out(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    """Qwen3-VL-MoE's release stores fused experts input-major ([E, H, 2I], [E, I, H]); read
    either way, every expert is the same."""
    import shutil

    from safetensors.torch import load_file, save_file

    from moe_worker.model.hf_source import CheckpointSource

    copy = shutil.copytree(checkpoints["vl"], tmp_path / "input-major")
    tensors = load_file(str(copy / "model.safetensors"))
    for name in list(tensors):
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            tensors[name] = tensors[name].transpose(1, 2).contiguous()
    save_file(tensors, str(copy / "model.safetensors"))
    saved, transposed = CheckpointSource(checkpoints["vl"]), CheckpointSource(copy)
    for layer in range(2):
        for expert in (0, E - 1):
            want, got = saved.expert(layer, expert), transposed.expert(layer, expert)
            assert all(torch.equal(want[k], got[k]) for k in want), (layer, expert)


def test_an_unrelated_draft_leaves_greedy_output_unchanged(checkpoints: dict[str, Path]) -> None:
    reference = reference_model(checkpoints["main"])
    engine = engine_for(checkpoints["main"], checkpoints["unrelated"], k=3)
    answers = generate_in_process(engine, PROMPTS, TOKENS)
    check_greedy(reference, PROMPTS, answers)
    assert engine.accepted_tokens < engine.proposed_tokens  # a random draft guesses badly
    draft_load = engine.eplb.window_logical_load("draft")
    assert draft_load.sum() > 0  # the draft's MoE layers ran and were recorded


def test_vision_language_main_and_draft_serve_text_through_the_wrapper(
    checkpoints: dict[str, Path],
) -> None:
    """A tiny Qwen3-VL-MoE checkpoint as the main model and as its own draft: text generation
    equals transformers' through the same wrapper; EPLB registered both language models."""
    reference = reference_model(checkpoints["vl"])
    assert type(reference).__name__ == "Qwen3VLMoeForConditionalGeneration"
    engine = engine_for(checkpoints["vl"], checkpoints["vl"], k=3)
    answers = generate_in_process(engine, PROMPTS, TOKENS)
    check_greedy(reference, PROMPTS, answers)
    assert engine.accepted_tokens == engine.proposed_tokens > 0
    assert list(engine.eplb.models) == ["main", "draft"]
    assert [len(engine.eplb.models[m].model.moe_layers) for m in ("main", "draft")] == [2, 2]
    assert not any("visual" in name for name, _ in engine.model.model.named_parameters())


def test_a_dense_main_model_without_a_draft_fails_loudly_with_eplb(
    checkpoints: dict[str, Path],
) -> None:
    from moe_worker.eplb.controller import EPLBRegistrationError

    with pytest.raises(EPLBRegistrationError, match="neither the main model nor its draft"):
        engine_for(checkpoints["dense"], None)
    with pytest.raises(ValueError, match="model.draft: speculative decoding needs serving"):
        WorkerConfig.model_validate(
            {"model": {"draft": {"numExperts": 16}}, "serving": {"enabled": False}}
        )


# --- served (EP 2, the CLI) ------------------------------------------------------------------


def rank_samples(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(samples: dict, name: str, **labels: str) -> float:
    found = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls)]
    assert found, f"no sample {name} {labels}"
    return sum(found)


def serve_and_rebalance_mid_generation(
    server: ServeProcess, models: list[str]
) -> tuple[list[list[int]], dict[str, Any]]:
    """Stream ``PROMPTS`` (longer answers), ask for a rebalance once they all run and wait
    until every model in ``models`` has a new mapping generation. Returns the answers and the
    final state."""
    before = server.state()
    generations = {m: before["models"][m]["mappingGeneration"] for m in models}
    barrier = threading.Barrier(len(PROMPTS) + 1)

    def streamed(prompt: list[int]) -> list[int]:
        barrier.wait(timeout=60)
        return complete_ids(server.url, prompt, 4 * TOKENS, stream=True)

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        futures = [pool.submit(streamed, p) for p in PROMPTS]
        barrier.wait(timeout=60)
        wait_for(lambda: server.state()["step"] > before["step"] + 3, 60, "the requests to run")
        assert server.rebalance().status_code == 202
        running = [not f.done() for f in futures]

        def committed() -> bool:
            now = server.state()["models"]
            return all(now[m]["mappingGeneration"] > generations[m] for m in models)

        wait_for(committed, 120, f"rebalances of {models} to commit")
        committed_while_running = any(not f.done() for f in futures)
        answers = [f.result(timeout=300) for f in futures]
    assert all(running) and committed_while_running, "the rebalance committed after the requests"
    return answers, server.state()


def test_both_models_rebalance_mid_generation_at_ep2(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    """EP 2, a random placement of the main model and an unrelated MoE draft: both models'
    experts move while requests generate, answers stay the main model's greedy ones, and the
    ranks export acceptance and the draft's balancedness."""
    reference = reference_model(checkpoints["main"])
    config = random_placement_config(tmp_path / "placement.json", 2, E, E + 4, seed=3)
    draft = ("--draft", str(checkpoints["unrelated"]), "--speculative-tokens", "2")
    with ServeProcess(checkpoints["main"], 2, config, tmp_path, extra_args=draft) as server:
        answers, state = serve_and_rebalance_mid_generation(server, ["main", "draft"])
        samples = [rank_samples(url) for url in server.rank_urls]
    assert server.process.returncode == 0, "\n".join(server.lines[-20:])
    for prompt, got in zip(PROMPTS, answers, strict=True):
        want = reference_greedy(reference, prompt, 4 * TOKENS)
        assert same_greedy(reference, prompt, want, got) is None
    moved = {
        m: total(samples[0], "moe_rebalance_moved_expert_copies_total", model=m)
        for m in ("main", "draft")
    }
    assert moved["main"] > 0 and moved["draft"] > 0, moved
    proposed = sum(total(s, "moe_spec_decode_num_draft_tokens_total") for s in samples)
    accepted = sum(total(s, "moe_spec_decode_num_accepted_tokens_total") for s in samples)
    assert 0 <= accepted <= proposed and proposed > 0
    assert state["speculative"]["proposedTokens"] > 0  # rank 0's own, in /v1/state
    assert 0 < total(samples[0], "moe_balancedness", model="draft") <= 1


def test_a_dense_main_model_serves_and_balances_its_moe_draft_at_ep2(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    reference = reference_model(checkpoints["dense"])
    config = {"eplb": {"windowSize": 1000, "stepInterval": 100000}}
    draft = ("--draft", str(checkpoints["main"]))
    with ServeProcess(checkpoints["dense"], 2, config, tmp_path, extra_args=draft) as server:
        answers, state = serve_and_rebalance_mid_generation(server, ["draft"])
    assert server.process.returncode == 0, "\n".join(server.lines[-20:])
    assert list(state["models"]) == ["draft"]
    assert state["lastRebalance"]["result"] == "ok"
    for prompt, got in zip(PROMPTS, answers, strict=True):
        want = reference_greedy(reference, prompt, 4 * TOKENS)
        assert same_greedy(reference, prompt, want, got) is None


def test_a_vision_language_checkpoint_serves_text_at_ep2_and_refuses_images(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    reference = reference_model(checkpoints["vl"])
    with ServeProcess(checkpoints["vl"], 2, None, tmp_path) as server:
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            answers = list(pool.map(lambda p: complete_ids(server.url, p, TOKENS), PROMPTS))
        image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
        chat = httpx.post(
            server.url + "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": [image]}], "max_tokens": 2},
            timeout=30,
        )
        assert chat.status_code == 400, chat.text
        assert chat.json()["error"]["param"] == "messages.[0].content", chat.text
        assert "only text content" in chat.json()["error"]["message"]
    assert server.process.returncode == 0, "\n".join(server.lines[-20:])
    check_greedy(reference, PROMPTS, answers)

"""Models built with transformers' classes and our expert-parallel experts, checked against
transformers' own models: logits, MoE blocks under EP (``moe-eplb verify``), what a rank reads,
clear errors, synthetic models, and expert load from the router's real choices."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from hf_checkpoints import FAMILIES, MOE_LAYERS, VOCAB, E, save_checkpoint
from moe_worker.config import ModelConfig, WorkerConfig
from moe_worker.eplb.policy import default_placement
from moe_worker.model.ep_experts import EPGroup
from moe_worker.model.hf_model import build_ep_model
from moe_worker.model.hf_source import CheckpointError, CheckpointSource, SyntheticSource
from moe_worker.verify import random_placement
from serving_harness import generate_in_process


def reference(model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.mark.parametrize("layout", ["saved", "fused"])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_transformers(tmp_path: Path, family: str, layout: str) -> None:
    model_dir = save_checkpoint(tmp_path / family, family, layout, shards=3)
    source = CheckpointSource(model_dir)
    assert source.moe_decoder_layers == MOE_LAYERS[family]
    assert source.num_experts == E
    placement = random_placement(len(MOE_LAYERS[family]), E, E + 3, seed=1)
    ours = build_ep_model(source, placement, EPGroup())
    ids = torch.randint(0, VOCAB, (1, 29), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = ours.model(input_ids=ids).logits
        want = reference(model_dir)(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_transformers_5_configs_load_under_either_spelling(tmp_path: Path) -> None:
    """transformers 5 writes Qwen3-MoE's expert count as num_local_experts; older files say
    num_experts. Both must build the same model."""
    model_dir = save_checkpoint(tmp_path / "q", "qwen3_moe")
    saved = json.loads((model_dir / "config.json").read_text())
    assert "num_local_experts" in saved or "num_experts" in saved
    other = dict(saved)
    count = other.pop("num_local_experts", None) or other.pop("num_experts")
    key = "num_experts" if "num_local_experts" in saved else "num_local_experts"
    (model_dir / "config.json").write_text(json.dumps({**other, key: count}))
    assert CheckpointSource(model_dir).num_experts == E


def test_a_rank_reads_only_the_experts_its_slots_hold(tmp_path: Path) -> None:
    for layout in ("saved", "fused"):
        model_dir = save_checkpoint(tmp_path / layout, "deepseek_v3", layout)
        source = CheckpointSource(model_dir)
        placement = default_placement(2, E, 12)  # 3 ranks x 4 slots
        build_ep_model(source, placement, EPGroup(rank=1, size=3))
        held = {int(e) for e in placement.phy2log[0, 4:8]}
        read = {name for name in source.tensors_read if ".experts." in name}
        experts_read = set()
        for name in read:
            index = name.split(".experts.")[1]
            experts_read.add(
                int(index.split("[")[1].rstrip("]")) if "[" in index else int(index.split(".")[0])
            )
        assert experts_read == held, (layout, sorted(read))


@pytest.mark.parametrize(
    ("family", "ep_size", "placement"),
    [
        ("mixtral", 2, "random"),
        ("qwen2_moe", 2, "balanced"),
        ("qwen3_moe", 4, "balanced"),
        ("deepseek_v2", 2, "random"),
        ("deepseek_v3", 2, "random"),
    ],
)
def test_verify_agrees_with_transformers_blocks(
    tmp_path: Path, family: str, ep_size: int, placement: str
) -> None:
    from typer.testing import CliRunner

    from moe_operator.cli import app

    model_dir = save_checkpoint(tmp_path / family, family)
    hidden = torch.randn((13, 32), generator=torch.Generator().manual_seed(2))
    np.save(tmp_path / "x.npy", hidden.numpy())
    args = ["verify", "--checkpoint", str(model_dir), "--ep-size", str(ep_size)]
    args += ["--placement", placement, "--input", str(tmp_path / "x.npy")]
    args += ["--output", str(tmp_path / "y.npy"), "--seed", "3"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    got = torch.from_numpy(np.load(tmp_path / "y.npy"))
    ref = reference(model_dir)
    assert got.shape == (len(MOE_LAYERS[family]), 13, 32)
    for layer, index in enumerate(MOE_LAYERS[family]):
        with torch.no_grad():
            want = ref.model.layers[index].mlp(hidden[None])
        want = (want[0] if isinstance(want, tuple) else want).reshape(13, 32)
        torch.testing.assert_close(got[layer], want, rtol=1e-4, atol=1e-5)


def test_bad_checkpoints_get_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no config.json"):
        CheckpointSource(tmp_path)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="'llama' is not supported; supported: deepseek_v2"):
        CheckpointSource(tmp_path / "m")
    model_dir = save_checkpoint(tmp_path / "d", "mixtral")
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "hidden_size": 48}))
    source = CheckpointSource(model_dir)
    with pytest.raises(CheckpointError, match=r"has shape \[320, 32\], the model's config expects"):
        build_ep_model(source, default_placement(2, E, E), EPGroup())
    for file in model_dir.glob("tokenizer*"):
        file.unlink()
    with pytest.raises(CheckpointError, match="no tokenizer"):
        source.tokenizer()


@pytest.mark.parametrize("family", FAMILIES)
def test_synthetic_models_are_seeded_and_rebuild_any_expert(family: str) -> None:
    config = ModelConfig(
        family=family,
        num_layers=2,
        hidden_size=32,
        num_experts=8,
        top_k=2,
        intermediate_size=16,
        num_expert_groups=2,
        topk_groups=1,
    )
    placement = default_placement(2, 8, 8)
    a = build_ep_model(SyntheticSource(config), placement, EPGroup())
    b = build_ep_model(SyntheticSource(config), placement, EPGroup())
    ids = torch.tensor([[5, 17, 99, 3, 250]])
    with torch.no_grad():
        torch.testing.assert_close(a.model(input_ids=ids).logits, b.model(input_ids=ids).logits)
    source = SyntheticSource(config)
    for layer in range(2):
        for expert in (0, 5):
            alone = source.expert(layer, expert)
            for name, tensor in alone.items():
                assert torch.equal(a.moe_layers[layer].slots[name][expert], tensor)
    other = SyntheticSource(config.model_copy(update={"seed": 1}))
    assert not torch.equal(other.expert(0, 0)["w_gate"], source.expert(0, 0)["w_gate"])
    tokenizer = source.tokenizer()
    assert tokenizer.decode(tokenizer.encode("héllo 🙂")) == "héllo 🙂"
    assert source.hf_config.vocab_size > len(tokenizer)  # padded, as real checkpoints are


def serving_engine(
    tmp_path: Path, family: str, serving: dict[str, Any], eplb: dict[str, Any] | None = None
) -> tuple[Any, Path]:
    """An in-process ServingEngine over a tiny ``family`` checkpoint (EPLB off unless given),
    and the checkpoint's directory."""
    from moe_worker.engine import create_engine

    model_dir = save_checkpoint(tmp_path / "m", family)
    config = WorkerConfig.model_validate(
        {
            "model": {"source": "checkpoint", "path": str(model_dir), "numExperts": E},
            "serving": {"enabled": True, **serving},
            "eplb": eplb if eplb is not None else {"enabled": False},
        }
    )
    return create_engine(config), model_dir


def test_expert_load_is_the_routers_real_choice(tmp_path: Path) -> None:
    """EPLB's window after serving holds, per logical expert, exactly the top-k choices that
    transformers' own router makes for every prompt and generated token."""
    eplb = {"numRedundantExperts": 4, "windowSize": 500, "stepInterval": 100000}
    engine, model_dir = serving_engine(
        tmp_path, "deepseek_v3", {"maxBatchTokens": 8, "maxRunningRequests": 4}, eplb
    )
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [40, 41], [200, 7, 7, 9, 100]]
    tokens = generate_in_process(engine, prompts, 6)
    assert engine.eplb is not None
    got = engine.eplb.window_logical_load()  # [L, E]

    ref = reference(model_dir)
    want = np.zeros((len(MOE_LAYERS["deepseek_v3"]), E))
    hooks = []
    for layer, index in enumerate(MOE_LAYERS["deepseek_v3"]):

        def count(module: object, args: tuple, layer: int = layer) -> None:
            ids = args[1].flatten().numpy()
            want[layer] += np.bincount(ids, minlength=E)

        hooks.append(ref.model.layers[index].mlp.experts.register_forward_pre_hook(count))
    for i, prompt in enumerate(prompts):
        # every token the server ran: the prompt and each generated token but the last
        with torch.no_grad():
            ref(torch.tensor([prompt + tokens[i][:-1]]))
    for hook in hooks:
        hook.remove()
    assert np.array_equal(got, want), (got, want)
    assert got.sum() == sum(len(p) + 5 for p in prompts) * 3 * 2  # tokens x top-3 x 2 layers


def test_a_leaving_rank_takes_no_new_requests(tmp_path: Path) -> None:
    from moe_worker.serving.backend import BackendBusy, SamplingParams

    engine, _ = serving_engine(
        tmp_path, "mixtral", {"maxRunningRequests": 2, "maxWaitingRequests": 1}
    )
    params = SamplingParams(max_new_tokens=2, temperature=0)
    engine.submit("a", [1, 2], params, lambda out: None)
    with pytest.raises(BackendBusy, match=r"waiting queue is full \(1 requests\)"):
        engine.submit("b", [1, 2], params, lambda out: None)
    engine.stop_accepting()
    with pytest.raises(BackendBusy, match="leaving"):
        engine.submit("c", [3], params, lambda out: None)
    while engine.has_work():  # what it had still finishes
        engine.step()
    assert engine.requests_finished == 1


def test_serving_metrics_see_every_request_once(tmp_path: Path) -> None:
    """The engine reports each request's first token (with its queue time), every later token,
    and one end with its reason: length, abort (client gone), error (the rank failing)."""
    from moe_worker.metrics import WorkerMetrics
    from moe_worker.serving.backend import SamplingParams

    engine, _ = serving_engine(
        tmp_path, "qwen3_moe", {"maxBatchTokens": 4, "maxRunningRequests": 2}
    )
    metrics = WorkerMetrics("t", 0, "torch_gloo", "balanced", False)
    engine.observer = metrics
    params = SamplingParams(max_new_tokens=3, temperature=0, ignore_eos=True)
    for name in ("a", "b", "c"):  # c waits: two run at a time
        engine.submit(name, [5, 6, 7], params, lambda out: None)
    engine.step()
    value = metrics.registry.get_sample_value
    labels = {"deployment": "t", "rank": "0"}
    assert value("moe_num_requests_running", labels) == 2
    assert value("moe_num_requests_waiting", labels) == 1
    assert 0 < value("moe_kv_cache_usage_perc", labels) <= 1
    engine.abort("b")
    while engine.has_work():
        engine.step()
    engine.submit("d", [9, 9], params, lambda out: None)
    engine.step()
    engine.fail_all(RuntimeError("rank stopping"))
    reasons = {
        reason: value("moe_request_success_total", {**labels, "finished_reason": reason})
        for reason in ("stop", "length", "abort", "error")
    }
    assert reasons == {"stop": 0, "length": 2, "abort": 1, "error": 1}
    # b was aborted mid-prefill (the 4-token budget gave it 1 prompt token): no first token
    assert value("moe_time_to_first_token_seconds_count", labels) == 3  # a, c, d
    assert value("moe_request_queue_time_seconds_count", labels) == 3
    assert value("moe_inter_token_latency_seconds_count", labels) == 2 + 2  # a and c
    assert value("moe_generation_tokens_total", labels) == 3 + 3 + 1
    assert value("moe_prompt_tokens_total", labels) == 3 + 3 + 2
    assert value("moe_e2e_request_latency_seconds_count", labels) == 4

"""Checkpoint loading for each MoE family, checked against per-token HF-style references."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from checkpoints import MOE_LAYERS, write_checkpoint

from moe_worker.model.checkpoint import CheckpointError, CheckpointSource
from moe_worker.model.moe import dense_reference


def silu(v: torch.Tensor) -> torch.Tensor:
    return v * torch.sigmoid(v)


def ffn(x: torch.Tensor, g: torch.Tensor, u: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    return d @ (silu(g @ x) * (u @ x))


def reference_token(
    family: str, t: dict[str, torch.Tensor], layer: int, x: torch.Tensor
) -> torch.Tensor:
    """One token through one MoE block, written out from each family's published routing rules."""
    block = "block_sparse_moe" if family == "mixtral" else "mlp"
    p = f"model.layers.{layer}.{block}"
    names = ("w1", "w3", "w2") if family == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    logits = t[f"{p}.gate.weight"] @ x
    k, experts = 3, logits.shape[0]
    if family == "deepseek_v3":
        scores = torch.sigmoid(logits)
        choice = scores + t[f"{p}.gate.e_score_correction_bias"]
        groups = [sorted(choice[g * 2 : g * 2 + 2].tolist(), reverse=True) for g in range(4)]
        group_score = [sum(v[:2]) for v in groups]
        keep = sorted(range(4), key=lambda g: -group_score[g])[:2]
        allowed = [e for e in range(experts) if e // 2 in keep]
        chosen = sorted(allowed, key=lambda e: -float(choice[e]))[:k]
        weights = [float(scores[e]) for e in chosen]
        total = sum(weights) + 1e-20
        weights = [w / total * 2.5 for w in weights]
    else:
        probs = torch.softmax(logits, dim=0)
        allowed = list(range(experts))
        if family == "deepseek_v2":
            group_score = [float(probs[g * 2 : g * 2 + 2].max()) for g in range(4)]
            keep = sorted(range(4), key=lambda g: -group_score[g])[:2]
            allowed = [e for e in range(experts) if e // 2 in keep]
        chosen = sorted(allowed, key=lambda e: -float(probs[e]))[:k]
        weights = [float(probs[e]) for e in chosen]
        if family in ("mixtral", "qwen3_moe"):
            weights = [w / sum(weights) for w in weights]
        if family == "deepseek_v2":
            weights = [w * 2.0 for w in weights]
    out = sum(
        w * ffn(x, *(t[f"{p}.experts.{e}.{n}.weight"] for n in names))
        for e, w in zip(chosen, weights, strict=True)
    )
    if family == "qwen2_moe":
        shared = ffn(
            x, *(t[f"{p}.shared_expert.{n}.weight"] for n in ("gate_proj", "up_proj", "down_proj"))
        )
        out = out + torch.sigmoid(t[f"{p}.shared_expert_gate.weight"] @ x) * shared
    if family.startswith("deepseek"):
        out = out + ffn(
            x, *(t[f"{p}.shared_experts.{n}.weight"] for n in ("gate_proj", "up_proj", "down_proj"))
        )
    return out


@pytest.mark.parametrize("family", sorted(MOE_LAYERS))
@pytest.mark.parametrize("shards", [1, 3])
def test_family_matches_reference(tmp_path: Path, family: str, shards: int) -> None:
    tensors = write_checkpoint(tmp_path / family, family, shards=shards)
    source = CheckpointSource(tmp_path / family)
    assert source.decoder_layers == MOE_LAYERS[family]
    hidden = torch.randn((6, 16), generator=torch.Generator().manual_seed(1))
    for layer, decoder_layer in enumerate(MOE_LAYERS[family]):
        got = dense_reference(source, layer, hidden)
        want = torch.stack([reference_token(family, tensors, decoder_layer, x) for x in hidden])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_only_requested_experts_are_read(tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "m", "mixtral")
    source = CheckpointSource(tmp_path / "m")
    weights = source.expert(1, 5)
    assert set(weights) == {"w_gate", "w_up", "w_down"} and weights["w_down"].shape == (16, 8)


def test_unsupported_family_and_missing_tensor(tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "m", "qwen3_moe")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(
        CheckpointError, match="unsupported model_type 'llama'; supported: deepseek_v2"
    ):
        CheckpointSource(tmp_path / "m")
    write_checkpoint(tmp_path / "n", "qwen3_moe")
    config = json.loads((tmp_path / "n" / "config.json").read_text())
    (tmp_path / "n" / "config.json").write_text(json.dumps({**config, "num_experts": 9}))
    with pytest.raises(
        CheckpointError,
        match=r"missing tensor model\.layers\.0\.mlp\.experts\.8\.gate_proj\.weight",
    ):
        CheckpointSource(tmp_path / "n").expert(0, 8)


@pytest.mark.parametrize(
    ("family", "ep_size", "placement"), [("deepseek_v3", 2, "random"), ("qwen2_moe", 4, "balanced")]
)
def test_verify_command_matches_reference(
    tmp_path: Path, family: str, ep_size: int, placement: str
) -> None:
    import numpy as np
    from typer.testing import CliRunner

    from moe_operator.cli import app

    tensors = write_checkpoint(tmp_path / family, family)
    hidden = torch.randn((13, 16), generator=torch.Generator().manual_seed(2))
    np.save(tmp_path / "x.npy", hidden.numpy())
    result = CliRunner().invoke(
        app,
        [
            "verify",
            "--checkpoint",
            str(tmp_path / family),
            "--ep-size",
            str(ep_size),
            "--placement",
            placement,
            "--input",
            str(tmp_path / "x.npy"),
            "--output",
            str(tmp_path / "y.npy"),
            "--seed",
            "3",
        ],
    )
    assert result.exit_code == 0, result.output
    got = torch.from_numpy(np.load(tmp_path / "y.npy"))
    assert got.shape == (2, 13, 16)
    for layer, decoder_layer in enumerate(MOE_LAYERS[family]):
        want = torch.stack([reference_token(family, tensors, decoder_layer, x) for x in hidden])
        torch.testing.assert_close(got[layer], want, rtol=1e-4, atol=1e-5)


def test_verify_rejects_bad_input(tmp_path: Path) -> None:
    import numpy as np
    from typer.testing import CliRunner

    from moe_operator.cli import app

    write_checkpoint(tmp_path / "m", "mixtral")
    np.save(tmp_path / "x.npy", np.zeros((4, 7), dtype=np.float32))
    result = CliRunner().invoke(
        app,
        [
            "verify",
            "--checkpoint",
            str(tmp_path / "m"),
            "--ep-size",
            "2",
            "--input",
            str(tmp_path / "x.npy"),
            "--output",
            str(tmp_path / "y.npy"),
        ],
    )
    assert result.exit_code == 2 and "--input must be [tokens, 16]" in result.stderr

"""Tiny HF-format MoE checkpoints (random tensors under each family's real names), for tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

H, E, FFN, SHARED_FFN = 16, 8, 8, 12

CONFIGS = {
    "mixtral": {"num_local_experts": E, "intermediate_size": FFN, "num_hidden_layers": 2},
    "qwen2_moe": {
        "num_experts": E,
        "moe_intermediate_size": FFN,
        "shared_expert_intermediate_size": SHARED_FFN,
        "num_hidden_layers": 3,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [1],
        "norm_topk_prob": False,
    },
    "qwen3_moe": {
        "num_experts": E,
        "moe_intermediate_size": FFN,
        "num_hidden_layers": 2,
        "norm_topk_prob": True,
    },
    "deepseek_v2": {
        "n_routed_experts": E,
        "moe_intermediate_size": FFN,
        "n_shared_experts": 1,
        "num_hidden_layers": 3,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "topk_method": "group_limited_greedy",
        "n_group": 4,
        "topk_group": 2,
        "norm_topk_prob": False,
        "routed_scaling_factor": 2.0,
        "scoring_func": "softmax",
    },
    "deepseek_v3": {
        "n_routed_experts": E,
        "moe_intermediate_size": FFN,
        "n_shared_experts": 1,
        "num_hidden_layers": 3,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "topk_method": "noaux_tc",
        "n_group": 4,
        "topk_group": 2,
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "scoring_func": "sigmoid",
    },
}
BLOCK = {"mixtral": "block_sparse_moe"}
PROJ = {"mixtral": ("w1", "w3", "w2")}
MOE_LAYERS = {
    "mixtral": [0, 1],
    "qwen2_moe": [0, 2],
    "qwen3_moe": [0, 1],
    "deepseek_v2": [1, 2],
    "deepseek_v3": [1, 2],
}


def write_checkpoint(
    directory: Path, family: str, seed: int = 0, shards: int = 1
) -> dict[str, torch.Tensor]:
    """Write config.json and safetensors (``shards`` files plus an index when > 1)."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator) * 0.3

    block = BLOCK.get(family, "mlp")
    gate_p, up_p, down_p = PROJ.get(family, ("gate_proj", "up_proj", "down_proj"))
    tensors: dict[str, torch.Tensor] = {"model.embed_tokens.weight": randn(10, H)}
    for layer in MOE_LAYERS[family]:
        prefix = f"model.layers.{layer}.{block}"
        tensors[f"{prefix}.gate.weight"] = randn(E, H)
        for e in range(E):
            tensors[f"{prefix}.experts.{e}.{gate_p}.weight"] = randn(FFN, H)
            tensors[f"{prefix}.experts.{e}.{up_p}.weight"] = randn(FFN, H)
            tensors[f"{prefix}.experts.{e}.{down_p}.weight"] = randn(H, FFN)
        if family == "qwen2_moe":
            for p, shape in (
                ("gate_proj", (SHARED_FFN, H)),
                ("up_proj", (SHARED_FFN, H)),
                ("down_proj", (H, SHARED_FFN)),
            ):
                tensors[f"{prefix}.shared_expert.{p}.weight"] = randn(*shape)
            tensors[f"{prefix}.shared_expert_gate.weight"] = randn(1, H)
        if family.startswith("deepseek"):
            for p, shape in (
                ("gate_proj", (FFN, H)),
                ("up_proj", (FFN, H)),
                ("down_proj", (H, FFN)),
            ):
                tensors[f"{prefix}.shared_experts.{p}.weight"] = randn(*shape)
        if family == "deepseek_v3":
            tensors[f"{prefix}.gate.e_score_correction_bias"] = randn(E)
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "model_type": family,
        "hidden_size": H,
        "num_experts_per_tok": 3,
        "rms_norm_eps": 1e-6,
        **CONFIGS[family],
    }
    (directory / "config.json").write_text(json.dumps(config))
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(directory / "model.safetensors"))
    else:
        weight_map = {}
        for shard in range(shards):
            file = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: tensors[n].contiguous() for n in names[shard::shards]}
            save_file(part, str(directory / file))
            weight_map.update({n: file for n in part})
        (directory / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": weight_map})
        )
    return tensors

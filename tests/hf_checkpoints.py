"""Tiny random checkpoints of every supported family, saved by transformers, for tests.

Each has dense layers between MoE layers where the family allows, shared experts and gates,
grouped top-k, score-correction bias, routed scaling and MLA as its config says, a byte-level
tokenizer saved beside it, and a vocabulary padded past the tokenizer (ids it cannot decode).
Weights are redrawn with unit-scale fan-in normals so logits are spread (few near ties).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3")
VOCAB = 320  # the byte-level tokenizer has 258 tokens: 62 padding ids
E = 8

COMMON: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "bos_token_id": 256,
    "eos_token_id": 257,
}
SPECIFIC: dict[str, dict[str, Any]] = {
    "mixtral": {
        "num_hidden_layers": 2,
        "num_local_experts": E,
        "num_experts_per_tok": 2,
        "intermediate_size": 24,
    },
    "qwen2_moe": {
        "num_hidden_layers": 3,
        "num_experts": E,
        "num_experts_per_tok": 3,
        "moe_intermediate_size": 16,
        "intermediate_size": 40,
        "shared_expert_intermediate_size": 24,
        "mlp_only_layers": [1],
        "norm_topk_prob": False,
    },
    "qwen3_moe": {
        "num_hidden_layers": 3,
        "num_experts": E,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 16,
        "intermediate_size": 40,
        "head_dim": 8,
        "mlp_only_layers": [0],
        "norm_topk_prob": True,
    },
    "deepseek_v2": {
        "num_hidden_layers": 3,
        "n_routed_experts": E,
        "num_experts_per_tok": 3,
        "moe_intermediate_size": 16,
        "intermediate_size": 40,
        "n_shared_experts": 1,
        "first_k_dense_replace": 1,
        "topk_method": "group_limited_greedy",
        "n_group": 4,
        "topk_group": 2,
        "norm_topk_prob": False,
        "routed_scaling_factor": 2.0,
        "kv_lora_rank": 16,
        "q_lora_rank": None,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 8,
        "v_head_dim": 8,
        "num_key_value_heads": 4,
    },
    "deepseek_v3": {
        "num_hidden_layers": 3,
        "n_routed_experts": E,
        "num_experts_per_tok": 3,
        "moe_intermediate_size": 16,
        "intermediate_size": 40,
        "n_shared_experts": 1,
        "first_k_dense_replace": 1,
        "n_group": 4,
        "topk_group": 2,
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "kv_lora_rank": 16,
        "q_lora_rank": 24,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 8,
        "v_head_dim": 8,
        "num_key_value_heads": 4,
    },
}
# Checkpoint-only families: a dense main model (for an MoE draft) and a vision-language
# wrapper of an MoE language model (built by AutoModelForImageTextToText).
DENSE = "qwen3"
VISION_LANGUAGE = "qwen3_vl_moe"
SPECIFIC[DENSE] = {"num_hidden_layers": 2, "intermediate_size": 40, "head_dim": 8}
SPECIFIC[VISION_LANGUAGE] = {  # Qwen3-MoE's language model with multimodal rotary sections
    **{k: v for k, v in SPECIFIC["qwen3_moe"].items() if k != "norm_topk_prob"},
    "rope_scaling": {"rope_type": "default", "mrope_section": [1, 1, 2], "mrope_interleaved": True},
}
VISION = {
    "depth": 1,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_heads": 2,
    "out_hidden_size": 32,
    "deepstack_visual_indexes": [0],
    "patch_size": 4,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
}
MOE_LAYERS = {
    "mixtral": [0, 1],
    "qwen2_moe": [0, 2],
    "qwen3_moe": [1, 2],
    "deepseek_v2": [1, 2],
    "deepseek_v3": [1, 2],
    DENSE: [],
    VISION_LANGUAGE: [1, 2],
}


def tiny_model(family: str, seed: int = 0) -> Any:
    """A transformers causal LM of ``family`` (a vision-language wrapper for
    ``VISION_LANGUAGE``) with spread random weights (float32)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    if family == VISION_LANGUAGE:
        text = {**COMMON, **SPECIFIC[family]}
        config = AutoConfig.for_model(
            family, text_config=text, vision_config=VISION, tie_word_embeddings=False
        )
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    else:
        config = AutoConfig.for_model(family, **{**COMMON, **SPECIFIC[family]})
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.dim() == 1:
                if name.endswith("e_score_correction_bias"):
                    tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
                continue  # norms stay 1
            scale = 1.0 if "embed_tokens" in name else tensor.shape[-1] ** -0.5
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * scale)
    return model.eval()


def save_checkpoint(
    directory: Path, family: str, layout: str = "saved", shards: int = 1, seed: int = 0
) -> Path:
    """Write a tiny checkpoint of ``family`` to ``directory`` and return it.

    ``layout``: ``saved`` (transformers' ``save_pretrained``: per-expert tensors, Mixtral's
    legacy ``block_sparse_moe``) or ``fused`` (the module's own names: ``experts.gate_up_proj``
    [E, 2I, H] and ``experts.down_proj`` [E, H, I]); ``shards`` > 1 writes an index.
    """
    from safetensors.torch import save_file

    from moe_worker.model.tokenizer import byte_level_tokenizer

    model = tiny_model(family, seed)
    directory.mkdir(parents=True, exist_ok=True)
    if layout == "saved":
        model.save_pretrained(directory, max_shard_size="20KB" if shards > 1 else "50GB")
    elif layout == "fused":
        model.config.save_pretrained(directory)
        tensors = {n: t.contiguous() for n, t in model.state_dict().items()}
        names = sorted(tensors)
        if shards == 1:
            save_file(tensors, str(directory / "model.safetensors"))
        else:
            weight_map = {}
            for shard in range(shards):
                file = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
                part = {n: tensors[n] for n in names[shard::shards]}
                save_file(part, str(directory / file))
                weight_map.update({n: file for n in part})
            index = {"metadata": {}, "weight_map": weight_map}
            (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        raise ValueError(f"layout must be saved or fused, got {layout!r}")
    byte_level_tokenizer().save_pretrained(directory)
    return directory

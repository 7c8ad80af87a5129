"""HF-format checkpoints (config.json + safetensors, sharded or not) of supported MoE families.

Only router, routed-expert and shared-expert tensors of MoE layers are read, and an expert is
read only when asked for, so each rank loads just the experts its slots hold.
Supported ``model_type``: mixtral, qwen2_moe, qwen3_moe, deepseek_v2, deepseek_v3.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moe_worker.config import ModelConfig

from .experts import DTYPES, SharedExperts
from .router import RouterWeights


class CheckpointError(ValueError):
    pass


@dataclass(frozen=True)
class Family:
    block: str  # module holding the MoE block inside a decoder layer
    expert: str  # expert tensor name pattern inside the block
    projections: tuple[str, str, str]  # names of w_gate, w_up, w_down
    shared: str | None = None  # shared-expert module inside the block
    shared_gate: bool = False  # Qwen2-MoE: sigmoid(x @ shared_expert_gate) scales the shared out


FAMILIES: dict[str, Family] = {
    "mixtral": Family("block_sparse_moe", "experts.{e}.{p}.weight", ("w1", "w3", "w2")),
    "qwen2_moe": Family(
        "mlp",
        "experts.{e}.{p}.weight",
        ("gate_proj", "up_proj", "down_proj"),
        "shared_expert",
        True,
    ),
    "qwen3_moe": Family("mlp", "experts.{e}.{p}.weight", ("gate_proj", "up_proj", "down_proj")),
    "deepseek_v2": Family(
        "mlp", "experts.{e}.{p}.weight", ("gate_proj", "up_proj", "down_proj"), "shared_experts"
    ),
    "deepseek_v3": Family(
        "mlp", "experts.{e}.{p}.weight", ("gate_proj", "up_proj", "down_proj"), "shared_experts"
    ),
}


def _moe_layers(model_type: str, hf: dict[str, Any]) -> list[int]:
    layers = int(hf["num_hidden_layers"])
    if model_type == "mixtral":
        return list(range(layers))
    if model_type in ("qwen2_moe", "qwen3_moe"):
        step = int(hf.get("decoder_sparse_step", 1))
        dense = set(hf.get("mlp_only_layers", []) or [])
        return [i for i in range(layers) if i not in dense and (i + 1) % step == 0]
    first_dense = int(hf.get("first_k_dense_replace", 0))
    frequency = int(hf.get("moe_layer_freq", 1))
    return [i for i in range(layers) if i >= first_dense and i % frequency == 0]


def model_config_from_hf(
    hf: dict[str, Any], path: str, dtype: str
) -> tuple[ModelConfig, list[int]]:
    """Our ModelConfig from an HF config.json, and the decoder index of every MoE layer."""
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise CheckpointError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(FAMILIES))}"
        )
    layers = _moe_layers(model_type, hf)
    common: dict[str, Any] = {
        "source": "checkpoint",
        "path": path,
        "dtype": dtype,
        "num_layers": len(layers),
        "hidden_size": hf["hidden_size"],
        "top_k": hf["num_experts_per_tok"],
        "rms_norm_eps": hf.get("rms_norm_eps", 1e-6),
    }
    if model_type == "mixtral":
        specific = {
            "num_experts": hf["num_local_experts"],
            "intermediate_size": hf["intermediate_size"],
            "renormalize": True,
        }
    elif model_type in ("qwen2_moe", "qwen3_moe"):
        specific = {
            "num_experts": hf["num_experts"],
            "intermediate_size": hf["moe_intermediate_size"],
            "renormalize": bool(hf.get("norm_topk_prob", False)),
            "num_shared_experts": 1 if hf.get("shared_expert_intermediate_size") else 0,
        }
    else:
        renormalize = bool(hf.get("norm_topk_prob", False))
        v3 = model_type == "deepseek_v3"
        grouped = hf.get("topk_method") in ("group_limited_greedy", "noaux_tc")
        specific = {
            "num_experts": hf["n_routed_experts"],
            "intermediate_size": hf["moe_intermediate_size"],
            "num_shared_experts": hf.get("n_shared_experts") or 0,
            "scoring": hf.get("scoring_func", "sigmoid" if v3 else "softmax"),
            "renormalize": renormalize,
            "num_expert_groups": hf.get("n_group", 1) if grouped else 1,
            "topk_groups": hf.get("topk_group", 1) if grouped else 1,
            "score_bias": v3 and hf.get("topk_method", "noaux_tc") == "noaux_tc",
            # DeepSeek-V2 scales only weights it does not renormalise; V3 scales always.
            "routed_scaling_factor": (
                1.0 if (renormalize and not v3) else float(hf.get("routed_scaling_factor", 1.0))
            ),
        }
    return ModelConfig.model_validate({**common, **specific}), layers


class CheckpointSource:
    """A ``WeightSource`` over an HF checkpoint directory."""

    def __init__(self, path: str | Path, dtype: str | None = None) -> None:
        self.path = Path(path)
        config_file = self.path / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"{self.path}: no config.json")
        hf = json.loads(config_file.read_text())
        wanted = dtype or {"bfloat16": "bfloat16", "float16": "float16"}.get(
            str(hf.get("torch_dtype")), "float32"
        )
        self.config, self.decoder_layers = model_config_from_hf(hf, str(self.path), wanted)
        self.family = FAMILIES[hf["model_type"]]
        self.dtype = DTYPES[self.config.dtype]
        self._files = self._index()
        self._handles: dict[Path, Any] = {}

    def _index(self) -> dict[str, Path]:
        from safetensors import safe_open

        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return {name: self.path / file for name, file in weight_map.items()}
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.path}: no .safetensors files")
        names: dict[str, Path] = {}
        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                names.update({name: file for name in handle.keys()})  # noqa: SIM118
        return names

    def _tensor(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        file = self._files.get(name)
        if file is None:
            raise CheckpointError(f"{self.path}: missing tensor {name}")
        if file not in self._handles:
            self._handles[file] = safe_open(str(file), framework="pt")
        return self._handles[file].get_tensor(name)

    def _block(self, layer: int) -> str:
        return f"model.layers.{self.decoder_layers[layer]}.{self.family.block}"

    def has(self, name: str) -> bool:
        return name in self._files

    def router(self, layer: int) -> RouterWeights:
        block = self._block(layer)
        bias = None
        if self.config.score_bias:
            bias = self._tensor(f"{block}.gate.e_score_correction_bias").float()
        return RouterWeights(
            gate=self._tensor(f"{block}.gate.weight").to(self.dtype), score_bias=bias
        )

    def expert(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        block = self._block(layer)
        names = ("w_gate", "w_up", "w_down")
        return {
            ours: self._tensor(f"{block}.{self.family.expert.format(e=expert, p=theirs)}").to(
                self.dtype
            )
            for ours, theirs in zip(names, self.family.projections, strict=True)
        }

    def shared(self, layer: int) -> SharedExperts | None:
        if self.family.shared is None or not self.config.num_shared_experts:
            return None
        module = f"{self._block(layer)}.{self.family.shared}"
        gate = None
        if self.family.shared_gate:
            gate = self._tensor(f"{self._block(layer)}.shared_expert_gate.weight").to(self.dtype)
        return SharedExperts(
            w_gate=self._tensor(f"{module}.gate_proj.weight").to(self.dtype),
            w_up=self._tensor(f"{module}.up_proj.weight").to(self.dtype),
            w_down=self._tensor(f"{module}.down_proj.weight").to(self.dtype),
            gate=gate,
        )

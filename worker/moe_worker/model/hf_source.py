"""Where a real model's weights come from: a checkpoint directory or a seeded synthetic model.

A ``ModelSource`` gives the transformers config, every non-expert tensor by its module name,
and any one routed expert alone (``expert(moe_layer, expert)`` -> ``w_gate`` [I, H], ``w_up``
[I, H], ``w_down`` [H, I]), so a rank reads only the experts its slots hold and recovery can
reload a single expert.

- ``CheckpointSource``: ``config.json`` + safetensors (one file or sharded with an index) +
  tokenizer files, as transformers saves them; per-expert or fused expert tensors; tensors are
  read lazily, an expert as a slice of a fused tensor when fused.
- ``SyntheticSource``: a random model of a family and size; each tensor is seeded by (seed,
  name), each expert by (seed, layer, expert, tensor), so every rank builds it identically.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import torch

from moe_worker.config import ModelSpec

from .ep_experts import EXPERT_TENSORS
from .experts import DTYPES, seeded_generator
from .families import TOKENIZER_FILES, Family, UnsupportedModel, family_for


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be served; the message names what is wrong."""


class ModelSource(Protocol):
    hf_config: Any  # transformers PretrainedConfig
    family: Family
    dtype: torch.dtype
    moe_decoder_layers: list[int]  # decoder index of every MoE layer, in order (none: dense)
    num_experts: int  # routed experts per MoE layer (0: dense)
    decoder: str  # the decoder's module name (``model``, or ``model.language_model``)

    def tensor(self, name: str, shape: tuple[int, ...]) -> torch.Tensor: ...

    def expert(self, layer: int, expert: int) -> dict[str, torch.Tensor]: ...

    def tokenizer(self) -> Any: ...


def model_class(hf_config: Any) -> Any:
    """transformers' auto class that builds ``hf_config``'s model with an LM head: a causal LM,
    or a vision-language wrapper (image-text-to-text) around an MoE language model."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    for auto in (AutoModelForCausalLM, AutoModelForImageTextToText):
        if type(hf_config) in auto._model_mapping:
            return auto
    raise CheckpointError(f"{hf_config.model_type}: transformers builds no language model of it")


def meta_model(hf_config: Any, **kwargs: Any) -> Any:
    """``hf_config``'s whole model on the meta device (no memory)."""
    with torch.device("meta"):
        return model_class(hf_config).from_config(hf_config, **kwargs)


def decoder_prefix(model: Any) -> str:
    """The module name of ``model``'s decoder (``model`` for a causal LM,
    ``model.language_model`` for a vision-language wrapper)."""
    decoder = model.get_decoder()
    for name, module in model.named_modules():
        if module is decoder:
            return name
    raise CheckpointError(f"{type(model).__name__}: its decoder is not one of its modules")


def _moe_structure(hf_config: Any) -> tuple[list[int], int, str]:
    """(decoder index of each MoE layer, routed experts per layer, decoder module name), read
    off a meta model; no MoE layers (a dense model): ([], 0, name)."""
    model = meta_model(hf_config)
    layers = model.get_decoder().layers
    moe = [i for i, layer in enumerate(layers) if hasattr(getattr(layer, "mlp", None), "experts")]
    if not moe:
        return [], 0, decoder_prefix(model)
    experts = layers[moe[0]].mlp.experts
    return moe, int(experts.gate_up_proj.shape[0]), decoder_prefix(model)


def _resolve_dtype(requested: str | None, hf_config: Any) -> torch.dtype:
    if requested is not None:
        return DTYPES[requested]
    saved = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    return saved if saved in (torch.bfloat16, torch.float16) else torch.float32


class CheckpointSource:
    """A ``ModelSource`` over a transformers checkpoint directory."""

    def __init__(self, path: str | Path, dtype: str | None = None) -> None:
        from transformers import AutoConfig

        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a directory")
        if not (self.path / "config.json").is_file():
            raise CheckpointError(f"{self.path}: no config.json (not a transformers checkpoint)")
        model_type = json.loads((self.path / "config.json").read_text()).get("model_type")
        try:
            self.family = family_for(model_type)
            self.hf_config = AutoConfig.from_pretrained(str(self.path))
        except UnsupportedModel as exc:
            raise CheckpointError(f"{self.path}: {exc}") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{self.path}: config.json: {exc}") from None
        self.dtype = _resolve_dtype(dtype, self.hf_config)
        self.moe_decoder_layers, self.num_experts, self.decoder = _moe_structure(self.hf_config)
        self._files = self._index()
        self._handles: dict[Path, Any] = {}
        self.tensors_read: list[str] = []  # names read so far (tests check what a rank reads)

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

    def _handle(self, name: str) -> Any:
        from safetensors import safe_open

        file = self._files[name]
        if file not in self._handles:
            self._handles[file] = safe_open(str(file), framework="pt")
        return self._handles[file]

    def _find(self, module_name: str) -> str | None:
        for name in self.family.checkpoint_names(module_name):
            if name in self._files:
                return name
        return None

    def tensor(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """The checkpoint's tensor for module tensor ``name``, checked against ``shape``."""
        found = self._find(name)
        if found is None:
            raise CheckpointError(f"{self.path}: missing tensor {name}")
        self.tensors_read.append(found)
        value = self._handle(found).get_tensor(found)
        if shape is not None and tuple(value.shape) != tuple(shape):
            raise CheckpointError(
                f"{self.path}: tensor {found} has shape {list(value.shape)}, "
                f"the model's config expects {list(shape)}"
            )
        return value.to(self.dtype)

    def expert(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        block = f"{self.decoder}.layers.{self.moe_decoder_layers[layer]}.mlp.experts"
        fused = self._find(f"{block}.gate_up_proj")
        if fused is not None:
            down = self._find(f"{block}.down_proj")
            if down is None:
                raise CheckpointError(f"{self.path}: missing tensor {block}.down_proj")
            self.tensors_read.append(f"{fused}[{expert}]")
            gate_up = self._handle(fused).get_slice(fused)[expert]  # [2I, H] (or [H, 2I])
            w_down = self._handle(down).get_slice(down)[expert]  # [H, I] (or [I, H])
            hidden = int(self.hf_config.get_text_config().hidden_size)
            # stored input-major (Qwen3-VL-MoE's release): [H, 2I] and [I, H]
            if gate_up.shape[-1] != hidden or w_down.shape[0] != hidden:
                gate_up, w_down = gate_up.transpose(0, 1), w_down.transpose(0, 1)
            w_gate, w_up = gate_up.chunk(2, dim=0)
            tensors: tuple[torch.Tensor, ...] = (w_gate, w_up, w_down)
        else:
            tensors = tuple(
                self.tensor(f"{block}.{expert}.{projection}.weight")
                for projection in self.family.projections
            )
        return {
            name: t.to(self.dtype).contiguous()
            for name, t in zip(EXPERT_TENSORS, tensors, strict=True)
        }

    def tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        if not any((self.path / name).is_file() for name in TOKENIZER_FILES):
            raise CheckpointError(
                f"{self.path}: no tokenizer ({' or '.join(TOKENIZER_FILES[:2])}) beside the weights"
            )
        return AutoTokenizer.from_pretrained(str(self.path))


def synthetic_hf_config(model: ModelSpec, vocab_size: int) -> Any:
    """A transformers config of ``model.family`` with ``model``'s sizes (every layer MoE)."""
    from transformers import AutoConfig

    h, heads = model.hidden_size, max(1, model.hidden_size // 16)
    common: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": h,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // 2),
        "num_experts_per_tok": model.top_k,
        "rms_norm_eps": model.rms_norm_eps,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "bos_token_id": vocab_size - 2 if vocab_size > 2 else None,
        "eos_token_id": None,
    }
    family = model.family
    specific: dict[str, Any]
    shared_ffn = model.intermediate_size * model.num_shared_experts
    if family == "mixtral":
        specific = {
            "num_local_experts": model.num_experts,
            "intermediate_size": model.intermediate_size,
        }
    elif family in ("qwen2_moe", "qwen3_moe"):
        specific = {
            "num_experts": model.num_experts,
            "moe_intermediate_size": model.intermediate_size,
            "intermediate_size": 2 * model.intermediate_size,
            "norm_topk_prob": model.renormalize,
            "head_dim": h // heads,
        }
        if family == "qwen2_moe":
            specific["shared_expert_intermediate_size"] = shared_ffn or model.intermediate_size
    else:
        specific = {
            "n_routed_experts": model.num_experts,
            "moe_intermediate_size": model.intermediate_size,
            "intermediate_size": 2 * model.intermediate_size,
            "n_shared_experts": model.num_shared_experts or 1,
            "first_k_dense_replace": 0,
            "n_group": model.num_expert_groups,
            "topk_group": model.topk_groups,
            "norm_topk_prob": model.renormalize,
            "routed_scaling_factor": model.routed_scaling_factor,
            "kv_lora_rank": max(8, h // 4),
            "q_lora_rank": None if family == "deepseek_v2" else max(8, h // 2),
            "qk_rope_head_dim": 8,
            "qk_nope_head_dim": 8,
            "v_head_dim": 16,
            "num_key_value_heads": heads,
        }
        if family == "deepseek_v2":
            grouped = model.num_expert_groups > 1
            specific["topk_method"] = "group_limited_greedy" if grouped else "greedy"
    return AutoConfig.for_model(family, **{**common, **specific})


class SyntheticSource:
    """A seeded random model of ``config.family`` (a ``ModelSource``), byte-level tokenizer."""

    def __init__(self, config: ModelSpec) -> None:
        from .tokenizer import byte_level_tokenizer

        self.config = config
        self.family = family_for(config.family)
        self.dtype = DTYPES[config.dtype]
        self._tokenizer = byte_level_tokenizer()
        vocab = len(self._tokenizer)
        padded = -(-vocab // 64) * 64  # vocabulary padding, as real checkpoints have
        self.hf_config = synthetic_hf_config(config, padded)
        self.hf_config.bos_token_id = self._tokenizer.bos_token_id
        self.hf_config.eos_token_id = self._tokenizer.eos_token_id
        self.moe_decoder_layers, self.num_experts, self.decoder = _moe_structure(self.hf_config)

    def _randn(self, shape: tuple[int, ...], scale: float, *key: object) -> torch.Tensor:
        values = torch.randn(shape, generator=seeded_generator(self.config.seed, *key)) * scale
        return values.to(self.dtype)

    def tensor(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """The tensor ``name`` of shape ``shape``: norms 1, biases 0, others scaled normal."""
        if len(shape) == 1:
            if name.endswith("norm.weight") or "layernorm" in name:
                return torch.ones(shape, dtype=self.dtype)
            if name.endswith("e_score_correction_bias"):
                return self._randn(shape, 0.1, name)
            return torch.zeros(shape, dtype=self.dtype)
        scale = 1.0 if "embed_tokens" in name else shape[-1] ** -0.5
        return self._randn(shape, scale, name)

    def expert(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        h, i = self.config.hidden_size, self.config.intermediate_size
        return {
            "w_gate": self._randn((i, h), h**-0.5, layer, expert, "w_gate"),
            "w_up": self._randn((i, h), h**-0.5, layer, expert, "w_up"),
            "w_down": self._randn((h, i), i**-0.5, layer, expert, "w_down"),
        }

    def tokenizer(self) -> Any:
        return self._tokenizer

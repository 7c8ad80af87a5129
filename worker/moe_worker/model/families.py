"""Supported model families (registry by transformers' ``model_type``).

Every family is built with transformers' own classes; its decoder layers' ``mlp`` is either a
dense MLP or a sparse MoE block whose ``experts`` submodule the project replaces. Synthetic
models exist of the MoE causal-LM families; checkpoints may also be dense (a main model whose
speculative draft is the MoE model) or vision-language wrappers of an MoE language model
(served text-only through the wrapper's language model). What differs between families is
only how their checkpoints name tensors: per-expert tensors
(``experts.N.<gate>/<up>/<down>.weight``, each [I, H] / [I, H] / [H, I]) under a block name that
may differ from the module's (Mixtral's legacy ``block_sparse_moe``), or transformers 5's fused
``experts.gate_up_proj`` [E, 2I, H] (gate rows first) and ``experts.down_proj`` [E, H, I].
"""

from __future__ import annotations

from dataclasses import dataclass

# Files of a tokenizer saved beside the weights (any one of them will do).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass(frozen=True)
class Family:
    """Checkpoint naming facts of one MoE family."""

    name: str  # transformers' model_type
    projections: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # per-expert
    legacy_block: str | None = None  # the MoE block's name in older checkpoints, if not "mlp"
    synthetic: bool = True  # ``model.family`` of a synthetic model may name it

    def checkpoint_names(self, module_name: str) -> list[str]:
        """Names a module tensor may have in a checkpoint, preferred first."""
        names = [module_name]
        if self.legacy_block is not None and ".mlp." in module_name:
            names.append(module_name.replace(".mlp.", f".{self.legacy_block}.", 1))
        return names


FAMILIES: dict[str, Family] = {
    "mixtral": Family("mixtral", ("w1", "w3", "w2"), legacy_block="block_sparse_moe"),
    "qwen2_moe": Family("qwen2_moe"),
    "qwen3_moe": Family("qwen3_moe"),
    "deepseek_v2": Family("deepseek_v2"),
    "deepseek_v3": Family("deepseek_v3"),
    # checkpoints only
    "qwen3": Family("qwen3", synthetic=False),  # dense: a main model for an MoE draft
    "qwen3_vl_moe": Family("qwen3_vl_moe", synthetic=False),  # vision-language wrapper
}


class UnsupportedModel(ValueError):
    pass


def family_for(model_type: str | None) -> Family:
    """The family of ``model_type``; the error lists the supported ones."""
    if model_type not in FAMILIES:
        raise UnsupportedModel(
            f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[model_type]

"""A whole causal LM built with transformers' own classes, its routed experts expert-parallel.

A vision-language wrapper (e.g. Qwen3-VL-MoE) is built by its own class too, without its
vision tower: it serves text through the wrapper's language model and LM head.

The seam: every sparse MoE block of a supported family holds its routed experts in
``mlp.experts`` and calls ``experts(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])``
after its own router. ``build_ep_model`` builds the model on the meta device, swaps each
``mlp.experts`` for an ``ExpertParallelExperts`` holding only this rank's slots, materialises the
rest (embeddings, attention, norms, dense MLPs, routers, shared experts, LM head) on the rank's
device from the source, and rebuilds the non-persistent buffers (rotary frequencies). No rank
ever holds the full expert set; routing is the family's own by construction.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from moe_worker.eplb.policy import Placement
from moe_worker.eplb.policy.shares import route_tables

from .ep_experts import EPGroup, ExpertParallelExperts, load_slots
from .hf_source import CheckpointError, ModelSource, meta_model


@dataclass
class EPCausalLM:
    """One rank's model: transformers' causal LM (``model``) with expert-parallel experts.

    ``moe_layers``: the ``ExpertParallelExperts`` of every MoE layer, in order (what EPLB
    registers); ``decoder_layers``: the decoder index of each.
    """

    model: Any  # transformers PreTrainedModel (…ForCausalLM, or a vision-language wrapper)
    moe_layers: list[ExpertParallelExperts]
    decoder_layers: list[int]
    hidden_size: int
    dtype: torch.dtype
    device: torch.device
    wrapped: bool = False  # a vision-language wrapper: text runs through its language model
    cache_arg: str = field(init=False)

    def __post_init__(self) -> None:
        # transformers renamed the cache argument (past_key_values -> cache) during 5.x
        parameters = inspect.signature(self.model.get_decoder().forward).parameters
        self.cache_arg = "cache" if "cache" in parameters else "past_key_values"

    @property
    def config(self) -> Any:
        return self.model.config

    def logits(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: Any,
        cache: Any,
        rows: torch.Tensor,
        **attention_kwargs: Any,
    ) -> torch.Tensor:
        """Logits [1, len(rows), V] at token rows ``rows`` of a packed step: ``input_ids`` and
        ``position_ids`` [1, T], ``attention_mask`` [1, 1, T, K] (or one per layer type);
        ``attention_kwargs`` reach the attention function (the packed step's layout)."""
        cache_kwargs = {self.cache_arg: cache, **attention_kwargs}
        if not self.wrapped:
            output = self.model(
                input_ids=input_ids,
                position_ids=position_ids,
                attention_mask=attention_mask,
                use_cache=True,
                logits_to_keep=rows,
                **cache_kwargs,
            )
            return output.logits  # type: ignore[no-any-return]
        hidden = self.model.get_decoder()(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            use_cache=True,
            **cache_kwargs,
        ).last_hidden_state
        return self.model.get_output_embeddings()(hidden[:, rows])  # type: ignore[no-any-return]

    def idle_pass(self) -> None:
        """This rank has no tokens this step: take part in every MoE layer's all-to-alls."""
        for layer in self.moe_layers:
            layer.idle_pass(self.hidden_size, self.dtype)


def moe_blocks(model: Any) -> list[tuple[int, nn.Module]]:
    """(decoder index, MoE block) of every decoder layer whose ``mlp`` has routed ``experts``."""
    layers = model.get_decoder().layers
    return [
        (index, layer.mlp)
        for index, layer in enumerate(layers)
        if isinstance(getattr(getattr(layer, "mlp", None), "experts", None), nn.Module)
    ]


def _rebuild_buffer_modules(model: nn.Module, device: torch.device) -> None:
    """Recreate modules with non-persistent buffers (not in checkpoints; garbage after
    ``to_empty``), e.g. rotary embeddings, from their config on ``device``."""
    for name, module in list(model.named_modules()):
        if not getattr(module, "_non_persistent_buffers_set", None):
            continue
        config = getattr(module, "config", None)
        if config is None:
            raise CheckpointError(f"cannot rebuild {name} ({type(module).__name__}): no config")
        with torch.device(device):
            fresh = type(module)(config)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, fresh)


def _drop_non_text_modules(model: nn.Module, path: str) -> bool:
    """In a vision-language wrapper, replace every module off the path to its language model
    (the vision tower) by an empty one: text serving never runs it. Returns whether ``model``
    is such a wrapper (its decoder is not ``model.model``)."""
    parent_name, _, _ = path.rpartition(".")
    if path == "model" or not parent_name:  # a causal LM: its decoder is a direct child
        return False
    parent = model.get_submodule(parent_name)
    keep = path.split(".")[len(parent_name.split(".")) if parent_name else 0]
    for name, _ in list(parent.named_children()):
        if name != keep:
            setattr(parent, name, nn.Module())
    return True


def _tied(model: Any) -> bool:
    """Whether the LM head shares the input embedding's weight (as transformers tied them)."""
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and head.weight is embedding.weight


def build_ep_model(
    source: ModelSource,
    placement: Placement,
    ep: EPGroup,
    load_weights: bool = True,
    attn_implementation: str = "sdpa",
) -> EPCausalLM:
    """This rank's model with its slots (by ``placement``) of every MoE layer.

    ``load_weights=False`` (a rank joining a running group) leaves the slots zeroed; the
    elastic resize fills them from the ranks that hold the experts.
    """
    config = source.hf_config
    model = meta_model(config, dtype=source.dtype, attn_implementation=attn_implementation)
    wrapped = _drop_non_text_modules(model, source.decoder)
    blocks = moe_blocks(model)
    if [index for index, _ in blocks] != source.moe_decoder_layers:
        raise CheckpointError("the model's MoE layers differ from the source's")
    if placement.num_layers != len(blocks):
        raise ValueError(f"placement has {placement.num_layers} layers, the model {len(blocks)}")
    activations: list[Any] = []
    for _, block in blocks:  # the family's activation (e.g. silu), kept for our experts
        activations.append(getattr(block.experts, "act_fn"))  # noqa: B009 - untyped module
        block.experts = nn.Module()  # drop the meta expert tensors before materialising
    tied = _tied(model)
    model.to_empty(device=ep.device)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tied and name == "lm_head.weight":
                continue
            tensor.copy_(source.tensor(name, tuple(tensor.shape)))
    _rebuild_buffer_modules(model, ep.device)
    if tied:
        model.tie_weights()
    slots_per_rank = placement.num_physical // ep.size
    tables, _ = route_tables(placement)  # [L, E, W]: the load-time routing (EPLB off)
    moe_layers = []
    for moe_index, (_, block) in enumerate(blocks):
        mine = placement.phy2log[
            moe_index, ep.rank * slots_per_rank : (ep.rank + 1) * slots_per_rank
        ].tolist()
        slots = load_slots(source, moe_index, mine, ep.device, zeroed=not load_weights)
        experts = ExpertParallelExperts(
            moe_index,
            slots,
            ep,
            torch.from_numpy(tables[moe_index]),
            activations[moe_index],
        )
        block.experts = experts
        moe_layers.append(experts)
    model.eval()
    model.requires_grad_(False)
    return EPCausalLM(
        model=model,
        moe_layers=moe_layers,
        decoder_layers=[index for index, _ in blocks],
        hidden_size=int(model.config.get_text_config().hidden_size),
        dtype=source.dtype,
        device=ep.device,
        wrapped=wrapped,
    )

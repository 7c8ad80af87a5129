"""The routing simulator's model: a stack of MoE layers (router, shared experts and the
expert-parallel experts of ``ep_experts``) with RMSNorm and residuals, and its dense reference.

This is the benchmark/simulator path (hidden states and routing drawn by ``simulator.py``); real
models are built from transformers' classes in ``hf_model.py``. Shapes: hidden [T, H] per rank.
"""

from __future__ import annotations

import torch

from moe_worker.config import ModelConfig
from moe_worker.eplb.policy import Placement
from moe_worker.eplb.policy.shares import route_tables

from .ep_experts import EPGroup, ExpertParallelExperts, SlotWeights, gated_ffn, load_slots
from .experts import SharedExperts, WeightSource
from .router import RouterWeights, combine_weights_for, route


def rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)).to(x.dtype)


class MoELayer:
    """One simulator MoE layer on one EP rank: router, shared experts, expert-parallel experts."""

    def __init__(
        self,
        index: int,
        config: ModelConfig,
        router: RouterWeights,
        slots: SlotWeights,
        shared: SharedExperts | None,
        ep: EPGroup,
        static_log2phy: torch.Tensor,
    ) -> None:
        self.index = index
        self.config = config
        self.router = router
        self.shared = shared
        self.experts = ExpertParallelExperts(index, slots, ep, static_log2phy)

    def __call__(
        self, hidden: torch.Tensor, token_offset: int = 0, forced_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """MoE block output [T, H] for this rank's tokens ``hidden`` [T, H] (all ranks call it)."""
        if forced_ids is None:
            ids, combine = route(hidden, self.router, self.config)
        else:
            ids, combine = (
                forced_ids,
                combine_weights_for(hidden, forced_ids, self.router, self.config),
            )
        out = self.experts(hidden, ids, combine, token_offset).float()
        if self.shared is not None:
            out = out + self.shared(hidden).float()
        return out.to(hidden.dtype)


def set_placement(layers: list[ExpertParallelExperts], placement: Placement) -> None:
    """Point each layer's load-time map (used while EPLB is off) at ``placement``."""
    table, _ = route_tables(placement)
    for index, layer in enumerate(layers):
        layer.set_static_map(torch.from_numpy(table[index]))


class MoEModel:
    """A stack of MoE layers with residual connections and RMSNorm before each layer."""

    def __init__(self, config: ModelConfig, layers: list[MoELayer]) -> None:
        self.config = config
        self.layers = layers

    @property
    def moe_layers(self) -> list[ExpertParallelExperts]:
        """Each layer's expert-parallel experts (what EPLB registers and moves)."""
        return [layer.experts for layer in self.layers]

    def __call__(
        self,
        hidden: torch.Tensor,
        token_offset: int = 0,
        forced_ids: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """hidden [T, H] -> [T, H]; ``forced_ids`` (per layer, [T, k]) overrides the router."""
        for i, layer in enumerate(self.layers):
            normed = rms_norm(hidden, self.config.rms_norm_eps)
            hidden = hidden + layer(
                normed, token_offset, None if forced_ids is None else forced_ids[i]
            )
        return hidden


def build_model(
    source: WeightSource, placement: Placement, ep: EPGroup, load_weights: bool = True
) -> MoEModel:
    """This rank's part of the model: its slots (by ``placement``) of every MoE layer.

    ``load_weights=False`` (a rank joining a running group) allocates the slots zeroed; the
    elastic resize then fills them from the ranks that hold the experts.
    """
    slots_per_rank = placement.num_physical // ep.size
    tables, _ = route_tables(placement)  # [L, E, W]: the load-time routing (EPLB off)
    layers = []
    for i in range(placement.num_layers):
        mine = placement.phy2log[
            i, ep.rank * slots_per_rank : (ep.rank + 1) * slots_per_rank
        ].tolist()
        shared = source.shared(i)
        if shared is not None:
            shared = SharedExperts(
                shared.w_gate.to(ep.device),
                shared.w_up.to(ep.device),
                shared.w_down.to(ep.device),
                None if shared.gate is None else shared.gate.to(ep.device),
            )
        router = source.router(i)
        router = RouterWeights(
            router.gate.to(ep.device),
            None if router.score_bias is None else router.score_bias.to(ep.device),
        )
        slots = load_slots(source, i, mine, ep.device, zeroed=not load_weights)
        static = torch.from_numpy(tables[i])
        layers.append(MoELayer(i, source.config, router, slots, shared, ep, static))
    return MoEModel(source.config, layers)


def dense_reference(
    source: WeightSource,
    layer: int,
    hidden: torch.Tensor,
    forced_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The MoE block of ``layer`` on one process with every expert: [T, H] -> [T, H] float32."""
    return DenseReference(source).block(layer, hidden, forced_ids)


class DenseReference:
    """The whole model on one process with every expert (weights cached): the ground truth.

    ``__call__``: hidden [T, H] -> [T, H] float32, residual + RMSNorm as ``MoEModel``.
    """

    def __init__(self, source: WeightSource) -> None:
        self.source = source
        self.config = source.config
        self._experts: dict[tuple[int, int], dict[str, torch.Tensor]] = {}

    def _expert(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        key = (layer, expert)
        if key not in self._experts:
            self._experts[key] = self.source.expert(layer, expert)
        return self._experts[key]

    def block(
        self, layer: int, hidden: torch.Tensor, forced_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The MoE block of ``layer``: [T, H] -> [T, H] float32."""
        router = self.source.router(layer)
        if forced_ids is None:
            ids, combine = route(hidden, router, self.config)
        else:
            ids, combine = forced_ids, combine_weights_for(hidden, forced_ids, router, self.config)
        out = torch.zeros(hidden.shape, dtype=torch.float32)
        for e in torch.unique(ids).tolist():
            weights = self._expert(layer, e)
            token, k = torch.nonzero(ids == e, as_tuple=True)
            y = gated_ffn(hidden[token], weights["w_gate"], weights["w_up"], weights["w_down"])
            out.index_add_(0, token, y.float() * combine[token, k].unsqueeze(1))
        shared = self.source.shared(layer)
        if shared is not None:
            out = out + shared(hidden).float()
        return out

    def __call__(
        self, hidden: torch.Tensor, forced_ids: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        hidden = hidden.cpu()
        for layer in range(self.config.num_layers):
            normed = rms_norm(hidden, self.config.rms_norm_eps)
            forced = None if forced_ids is None else forced_ids[layer].cpu()
            hidden = hidden + self.block(layer, normed, forced).to(hidden.dtype)
        return hidden

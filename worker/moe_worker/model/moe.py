"""Expert-parallel MoE layer and the model stack.

Each EP rank holds S = P / N physical slots; slot p lives on rank p // S. For every (token,
expert) pair the router's logical expert is mapped to one of its replicas (spread by token
position), the hidden state is sent to the owning rank (all-to-all), computed there, sent
back and combined. Shapes: hidden [T, H] per rank; slot weights [S, I, H] / [S, H, I].
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from moe_worker.config import ModelConfig
from moe_worker.eplb.policy import Placement
from moe_worker.eplb.state import EPLBLayerState

from .experts import EXPERT_TENSORS, SharedExperts, WeightSource, load_slots, swiglu
from .router import RouterWeights, combine_weights_for, route


@dataclass
class EPGroup:
    """This rank's place in the expert-parallel group (world size 1: no communication)."""

    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


def rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)).to(x.dtype)


def _all_to_all(
    rows: torch.Tensor, send_counts: list[int], recv_counts: list[int], ep: EPGroup
) -> torch.Tensor:
    out = rows.new_empty((sum(recv_counts), *rows.shape[1:]))
    dist.all_to_all_single(out, rows.contiguous(), recv_counts, send_counts, group=ep.group)
    return out


class MoELayer:
    """One MoE layer on one EP rank: router, this rank's expert slots, shared experts."""

    def __init__(
        self,
        index: int,
        config: ModelConfig,
        router: RouterWeights,
        slots: dict[str, torch.Tensor],
        shared: SharedExperts | None,
        ep: EPGroup,
        static_log2phy: torch.Tensor,
    ) -> None:
        self.index = index
        self.config = config
        self.router = router
        self.slots = slots  # name -> [S, ...]; updated in place by rebalances
        self.shared = shared
        self.ep = ep
        self.slots_per_rank = next(iter(slots.values())).shape[0]
        # EPLB state: None means EPLB is off for this layer; the load-time map then stays.
        self.eplb_state: EPLBLayerState | None = None
        self.computed_pairs = 0  # (token, expert) pairs this rank's slots computed, cumulative
        self._static_log2phy = static_log2phy.to(ep.device)  # [E, R]
        self._static_count = (static_log2phy >= 0).sum(dim=1).to(ep.device)  # [E]

    def physical_slots(self, ids: torch.Tensor, token_offset: int) -> torch.Tensor:
        """Physical slot [T, k] for each (token, logical expert): replicas taken in turn."""
        if self.eplb_state is None:
            log2phy, count = self._static_log2phy, self._static_count
        else:
            assert self.eplb_state.log2phy is not None and self.eplb_state.replica_count is not None
            log2phy, count = self.eplb_state.log2phy, self.eplb_state.replica_count
        positions = torch.arange(ids.shape[0], device=ids.device)[:, None] + token_offset
        replica = (positions + torch.arange(ids.shape[1], device=ids.device)) % count[ids]
        return log2phy[ids, replica]

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
        slots = self.physical_slots(ids, token_offset)  # [T, k]
        if self.eplb_state is not None:
            self.eplb_state.note_step(slots)
        out = self._routed(hidden, slots, combine)
        if self.shared is not None:
            out = out + self.shared(hidden).float()
        return out.to(hidden.dtype)

    def _routed(
        self, hidden: torch.Tensor, slots: torch.Tensor, combine: torch.Tensor
    ) -> torch.Tensor:
        tokens, top_k = slots.shape
        flat_slot = slots.flatten()
        owner = flat_slot // self.slots_per_rank
        order = torch.argsort(owner, stable=True)
        token_of = torch.arange(tokens, device=hidden.device).repeat_interleave(top_k)[order]
        local_slot = (flat_slot % self.slots_per_rank)[order]
        rows = hidden[token_of]
        if self.ep.size > 1:
            send = torch.bincount(owner, minlength=self.ep.size)
            recv = torch.empty_like(send)
            dist.all_to_all_single(recv, send, group=self.ep.group)
            send_counts, recv_counts = send.tolist(), recv.tolist()
            rows_in = _all_to_all(rows, send_counts, recv_counts, self.ep)
            slot_in = _all_to_all(local_slot, send_counts, recv_counts, self.ep)
        else:
            rows_in, slot_in = rows, local_slot
        self.computed_pairs += rows_in.shape[0]
        computed = self._compute(rows_in, slot_in)
        if self.ep.size > 1:
            computed = _all_to_all(computed, recv_counts, send_counts, self.ep)
        weights = combine.flatten()[order].unsqueeze(1)
        out = torch.zeros((tokens, hidden.shape[1]), dtype=torch.float32, device=hidden.device)
        out.index_add_(0, token_of, computed.float() * weights)
        return out

    def _compute(self, rows: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        """Run each row through the expert in its local slot: rows [N, H], slot [N]."""
        order = torch.argsort(slot, stable=True)
        counts = torch.bincount(slot, minlength=self.slots_per_rank).tolist()
        grouped = rows[order]
        out = torch.empty_like(grouped)
        start = 0
        for s, count in enumerate(counts):
            if count:
                weights = (self.slots[name][s] for name in EXPERT_TENSORS)
                out[start : start + count] = swiglu(grouped[start : start + count], *weights)
                start += count
        result = torch.empty_like(rows)
        result[order] = out
        return result


def set_placement(layers: list[MoELayer], placement: Placement) -> None:
    """Point each layer's load-time map (used while EPLB is off) at ``placement``."""
    for index, layer in enumerate(layers):
        static = torch.from_numpy(placement.log2phy[index])
        layer._static_log2phy = static.to(layer.ep.device)
        layer._static_count = (static >= 0).sum(dim=1).to(layer.ep.device)


class MoEModel:
    """A stack of MoE layers with residual connections and RMSNorm before each layer."""

    def __init__(self, config: ModelConfig, layers: list[MoELayer]) -> None:
        self.config = config
        self.layers = layers

    @property
    def moe_layers(self) -> list[MoELayer]:
        return self.layers

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
        if load_weights:
            slots = load_slots(source, i, mine, ep.device)
        else:
            slots = {
                name: torch.zeros((len(mine), *w.shape), dtype=w.dtype, device=ep.device)
                for name, w in source.expert(i, 0).items()
            }
        static = torch.from_numpy(placement.log2phy[i])
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
            y = swiglu(hidden[token], *(weights[name] for name in EXPERT_TENSORS))
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

"""The expert-parallel routed experts of one MoE layer: the project's one seam into a model.

A model family's own router picks each token's top-k logical experts and their weights; this
module maps every (token, logical expert) pair to one physical replica of the expert (replicas
taken in turn), sends the hidden state to the rank owning that slot (all-to-all), runs the
expert there, sends the result back and combines. With transformers' models it replaces the
decoder layer's ``mlp.experts`` submodule and keeps its call signature
``experts(hidden [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]``.

Each EP rank holds S = P / N physical slots; slot p lives on rank p // S. A rank's slot weights
(``SlotWeights``) stack one expert per slot in the layout the grouped GEMM reads: ``gate_up``
[S, 2I, H] (gate rows, then up rows) and ``down`` [S, H, I]. ``slots`` names views of them,
``w_gate`` [S, I, H], ``w_up`` [S, I, H] and ``w_down`` [S, H, I] (each slot's piece contiguous):
EPLB rebalances, resizes and recovery move experts through these views, in place.

The local computation sorts the (token, slot) pairs by slot once and runs two grouped GEMMs
(gate/up fused, then down) over all slots: no per-expert Python loop and, at EP 1, no host
synchronisation; at EP > 1 the all-to-all's split sizes are the only values read on the host.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moe_worker.eplb.state import EPLBLayerState

from .grouped_gemm import group_ends, grouped_gated, grouped_linear

EXPERT_TENSORS = ("w_gate", "w_up", "w_down")
Activation = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class SlotWeights:
    """One layer's experts on one rank, one per slot: ``gate_up`` [S, 2I, H], ``down`` [S, H, I]."""

    gate_up: torch.Tensor
    down: torch.Tensor

    @property
    def num_slots(self) -> int:
        return int(self.gate_up.shape[0])

    def views(self) -> dict[str, torch.Tensor]:
        """Name -> [S, ...] views sharing this storage (``EXPERT_TENSORS`` order)."""
        inter = self.gate_up.shape[1] // 2
        return {
            "w_gate": self.gate_up[:, :inter],
            "w_up": self.gate_up[:, inter:],
            "w_down": self.down,
        }


@dataclass
class EPGroup:
    """This rank's place in the expert-parallel group (world size 1: no communication)."""

    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


def gated_ffn(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    act: Activation = F.silu,
) -> torch.Tensor:
    """Gated FFN (SwiGLU for silu): x [N, H] -> [N, H]; w_gate/w_up [I, H], w_down [H, I]."""
    return (act(x @ w_gate.t()) * (x @ w_up.t())) @ w_down.t()


def _all_to_all(
    rows: torch.Tensor, send_counts: list[int], recv_counts: list[int], ep: EPGroup
) -> torch.Tensor:
    out = rows.new_empty((sum(recv_counts), *rows.shape[1:]))
    dist.all_to_all_single(out, rows.contiguous(), recv_counts, send_counts, group=ep.group)
    return out


class ExpertParallelExperts(nn.Module):
    """One MoE layer's routed experts on one EP rank (every rank calls it at the same step)."""

    def __init__(
        self,
        index: int,
        weights: SlotWeights,
        ep: EPGroup,
        static_log2phy: torch.Tensor,
        act: Activation = F.silu,
    ) -> None:
        """``weights``: this rank's slots (see the module docstring); ``static_log2phy`` [E, R]:
        the load-time routing table of each logical expert (its replicas, or its weighted
        entries when they share unequally; -1 padded), used while EPLB is off."""
        super().__init__()
        self.index = index
        self.weights = weights
        self.slots = weights.views()  # what rebalances, resizes and recovery write into
        self.ep = ep
        self.act = act
        probe = torch.linspace(-8.0, 8.0, 64)
        self.act_is_silu = bool(torch.equal(act(probe), F.silu(probe)))  # a fused kernel exists
        self.slots_per_rank = weights.num_slots
        # sort keys: global physical slots, in the narrowest integer type that holds them
        num_physical = self.slots_per_rank * ep.size
        self._key_dtype = torch.int16 if num_physical < 2**15 else torch.int32
        self._slot_ids = torch.arange(self.slots_per_rank, device=ep.device, dtype=self._key_dtype)
        # EPLB state: None means EPLB is off for this layer; the load-time map then stays.
        self.eplb_state: EPLBLayerState | None = None
        self.computed_pairs = 0  # (token, expert) pairs this rank's slots computed, cumulative
        self.routed_pairs = 0  # (token, expert) pairs this rank's tokens were routed to
        self._replica_offset = 0  # rotates replica choice across steps (decode steps are small)
        self._lanes = torch.arange(64, device=ep.device)  # top-k positions 0..k-1
        self.set_static_map(static_log2phy)

    @property
    def num_logical(self) -> int:
        """Logical experts E of this layer."""
        return int(self._static_log2phy.shape[0])

    def set_static_map(self, static_log2phy: torch.Tensor) -> None:
        self._static_log2phy = static_log2phy.to(self.ep.device)  # [E, R]
        self._static_count = (static_log2phy >= 0).sum(dim=1).to(self.ep.device)  # [E]

    def physical_slots(self, ids: torch.Tensor, token_offset: int) -> torch.Tensor:
        """Physical slot [T, k] of each (token, logical expert) ``ids`` [T, k]: the routing
        table's entries in turn (each replica in proportion to its share)."""
        if self.eplb_state is None:
            log2phy, count = self._static_log2phy, self._static_count
        else:
            log2phy, count = self.eplb_state.routing_maps()
        tokens, top_k = ids.shape
        if top_k > self._lanes.shape[0]:
            self._lanes = torch.arange(top_k, device=self.ep.device)
        positions = torch.arange(token_offset, token_offset + tokens, device=ids.device)
        replica = (positions[:, None] + self._lanes[:top_k]) % count[ids]  # (t + j) mod count
        return log2phy[ids, replica]

    def forward(
        self,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        token_offset: int | None = None,
    ) -> torch.Tensor:
        """Routed-expert output [T, H] (dtype of ``hidden_states`` [T, H]) for the router's
        ``top_k_index`` [T, k] (logical experts) and ``top_k_weights`` [T, k]."""
        if token_offset is None:
            token_offset = self._replica_offset
            self._replica_offset += int(hidden_states.shape[0])
        ids = top_k_index.to(torch.long)
        slots = self.physical_slots(ids, token_offset)  # [T, k]
        if self.eplb_state is not None:
            self.eplb_state.note_step(slots)
        self.routed_pairs += int(slots.numel())
        out = self._dispatch_compute_combine(hidden_states, slots, top_k_weights)
        return out.to(hidden_states.dtype)

    def idle_pass(self, hidden_size: int, dtype: torch.dtype) -> None:
        """Take part in this layer's all-to-alls with no tokens (a rank with no work this step)."""
        if self.ep.size > 1:
            empty = torch.empty((0, hidden_size), dtype=dtype, device=self.ep.device)
            ids = torch.empty((0, 1), dtype=torch.long, device=self.ep.device)
            weights = torch.empty((0, 1), dtype=torch.float32, device=self.ep.device)
            self._dispatch_compute_combine(empty, ids, weights)

    def _dispatch_compute_combine(
        self, hidden: torch.Tensor, slots: torch.Tensor, combine: torch.Tensor
    ) -> torch.Tensor:
        """hidden [T, H], slots [T, k] physical, combine [T, k] -> [T, H] (weights' dtype)."""
        tokens, top_k = slots.shape
        # Sorting by global slot orders the (token, k) pairs by owning rank and, within it, by
        # local slot; narrow keys sort in fewer radix passes.
        sorted_slot, order = torch.sort(slots.flatten().to(self._key_dtype), stable=True)
        token_of = order // top_k  # pair i of the flattened [T, k] belongs to token i // k
        if self.ep.size == 1:
            ends = group_ends(sorted_slot, self._slot_ids)
            by_pair = self._compute(hidden, ends, token_of, order, combine.flatten())
        else:
            owner = sorted_slot.long() // self.slots_per_rank
            send = torch.bincount(owner, minlength=self.ep.size)
            recv = torch.empty_like(send)
            dist.all_to_all_single(recv, send, group=self.ep.group)
            send_counts, recv_counts = send.tolist(), recv.tolist()
            rows_in = _all_to_all(hidden[token_of], send_counts, recv_counts, self.ep)
            local_slot = (sorted_slot % self.slots_per_rank).to(torch.int32)  # gloo has no int16
            local_in = _all_to_all(local_slot, send_counts, recv_counts, self.ep)
            # each sender's rows are sorted by slot; merge them into one slot order
            local_sorted, order_in = torch.sort(local_in.to(self._key_dtype), stable=True)
            ends = group_ends(local_sorted, self._slot_ids)
            computed = self._compute(rows_in, ends, order_in, order_in, None)
            computed = _all_to_all(computed, recv_counts, send_counts, self.ep)
            by_pair = torch.empty_like(computed)
            by_pair[order] = computed
            by_pair *= combine.flatten().to(computed.dtype).unsqueeze(1)
        return by_pair.view(tokens, top_k, by_pair.shape[1]).sum(dim=1)

    def _compute(
        self,
        rows: torch.Tensor,
        ends: torch.Tensor,
        source_row: torch.Tensor,
        target_row: torch.Tensor,
        scale: torch.Tensor | None,
    ) -> torch.Tensor:
        """The experts of this rank's slots on N (row, slot) pairs sorted by local slot: pair n
        takes ``rows[source_row[n]]`` (``rows`` [R, H]) through its slot (``ends`` int32 [S]:
        end offset of each slot's pairs) and becomes output row ``target_row[n]``, times
        ``scale`` [N] of that output row if given -> [N, H]. Two grouped GEMMs over all slots."""
        self.computed_pairs += int(source_row.shape[0])
        gated = grouped_gated(
            rows, self.weights.gate_up, ends, self.act, self.act_is_silu, source_row
        )  # [N, I]
        return grouped_linear(gated, self.weights.down, ends, target_row, scale)

    def extra_repr(self) -> str:
        return (
            f"layer={self.index}, slots={self.slots_per_rank}, rank={self.ep.rank}/{self.ep.size}"
        )


def load_slots(
    source: Any, layer: int, experts: list[int], device: torch.device, zeroed: bool = False
) -> SlotWeights:
    """Stacked weights of ``experts``, one per slot, of MoE layer ``layer`` from any source
    with ``expert(layer, expert)`` (name -> tensor, ``EXPERT_TENSORS``); ``zeroed``: the shapes
    only, all zeros (a rank joining a running group, whose slots a resize fills)."""
    first = source.expert(layer, experts[0] if experts else 0)
    inter, hidden = first["w_gate"].shape
    dtype = first["w_gate"].dtype
    alloc = torch.zeros if zeroed else torch.empty
    weights = SlotWeights(
        gate_up=alloc((len(experts), 2 * inter, hidden), dtype=dtype, device=device),
        down=alloc((len(experts), hidden, inter), dtype=dtype, device=device),
    )
    if not zeroed:
        views = weights.views()
        for slot, expert in enumerate(experts):
            tensors = first if slot == 0 else source.expert(layer, expert)
            for name in EXPERT_TENSORS:
                views[name][slot].copy_(tensors[name])
    return weights

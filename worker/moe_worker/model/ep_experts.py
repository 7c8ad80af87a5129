"""The expert-parallel routed experts of one MoE layer: the project's one seam into a model.

A model family's own router picks each token's top-k logical experts and their weights; this
module maps every (token, logical expert) pair to one physical replica of the expert (replicas
taken in turn), sends the hidden state to the rank owning that slot (all-to-all), runs the
expert there, sends the result back and combines. With transformers' models it replaces the
decoder layer's ``mlp.experts`` submodule and keeps its call signature
``experts(hidden [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]``.

Each EP rank holds S = P / N physical slots; slot p lives on rank p // S. A rank's slot weights
(``slots``) stack one expert per slot: ``w_gate`` [S, I, H], ``w_up`` [S, I, H], ``w_down``
[S, H, I]; EPLB rebalances, resizes and recovery rewrite them in place.
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

EXPERT_TENSORS = ("w_gate", "w_up", "w_down")
Activation = Callable[[torch.Tensor], torch.Tensor]


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
        slots: dict[str, torch.Tensor],
        ep: EPGroup,
        static_log2phy: torch.Tensor,
        act: Activation = F.silu,
    ) -> None:
        """``slots``: name -> [S, ...] (see the module docstring); ``static_log2phy`` [E, R]:
        the load-time replicas of each logical expert (-1 padded), used while EPLB is off."""
        super().__init__()
        self.index = index
        self.slots = slots
        self.ep = ep
        self.act = act
        self.slots_per_rank = int(next(iter(slots.values())).shape[0])
        # EPLB state: None means EPLB is off for this layer; the load-time map then stays.
        self.eplb_state: EPLBLayerState | None = None
        self.computed_pairs = 0  # (token, expert) pairs this rank's slots computed, cumulative
        self.routed_pairs = 0  # (token, expert) pairs this rank's tokens were routed to
        self._replica_offset = 0  # rotates replica choice across steps (decode steps are small)
        self.set_static_map(static_log2phy)

    @property
    def num_logical(self) -> int:
        """Logical experts E of this layer."""
        return int(self._static_log2phy.shape[0])

    def set_static_map(self, static_log2phy: torch.Tensor) -> None:
        self._static_log2phy = static_log2phy.to(self.ep.device)  # [E, R]
        self._static_count = (static_log2phy >= 0).sum(dim=1).to(self.ep.device)  # [E]

    def physical_slots(self, ids: torch.Tensor, token_offset: int) -> torch.Tensor:
        """Physical slot [T, k] of each (token, logical expert) ``ids`` [T, k]; replicas in turn."""
        if self.eplb_state is None:
            log2phy, count = self._static_log2phy, self._static_count
        else:
            assert self.eplb_state.log2phy is not None and self.eplb_state.replica_count is not None
            log2phy, count = self.eplb_state.log2phy, self.eplb_state.replica_count
        positions = torch.arange(ids.shape[0], device=ids.device)[:, None] + token_offset
        replica = (positions + torch.arange(ids.shape[1], device=ids.device)) % count[ids]
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
        """hidden [T, H], slots [T, k] physical, combine [T, k] -> float32 [T, H]."""
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
        weights = combine.flatten()[order].unsqueeze(1).float()
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
                w_gate, w_up, w_down = (self.slots[name][s] for name in EXPERT_TENSORS)
                out[start : start + count] = gated_ffn(
                    grouped[start : start + count], w_gate, w_up, w_down, self.act
                )
                start += count
        result = torch.empty_like(rows)
        result[order] = out
        return result

    def extra_repr(self) -> str:
        return (
            f"layer={self.index}, slots={self.slots_per_rank}, rank={self.ep.rank}/{self.ep.size}"
        )


def load_slots(
    source: Any, layer: int, experts: list[int], device: torch.device, zeroed: bool = False
) -> dict[str, torch.Tensor]:
    """Stacked weights (name -> [S, ...]) of ``experts``, one per slot, of MoE layer ``layer``
    from any source with ``expert(layer, expert)``; ``zeroed``: the shapes only, all zeros (a
    rank joining a running group, whose slots a resize fills)."""
    first = source.expert(layer, experts[0] if experts else 0)
    if zeroed:
        return {
            name: torch.zeros((len(experts), *w.shape), dtype=w.dtype, device=device)
            for name, w in first.items()
        }
    per_slot = [first] + [source.expert(layer, e) for e in experts[1:]]
    return {name: torch.stack([w[name] for w in per_slot]).to(device) for name in EXPERT_TENSORS}

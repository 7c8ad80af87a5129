"""Transfer planning: which rank sends which expert to which slot when the map changes. Pure.

For one layer, old and new ``phy2log`` [P] over N ranks of S slots (slot p on rank p // S):

- a slot whose expert is unchanged is skipped;
- an expert the receiving rank already held (old map) is copied locally from that old slot;
- otherwise the rank receives one copy of the expert from a rank that held it, into the first
  slot that needs it, and fills its other slots needing it by local duplication.

The rank counts may differ (elastic resize); ranks are identified by index. An old entry of -1
marks a slot whose contents are lost (its rank died): nothing is kept from it or sent from it,
and an expert no remaining slot holds is reloaded from the model source (``Reload``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Transfer:
    """``expert`` from (src_rank, src_slot) of the old map to (dst_rank, dst_slot) of the new.

    Slots are local indices on their rank. ``src_rank == dst_rank`` is a local copy.
    """

    expert: int
    src_rank: int
    src_slot: int
    dst_rank: int
    dst_slot: int


@dataclass(frozen=True)
class Duplicate:
    """After transfers, copy new slot ``src_slot`` to new slot ``dst_slot`` on ``rank``."""

    rank: int
    src_slot: int
    dst_slot: int


@dataclass(frozen=True)
class Reload:
    """``expert`` has no surviving replica: ``rank`` loads it from the source into ``slot``."""

    expert: int
    rank: int
    slot: int


@dataclass
class LayerPlan:
    transfers: list[Transfer] = field(default_factory=list)
    duplicates: list[Duplicate] = field(default_factory=list)
    reloads: list[Reload] = field(default_factory=list)

    @property
    def remote(self) -> list[Transfer]:
        return [t for t in self.transfers if t.src_rank != t.dst_rank]

    def is_empty(self) -> bool:
        return not self.transfers and not self.duplicates and not self.reloads


def plan_layer(old_phy2log: np.ndarray, new_phy2log: np.ndarray, slots_per_rank: int) -> LayerPlan:
    """Transfers and duplicates turning the old slot contents [P_old] into the new [P_new]."""
    old_ranks = len(old_phy2log) // slots_per_rank
    new_ranks = len(new_phy2log) // slots_per_rank
    old = np.asarray(old_phy2log).reshape(old_ranks, slots_per_rank)
    new = np.asarray(new_phy2log).reshape(new_ranks, slots_per_rank)
    holders: dict[int, list[tuple[int, int]]] = {}
    for rank in range(old_ranks):
        for slot in range(slots_per_rank):
            if old[rank, slot] >= 0:
                holders.setdefault(int(old[rank, slot]), []).append((rank, slot))
    plan = LayerPlan()
    for rank in range(new_ranks):
        filled: dict[int, int] = {}  # expert -> a new slot on this rank already holding it
        pending: list[tuple[int, int]] = []
        for slot in range(slots_per_rank):
            expert = int(new[rank, slot])
            if rank < old_ranks and old[rank, slot] == expert:
                filled.setdefault(expert, slot)
        for slot in range(slots_per_rank):
            expert = int(new[rank, slot])
            if rank < old_ranks and old[rank, slot] == expert:
                continue
            if expert in filled:
                pending.append((filled[expert], slot))
                continue
            local = [s for r, s in holders.get(expert, []) if r == rank]
            if local:
                plan.transfers.append(Transfer(expert, rank, local[0], rank, slot))
            else:
                sources = holders.get(expert)
                if not sources:
                    plan.reloads.append(Reload(expert, rank, slot))
                else:
                    src_rank, src_slot = sources[rank % len(sources)]
                    plan.transfers.append(Transfer(expert, src_rank, src_slot, rank, slot))
            filled[expert] = slot
        plan.duplicates.extend(Duplicate(rank, src, dst) for src, dst in pending)
    return plan


def apply_plan_to_contents(
    old_phy2log: np.ndarray, plan: LayerPlan, slots_per_rank: int, new_ranks: int
) -> np.ndarray:
    """What each new slot holds after executing ``plan`` (unchanged slots keep old content).

    Simulates the executor on expert ids instead of weights, for tests. Slots of new ranks
    that nothing writes hold -1 (as do lost slots nothing rewrites).
    """
    old_ranks = len(old_phy2log) // slots_per_rank
    contents = np.full((new_ranks, slots_per_rank), -1, dtype=np.int64)
    old = np.asarray(old_phy2log).reshape(old_ranks, slots_per_rank)
    kept = min(old_ranks, new_ranks)
    contents[:kept] = old[:kept]
    for t in plan.transfers:
        contents[t.dst_rank, t.dst_slot] = old[t.src_rank, t.src_slot]
    for r in plan.reloads:
        contents[r.rank, r.slot] = r.expert
    for d in plan.duplicates:
        contents[d.rank, d.dst_slot] = contents[d.rank, d.src_slot]
    return contents.reshape(-1)

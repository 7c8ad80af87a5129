"""One synchronous rebalance of a model: loads -> policy -> plans -> transfers -> commit.

Every rank runs it at the same step with the same all-reduced loads, so every rank computes the
same placement and plans (the policies are deterministic) and commits at the same step.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist

from .communicator import Communicator
from .executor import execute_layer_plan
from .layout import Layout
from .planner import plan_layer
from .policy import Placement, balancedness, compute_placement, moved_copies
from .state import EPLBState


class HasSlots(Protocol):
    slots: dict[str, torch.Tensor]


@dataclass
class RebalanceResult:
    trigger: str
    result: str  # ok | skipped | failed
    duration_s: float = 0.0
    bytes_received: int = 0
    copies_moved: int = 0
    balancedness_before: float = 0.0
    balancedness_after: float = 0.0
    mapping_generation: int = 0
    error: str = ""
    model: str = "main"  # the registered model (main, draft) it rebalanced

    @property
    def gain_per_moved_copy(self) -> float:
        """Balancedness gained per expert copy moved (0.0 when none moved)."""
        if self.copies_moved <= 0:
            return 0.0
        return (self.balancedness_after - self.balancedness_before) / self.copies_moved


def summarize(
    trigger: str,
    result: str,
    load: np.ndarray,
    current: Placement,
    applied: Placement,
    world: int,
    started: float,
    bytes_received: int,
    mapping_generation: int,
    error: str = "",
) -> RebalanceResult:
    """The figures of a rebalance that went from ``current`` to ``applied`` for ``load`` [L, E]."""
    return RebalanceResult(
        trigger=trigger,
        result=result,
        duration_s=time.perf_counter() - started,
        bytes_received=bytes_received,
        copies_moved=int(moved_copies(current, applied, world, world).sum()),
        balancedness_before=balancedness(load, current, world),
        balancedness_after=balancedness(load, applied, world),
        mapping_generation=mapping_generation,
        error=error,
    )


def global_logical_load(
    state: EPLBState, group: dist.ProcessGroup | None, world: int
) -> np.ndarray:
    """Tokens per logical expert over the window, summed over ranks: [L, E] float64."""
    slot_load = state.window_slot_load()
    if world > 1:
        dist.all_reduce(slot_load, group=group)
    logical = torch.zeros(state.replica_count.shape, dtype=slot_load.dtype, device=slot_load.device)
    logical.scatter_add_(1, state.phy2log, slot_load)
    return logical.cpu().numpy().astype(np.float64)


def apply_placement(
    state: EPLBState,
    layers: list[HasSlots],
    new: Placement,
    rank: int,
    world: int,
    communicator: Communicator,
) -> int:
    """Move weights so every slot holds its expert under ``new``, then commit the maps.

    All ranks call it with the same ``new``. Returns the bytes this rank received.
    """
    current = state.placement()
    slots_per_rank = current.num_physical // world
    received = 0
    for index, layer in enumerate(layers):
        plan = plan_layer(current.phy2log[index], new.phy2log[index], slots_per_rank)
        received += execute_layer_plan(plan, rank, layer.slots, communicator)
    state.commit(new, layers=range(state.num_layers))
    state.clear_window()
    return received


def rebalance(
    state: EPLBState,
    layers: list[HasSlots],
    policy: str,
    rank: int,
    world: int,
    group: dist.ProcessGroup | None,
    communicator: Communicator,
    trigger: str,
    layout: Layout = Layout(),
    options: Mapping[str, Any] | None = None,
) -> RebalanceResult:
    """Recompute the placement from the window and move weights to match (all ranks call it);
    ``layout``: expert groups and nodes for node-aware placement; ``options``: the policy's."""
    started = time.perf_counter()
    load = global_logical_load(state, group, world)
    if load.sum() == 0:
        return RebalanceResult(trigger, "skipped", mapping_generation=state.mapping_generation)
    current = state.placement()
    new = compute_placement(
        policy,
        load,
        num_physical=current.num_physical,
        num_gpus=world,
        num_groups=layout.num_groups,
        num_nodes=layout.num_nodes,
        previous=current,
        **(options or {}),
    )
    received = apply_placement(state, layers, new, rank, world, communicator)
    return summarize(
        trigger, "ok", load, current, new, world, started, received, state.mapping_generation
    )

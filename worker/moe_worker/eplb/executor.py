"""Executes transfer plans: moves expert weights between ranks through a communicator.

A rank's slot weights are ``name -> [S, ...]`` tensors, changed in place.
"""

from __future__ import annotations

import torch

from .communicator import Communicator
from .planner import LayerPlan


def execute_layer_plan(
    plan: LayerPlan, rank: int, slots: dict[str, torch.Tensor], communicator: Communicator
) -> int:
    """Apply this rank's part of ``plan`` to ``slots``. Returns the bytes this rank received.

    Sends and local copies read a snapshot of the old weights, so slots may be overwritten in
    any order; receives land in their slots directly; duplicates run last.
    """
    if plan.is_empty():
        return 0
    sources = {t.src_slot for t in plan.transfers if t.src_rank == rank}
    old = {name: {s: tensor[s].clone() for s in sources} for name, tensor in slots.items()}
    received = 0
    for t in plan.transfers:
        if t.src_rank == t.dst_rank:
            continue
        for name, tensor in slots.items():
            if t.src_rank == rank:
                communicator.add_send(old[name][t.src_slot], t.dst_rank)
            elif t.dst_rank == rank:
                communicator.add_recv(tensor[t.dst_slot], t.src_rank)
                received += tensor[t.dst_slot].numel() * tensor.element_size()
    communicator.execute()
    for t in plan.transfers:
        if t.src_rank == t.dst_rank == rank:
            for name, tensor in slots.items():
                tensor[t.dst_slot].copy_(old[name][t.src_slot])
    for d in plan.duplicates:
        if d.rank == rank:
            for tensor in slots.values():
                tensor[d.dst_slot].copy_(tensor[d.src_slot])
    return received

"""Executes transfer plans: moves expert weights between ranks through a communicator.

A rank's slot weights are ``name -> [S, ...]`` tensors. ``stage_layer_plan`` fetches the new
contents of this rank's changed slots into separate buffers (the live weights are only read),
``commit_staged`` copies them in. The synchronous path does both at once; the asynchronous path
stages in the background and commits at a step boundary.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .communicator import Communicator
from .planner import LayerPlan

Staged = dict[int, dict[str, torch.Tensor]]  # new slot -> tensor name -> weights
# Loads one logical expert's weights from the model source (tensor name -> weights).
Reloader = Callable[[int], dict[str, torch.Tensor]]


def stage_layer_plan(
    plan: LayerPlan,
    rank: int,
    slots: dict[str, torch.Tensor],
    communicator: Communicator,
    reload: Reloader | None = None,
) -> tuple[Staged, int]:
    """This rank's part of ``plan``: (new contents of its changed slots, bytes received).

    Every rank must call it with the same plan: sends and receives are queued in the plan's
    global order so matching pairs line up. ``reload`` serves the plan's reloads (experts
    no surviving slot holds); a plan with reloads for this rank needs it.
    """
    staged: Staged = {}
    received = 0
    for t in plan.transfers:
        if t.src_rank == t.dst_rank:
            continue
        if t.src_rank == rank:
            for tensor in slots.values():
                communicator.add_send(tensor[t.src_slot], t.dst_rank)
        elif t.dst_rank == rank:
            buffers = {name: torch.empty_like(tensor[t.dst_slot]) for name, tensor in slots.items()}
            staged[t.dst_slot] = buffers
            for buffer in buffers.values():
                communicator.add_recv(buffer, t.src_rank)
                received += buffer.numel() * buffer.element_size()
    communicator.execute()
    for t in plan.transfers:
        if t.src_rank == t.dst_rank == rank:
            staged[t.dst_slot] = {
                name: tensor[t.src_slot].clone() for name, tensor in slots.items()
            }
    for r in plan.reloads:
        if r.rank == rank:
            if reload is None:
                raise ValueError(f"expert {r.expert} has no surviving replica and no source")
            weights = reload(r.expert)
            staged[r.slot] = {
                name: weights[name].to(tensor.device, tensor.dtype)
                for name, tensor in slots.items()
            }
    for d in plan.duplicates:
        if d.rank == rank:
            source = staged.get(d.src_slot)
            staged[d.dst_slot] = {
                name: (source[name] if source is not None else tensor[d.src_slot]).clone()
                for name, tensor in slots.items()
            }
    return staged, received


def commit_staged(slots: dict[str, torch.Tensor], staged: Staged) -> None:
    for slot, tensors in staged.items():
        for name, tensor in tensors.items():
            slots[name][slot].copy_(tensor)


def execute_layer_plan(
    plan: LayerPlan,
    rank: int,
    slots: dict[str, torch.Tensor],
    communicator: Communicator,
    reload: Reloader | None = None,
) -> int:
    """Apply this rank's part of ``plan`` to ``slots`` now. Returns the bytes received."""
    if plan.is_empty():
        return 0
    staged, received = stage_layer_plan(plan, rank, slots, communicator, reload)
    commit_staged(slots, staged)
    return received

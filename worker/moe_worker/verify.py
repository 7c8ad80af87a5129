"""``moe-eplb verify``: run a checkpoint's MoE blocks under expert parallelism, write outputs.

N local ranks (gloo on 127.0.0.1) each load only their slots' experts, take a share of the input
tokens [T, H], and apply every MoE layer independently (the MoE block alone: no residual or
norm, as HF's sparse MoE block computes it) under a placement with one redundant slot per rank.
Rank 0 writes the outputs [L, T, H] (float32). Compare them with any other implementation.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moe_worker.eplb.policy import Placement, compute_placement
from moe_worker.model.checkpoint import CheckpointSource
from moe_worker.model.moe import EPGroup, build_model
from moe_worker.model.router import route

PLACEMENTS = ("random", "balanced")


def make_placement(
    source: CheckpointSource, hidden: torch.Tensor, ep_size: int, kind: str, seed: int
) -> Placement:
    """A placement with ceil(E / N) + 1 slots per rank: ``random`` or ``balanced`` for the input."""
    config = source.config
    experts = config.num_experts
    num_physical = ep_size * (-(-experts // ep_size) + 1)
    if kind == "random":
        rng = np.random.default_rng(seed)
        maps = [
            rng.permutation(
                np.concatenate(
                    [np.arange(experts), rng.integers(0, experts, num_physical - experts)]
                )
            )
            for _ in range(config.num_layers)
        ]
        return Placement.from_phy2log(np.stack(maps), experts)
    if kind == "balanced":
        load = np.zeros((config.num_layers, experts))
        for layer in range(config.num_layers):
            ids, _ = route(hidden.to(source.dtype), source.router(layer), config)
            load[layer] = np.bincount(ids.flatten().numpy(), minlength=experts)
        return compute_placement("balanced", load, num_physical=num_physical, num_gpus=ep_size)
    raise ValueError(f"placement must be one of {', '.join(PLACEMENTS)}, got {kind!r}")


def _rank_main(
    rank: int,
    world: int,
    port: int,
    checkpoint: str,
    kind: str,
    seed: int,
    input_path: str,
    output_path: str,
) -> None:
    if world > 1:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
        )
    try:
        source = CheckpointSource(checkpoint)
        hidden = torch.from_numpy(np.load(input_path)).float()
        placement = make_placement(source, hidden, world, kind, seed)
        model = build_model(source, placement, EPGroup(rank=rank, size=world))
        shares = np.array_split(np.arange(hidden.shape[0]), world)
        mine = torch.from_numpy(shares[rank])
        x = hidden[mine].to(source.dtype)
        outputs = [
            layer(x, int(mine[0]) if len(mine) else 0).float().numpy() for layer in model.layers
        ]
        gathered: list = [None] * world
        if world > 1:
            dist.all_gather_object(gathered, outputs)
        else:
            gathered = [outputs]
        if rank == 0:
            result = np.stack(
                [
                    np.concatenate([gathered[r][layer] for r in range(world)])
                    for layer in range(len(outputs))
                ]
            )
            np.save(output_path, result.astype(np.float32))
    finally:
        if world > 1:
            dist.destroy_process_group()


def verify(
    checkpoint: Path,
    ep_size: int,
    placement: str,
    input_path: Path,
    output_path: Path,
    seed: int = 0,
) -> tuple[int, ...]:
    """Run the check; returns the shape written. ValueError names a bad argument."""
    if ep_size < 1:
        raise ValueError(f"--ep-size must be >= 1, got {ep_size}")
    if placement not in PLACEMENTS:
        raise ValueError(f"--placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
    source = CheckpointSource(checkpoint)  # fail early on a bad checkpoint
    hidden = np.load(input_path)
    if hidden.ndim != 2 or hidden.shape[1] != source.config.hidden_size:
        raise ValueError(
            f"--input must be [tokens, {source.config.hidden_size}], got shape {hidden.shape}"
        )
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    args = (ep_size, port, str(checkpoint), placement, seed, str(input_path), str(output_path))
    mp.spawn(_rank_main, args=args, nprocs=ep_size, join=True)
    return tuple(np.load(output_path, mmap_mode="r").shape)

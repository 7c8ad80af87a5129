"""``moe-eplb verify``: run a checkpoint's MoE blocks under expert parallelism, write outputs.

N local ranks (gloo on 127.0.0.1) each build the model with transformers' classes, holding only
their slots' experts, take a share of the input tokens [T, H], and apply every MoE block (the
family's own router and shared experts, our expert-parallel experts) on its own: no residual or
norm, as transformers' sparse MoE block computes it. The placement has one redundant slot per
rank: ``random``, or ``balanced`` for the input's routing (measured in a first pass). Rank 0
writes the outputs [L, T, H] (float32): compare them with transformers' own blocks.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moe_worker.eplb.policy import Placement, compute_placement, default_placement
from moe_worker.model.ep_experts import EPGroup
from moe_worker.model.hf_model import EPCausalLM, build_ep_model
from moe_worker.model.hf_source import CheckpointError, CheckpointSource

PLACEMENTS = ("random", "balanced")


def random_placement(layers: int, experts: int, num_physical: int, seed: int) -> Placement:
    """Every expert once plus random replicas, shuffled over the slots of each layer."""
    rng = np.random.default_rng(seed)
    extra = num_physical - experts
    maps = [
        rng.permutation(np.concatenate([np.arange(experts), rng.integers(0, experts, extra)]))
        for _ in range(layers)
    ]
    return Placement.from_phy2log(np.stack(maps), experts)


def apply_blocks(model: EPCausalLM, hidden: torch.Tensor) -> list[torch.Tensor]:
    """Every MoE block applied to ``hidden`` [T, H]: a list of [T, H] (all ranks call it)."""
    layers = model.model.get_decoder().layers
    outputs = []
    with torch.inference_mode():
        for index in model.decoder_layers:
            out = layers[index].mlp(hidden[None])
            out = out[0] if isinstance(out, tuple) else out
            outputs.append(out.reshape(hidden.shape).float())
    return outputs


def routed_load(model: EPCausalLM, hidden: torch.Tensor, world: int) -> np.ndarray:
    """Tokens per logical expert [L, E] that the routers send ``hidden`` (all ranks' shares)."""
    experts = model.moe_layers[0].num_logical
    load = torch.zeros((len(model.moe_layers), experts), dtype=torch.float64)

    def recorder(index: int) -> Any:
        def hook(module: Any, args: tuple[Any, ...]) -> None:
            load[index] += torch.bincount(args[1].flatten().cpu(), minlength=experts).double()

        return hook

    handles = [
        layer.register_forward_pre_hook(recorder(i)) for i, layer in enumerate(model.moe_layers)
    ]
    apply_blocks(model, hidden)
    for handle in handles:
        handle.remove()
    if world > 1:
        dist.all_reduce(load)
    return load.numpy()


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
    if world > 1:  # the parent hosts the store, so no rank's exit takes it from the others
        store = dist.TCPStore("127.0.0.1", port, None, False)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    try:
        source = CheckpointSource(checkpoint)
        layers, experts = len(source.moe_decoder_layers), source.num_experts
        if not layers:
            raise CheckpointError(f"{checkpoint}: the model has no MoE layers to verify")
        num_physical = world * (-(-experts // world) + 1)
        hidden = torch.from_numpy(np.load(input_path)).to(source.dtype)
        mine = hidden[np.array_split(np.arange(hidden.shape[0]), world)[rank]]
        ep = EPGroup(rank=rank, size=world)
        if kind == "balanced":
            first = build_ep_model(source, default_placement(layers, experts, num_physical), ep)
            load = routed_load(first, mine, world)
            del first
            placement = compute_placement(
                "balanced", load, num_physical=num_physical, num_gpus=world
            )
        else:
            placement = random_placement(layers, experts, num_physical, seed)
        outputs = [o.numpy() for o in apply_blocks(build_ep_model(source, placement, ep), mine)]
        gathered: list[Any] = [None] * world
        if world > 1:
            dist.all_gather_object(gathered, outputs)
        else:
            gathered = [outputs]
        if rank == 0:
            result = np.stack(
                [np.concatenate([part[layer] for part in gathered]) for layer in range(layers)]
            )
            np.save(output_path, result.astype(np.float32))
        if world > 1:
            dist.barrier()  # nobody tears its connections down while a peer still uses them
    finally:
        if world > 1:
            dist.destroy_process_group()
    # The work is saved: leave without the interpreter's teardown, in which native thread
    # pools (gloo's, OpenMP's) now and then abort the process (SIGABRT, "terminate called
    # without an active exception") after everything succeeded.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


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
    hidden_size = int(source.hf_config.get_text_config().hidden_size)
    try:
        hidden = np.load(input_path)
    except (OSError, ValueError, EOFError) as exc:
        raise ValueError(f"--input {input_path}: not a readable .npy array ({exc})") from None
    if hidden.ndim != 2 or hidden.shape[1] != hidden_size:
        raise ValueError(f"--input must be [tokens, {hidden_size}], got shape {hidden.shape}")
    if not np.issubdtype(hidden.dtype, np.floating):
        raise ValueError(f"--input must hold floating-point hidden states, not {hidden.dtype}")
    bad = int(hidden.size - np.count_nonzero(np.isfinite(hidden)))
    if bad:
        raise ValueError(f"--input must be finite: {bad} values are NaN or infinite")
    store = dist.TCPStore("127.0.0.1", 0, None, True, wait_for_workers=False)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    args = (
        ep_size,
        store.port,
        str(checkpoint),
        placement,
        seed,
        str(input_path),
        str(output_path),
    )
    mp.spawn(_rank_main, args=args, nprocs=ep_size, join=True)
    del store
    return tuple(np.load(output_path, mmap_mode="r").shape)

"""Rank functions for asynchronous-rebalance tests (CPU gloo in CI; the same code on GPUs)."""

from __future__ import annotations

import os
import time
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from ep_cases import REBALANCE_CONFIG, REBALANCE_PHYSICAL, rank_model
from moe_worker.config import ModelConfig
from moe_worker.eplb.async_worker import AsyncRebalance
from moe_worker.eplb.communicator import create_communicator
from moe_worker.eplb.policy import compute_placement
from moe_worker.eplb.rebalance import apply_placement
from moe_worker.model.ep_experts import EXPERT_TENSORS
from moe_worker.model.experts import FingerprintSource, SyntheticSource

TOKENS = 8


def skewed_load(seed: int = 4) -> np.ndarray:
    config = REBALANCE_CONFIG
    rng = np.random.default_rng(seed)
    return rng.lognormal(0, 1.2, size=(config["numLayers"], config["numExperts"])) * 1000


def slot_errors(model, source, phy2log: np.ndarray, rank: int, world: int) -> list:  # type: ignore[no-untyped-def]
    """Slots whose weights are not exactly the expert ``phy2log`` says they hold."""
    slots = REBALANCE_PHYSICAL // world
    wrong = []
    for layer_index, layer in enumerate(model.moe_layers):
        for slot in range(slots):
            expert = int(phy2log[layer_index, rank * slots + slot])
            want = source.expert(layer_index, expert)
            for name in EXPERT_TENSORS:
                if not torch.equal(layer.slots[name][slot].cpu(), want[name]):
                    wrong.append(
                        (layer_index, slot, FingerprintSource.decode(layer.slots[name][slot]))
                    )
    return wrong


def _groups(world: int, deadline: float):  # type: ignore[no-untyped-def]
    if world == 1:
        return None, None
    timeout = timedelta(seconds=max(3.0 * deadline, 5.0))
    return dist.new_group(backend="gloo", timeout=timeout), dist.new_group(
        backend="gloo", timeout=timeout
    )


def async_rebalance_run(
    rank: int,
    world: int,
    mode: str,
    deadline: float = 30.0,
    fingerprint: bool = True,
    policy: str = "balanced",
) -> dict:
    """Run one async rebalance while stepping; ``mode`` injects a fault (none|raise|stall|exit).

    Returns the result, the maps seen at every step, this rank's outputs at every step (with the
    inputs' offset), and the slots whose weights disagree with the final maps.
    """
    config = ModelConfig.model_validate(REBALANCE_CONFIG)
    source = FingerprintSource(config) if fingerprint else SyntheticSource(config)
    model, state, initial, _ = rank_model(source, rank, world)
    control, transfer = _groups(world, deadline)
    communicator = create_communicator("torch_gloo", group=transfer)

    def fault(fault_rank: int, layer: int) -> None:
        if mode == "raise" and fault_rank == 1 and layer == 0:
            raise RuntimeError("injected transfer failure")
        if mode == "stall" and fault_rank == 1 and layer == 1:
            time.sleep(deadline + 2.0)
        if mode == "exit" and fault_rank == world - 1 and layer == 0:
            os._exit(1)

    hidden = torch.randn(
        (TOKENS * world, config.hidden_size), generator=torch.Generator().manual_seed(9)
    )
    mine = hidden[rank * TOKENS : (rank + 1) * TOKENS]
    rebalance = AsyncRebalance(
        state,
        model.moe_layers,
        policy,
        skewed_load(),
        rank,
        world,
        communicator,
        control,
        deadline,
        "manual",
        torch.device("cpu"),
        fault,
    )
    maps, outputs = [], []
    started = time.monotonic()
    while True:
        if mode != "exit":  # with a rank gone, the forward pass itself could not run
            outputs.append([layer(mine, rank * TOKENS) for layer in model.layers])
            maps.append(state.placement().phy2log.copy())
        result = rebalance.poll()
        if result is not None:
            break
        time.sleep(0.002)
    final = state.placement().phy2log.copy()
    return {
        "result": result.result,
        "error": result.error,
        "committed": rebalance.committed,
        "seconds": time.monotonic() - started,
        "maps": maps,
        "outputs": outputs,
        "final": final,
        "wrong": slot_errors(model, source, final, rank, world) if fingerprint else [],
        "generation": state.mapping_generation,
    }


def sync_rebalance_run(rank: int, world: int, policy: str = "balanced") -> dict:
    """The synchronous path on the same load: final maps and slot check."""
    config = ModelConfig.model_validate(REBALANCE_CONFIG)
    source = FingerprintSource(config)
    model, state, initial, _ = rank_model(source, rank, world)
    new = compute_placement(
        policy, skewed_load(), num_physical=REBALANCE_PHYSICAL, num_gpus=world, previous=initial
    )
    apply_placement(state, model.moe_layers, new, rank, world, create_communicator("torch_gloo"))
    final = state.placement().phy2log.copy()
    return {"final": final, "wrong": slot_errors(model, source, final, rank, world)}

"""Synchronous rebalances move real weights: every slot ends up holding exactly its expert."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distributed import run_ranks
from moe_worker.config import ModelConfig
from moe_worker.eplb.communicator import create_communicator
from moe_worker.eplb.policy import Placement, compute_placement, default_placement
from moe_worker.eplb.rebalance import apply_placement
from moe_worker.eplb.state import EPLBLayerState, EPLBState
from moe_worker.model.experts import EXPERT_TENSORS, FingerprintSource, SyntheticSource
from moe_worker.model.moe import EPGroup, build_model, dense_reference

CONFIG = {"numExperts": 12, "numLayers": 2, "hiddenSize": 16, "intermediateSize": 8, "topK": 2}
NUM_PHYSICAL = 16


def targets(world: int, seed: int) -> list[tuple[str, Placement]]:
    """A sequence of placements: random, policy outputs on random loads, and a no-op."""
    rng = np.random.default_rng(seed)
    layers, experts = CONFIG["numLayers"], CONFIG["numExperts"]
    out: list[tuple[str, Placement]] = []
    previous = default_placement(layers, experts, NUM_PHYSICAL)
    for kind in ("random", "balanced", "incremental", "same", "random", "deepseek", "incremental"):
        if kind == "random":
            maps = [
                rng.permutation(
                    np.concatenate(
                        [np.arange(experts), rng.integers(0, experts, NUM_PHYSICAL - experts)]
                    )
                )
                for _ in range(layers)
            ]
            new = Placement.from_phy2log(np.stack(maps), experts)
        elif kind == "same":
            new = previous
        else:
            load = rng.lognormal(0, 1.0, size=(layers, experts)) * 1000
            new = compute_placement(
                kind, load, num_physical=NUM_PHYSICAL, num_gpus=world, previous=previous
            )
        out.append((kind, new))
        previous = new
    return out


def attach_state(model, placement: Placement) -> EPLBState:  # type: ignore[no-untyped-def]
    state = EPLBState(placement, window_size=4)
    for index, layer in enumerate(model.layers):
        layer.eplb_state = EPLBLayerState()
        layer.eplb_state.set_layer_state(index, state)
    return state


def fingerprint_run(rank: int, world: int, seed: int) -> list[tuple[str, int, int]]:
    config = ModelConfig.model_validate(CONFIG)
    source = FingerprintSource(config)
    initial = default_placement(config.num_layers, config.num_experts, NUM_PHYSICAL)
    model = build_model(source, initial, EPGroup(rank=rank, size=world))
    state = attach_state(model, initial)
    communicator = create_communicator("torch_gloo")
    slots = NUM_PHYSICAL // world
    wrong = []
    for step, (kind, new) in enumerate(targets(world, seed)):
        apply_placement(state, model.layers, new, rank, world, communicator)
        assert np.array_equal(state.placement().phy2log, new.phy2log)
        for layer_index, layer in enumerate(model.layers):
            for slot in range(slots):
                expert = int(new.phy2log[layer_index, rank * slots + slot])
                for tensor_index, name in enumerate(EXPERT_TENSORS):
                    weights = layer.slots[name][slot]
                    want = source.expert(layer_index, expert)[name]
                    if not torch.equal(weights, want):
                        wrong.append(
                            (
                                kind,
                                step,
                                layer_index,
                                slot,
                                FingerprintSource.decode(weights),
                                (layer_index, expert, tensor_index),
                            )
                        )
    return wrong


def outputs_after_rebalances(rank: int, world: int, seed: int) -> list:
    config = ModelConfig.model_validate(CONFIG)
    source = SyntheticSource(config)
    initial = default_placement(config.num_layers, config.num_experts, NUM_PHYSICAL)
    model = build_model(source, initial, EPGroup(rank=rank, size=world))
    state = attach_state(model, initial)
    communicator = create_communicator("auto", device="cpu")
    hidden = torch.randn(
        (8 * world, config.hidden_size), generator=torch.Generator().manual_seed(3)
    )
    mine = hidden[rank * 8 : (rank + 1) * 8]
    outputs = []
    for _, new in targets(world, seed):
        apply_placement(state, model.layers, new, rank, world, communicator)
        outputs.append([layer(mine, rank * 8) for layer in model.layers])
    return outputs


@pytest.mark.parametrize("world", [2, 4])
def test_every_slot_holds_its_expert_after_each_rebalance(world: int) -> None:
    for rank_wrong in run_ranks(fingerprint_run, world, 11):
        assert rank_wrong == []


def test_outputs_match_reference_after_rebalances() -> None:
    world = 2
    by_rank = run_ranks(outputs_after_rebalances, world, 5)
    config = ModelConfig.model_validate(CONFIG)
    source = SyntheticSource(config)
    hidden = torch.randn(
        (8 * world, config.hidden_size), generator=torch.Generator().manual_seed(3)
    )
    for index in range(len(targets(world, 5))):
        for layer in range(config.num_layers):
            got = torch.from_numpy(np.concatenate([by_rank[r][index][layer] for r in range(world)]))
            torch.testing.assert_close(
                got, dense_reference(source, layer, hidden), rtol=1e-5, atol=1e-6
            )

"""Rank functions shared by the CPU (gloo) and GPU (NCCL) expert-parallel tests."""

from __future__ import annotations

import numpy as np
import torch

from moe_worker.config import ModelConfig
from moe_worker.eplb.communicator import create_communicator
from moe_worker.eplb.policy import Placement, compute_placement, default_placement, fit_shares
from moe_worker.eplb.rebalance import apply_placement
from moe_worker.eplb.state import EPLBLayerState, EPLBState
from moe_worker.model.ep_experts import EXPERT_TENSORS
from moe_worker.model.experts import FingerprintSource, SyntheticSource
from moe_worker.model.moe import DenseReference, EPGroup, MoEModel, build_model, dense_reference

TOKENS_PER_RANK = 24
NUM_PHYSICAL = 20  # 16 experts + 4 redundant: divisible by EP sizes 1, 2 and 4

EP_CONFIGS = {
    "softmax-shared": dict(
        numExperts=16, topK=3, numLayers=2, hiddenSize=32, intermediateSize=24, numSharedExperts=1
    ),
    "sigmoid-grouped-bias": dict(
        numExperts=16,
        topK=4,
        numLayers=2,
        hiddenSize=32,
        intermediateSize=24,
        scoring="sigmoid",
        numExpertGroups=4,
        topkGroups=2,
        scoreBias=True,
        routedScalingFactor=2.5,
    ),
    "bf16": dict(
        numExperts=16, topK=2, numLayers=2, hiddenSize=32, intermediateSize=24, dtype="bfloat16"
    ),
}


def random_placements(count: int, num_layers: int, num_logical: int, seed: int) -> list[np.ndarray]:
    """Random valid maps: every expert at least once, random extra replicas, random slots."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        layers = []
        for _ in range(num_layers):
            extra = rng.integers(0, num_logical, size=NUM_PHYSICAL - num_logical)
            layers.append(rng.permutation(np.concatenate([np.arange(num_logical), extra])))
        out.append(np.stack(layers))
    return out


def ep_inputs(config: ModelConfig, world: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(7)
    return torch.randn((TOKENS_PER_RANK * world, config.hidden_size), generator=generator)


def ep_outputs(
    rank: int,
    world: int,
    config: dict,
    placements: list[np.ndarray],
    device: str = "cpu",
    shares: bool = False,
) -> list:
    """Per placement: (each MoE layer's output, the whole model's output) for this rank's tokens.
    ``shares``: the replicas share their experts' tokens by shares fitted to skewed loads."""
    model_config = ModelConfig.model_validate(config)
    source = SyntheticSource(model_config)
    target = rank_device(rank, device)
    hidden = ep_inputs(model_config, world).to(source.dtype)
    mine = hidden[rank * TOKENS_PER_RANK : (rank + 1) * TOKENS_PER_RANK].to(target)
    offset = rank * TOKENS_PER_RANK
    results = []
    for phy2log in placements:
        placement = Placement.from_phy2log(phy2log, model_config.num_experts)
        if shares:
            shape = (phy2log.shape[0], model_config.num_experts)
            loads = np.random.default_rng(11).lognormal(0.0, 1.5, size=shape)
            placement = fit_shares(loads, placement, world)
        model = build_model(source, placement, EPGroup(rank=rank, size=world, device=target))
        per_layer = [layer(mine, offset).float().cpu() for layer in model.layers]
        results.append((per_layer, model(mine, offset).float().cpu()))
    return results


def check_ep_outputs(world: int, config: dict, placements: list[np.ndarray], by_rank: list) -> None:
    model_config = ModelConfig.model_validate(config)
    source = SyntheticSource(model_config)
    hidden = ep_inputs(model_config, world).to(source.dtype)
    if source.dtype == torch.float32:
        rtol, atol = 1e-5, 1e-6
    else:
        # bf16 keeps 8 significant bits (relative step 2^-8 ~ 0.4%); an output is a sum of
        # top-k expert outputs each rounded once to bf16, so allow a few steps.
        rtol, atol = 3e-2, 3e-2
    for index in range(len(placements)):
        for layer in range(model_config.num_layers):
            got = torch.from_numpy(
                np.concatenate([by_rank[r][index][0][layer] for r in range(world)])
            )
            want = dense_reference(source, layer, hidden).to(source.dtype).float()
            torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=f"layer {layer}")
        got = torch.from_numpy(np.concatenate([by_rank[r][index][1] for r in range(world)]))
        want = DenseReference(source)(hidden).float()
        torch.testing.assert_close(got, want, rtol=rtol * 10, atol=atol * 10, msg="model")


REBALANCE_CONFIG = {
    "numExperts": 12,
    "numLayers": 2,
    "hiddenSize": 16,
    "intermediateSize": 8,
    "topK": 2,
}
REBALANCE_PHYSICAL = 16


def rebalance_targets(world: int, seed: int) -> list[tuple[str, Placement]]:
    """A sequence of placements: random, policy outputs on random loads, and a no-op."""
    rng = np.random.default_rng(seed)
    layers, experts = REBALANCE_CONFIG["numLayers"], REBALANCE_CONFIG["numExperts"]
    out: list[tuple[str, Placement]] = []
    previous = default_placement(layers, experts, REBALANCE_PHYSICAL)
    for kind in ("random", "balanced", "incremental", "same", "random", "deepseek", "incremental"):
        if kind == "random":
            extra = REBALANCE_PHYSICAL - experts
            maps = [
                rng.permutation(
                    np.concatenate([np.arange(experts), rng.integers(0, experts, extra)])
                )
                for _ in range(layers)
            ]
            new = Placement.from_phy2log(np.stack(maps), experts)
        elif kind == "same":
            new = previous
        else:
            load = rng.lognormal(0, 1.0, size=(layers, experts)) * 1000
            new = compute_placement(
                kind, load, num_physical=REBALANCE_PHYSICAL, num_gpus=world, previous=previous
            )
        out.append((kind, new))
        previous = new
    return out


def rank_device(rank: int, device: str) -> torch.device:
    return torch.device(device, rank) if device == "cuda" else torch.device(device)


def rank_model(
    source: SyntheticSource, rank: int, world: int, device: str = "cpu"
) -> tuple[MoEModel, EPLBState, Placement, torch.device]:
    """This rank's part of the rebalance-test model on the default placement, with EPLB state."""
    config = source.config
    target = rank_device(rank, device)
    initial = default_placement(config.num_layers, config.num_experts, REBALANCE_PHYSICAL)
    model = build_model(source, initial, EPGroup(rank=rank, size=world, device=target))
    return model, attach_state(model, initial, target), initial, target


def attach_state(model: MoEModel, placement: Placement, device: torch.device) -> EPLBState:
    state = EPLBState(placement, window_size=4, device=device)
    for index, layer in enumerate(model.moe_layers):
        layer.eplb_state = EPLBLayerState()
        layer.eplb_state.set_layer_state(index, state)
    return state


def make_test_communicator(name: str, rank: int, world: int, device: torch.device, store_port: int):  # type: ignore[no-untyped-def]
    """A communicator as the engine would build it: gloo on its own groups (``torch_gloo:3``:
    three lanes), pynccl via a store (``pynccl:2``: two striped communicators)."""
    import torch.distributed as dist

    base, _, count = name.partition(":")
    ways = int(count or 1)
    if base == "pynccl":
        store = dist.TCPStore("127.0.0.1", store_port, world, rank == 0)
        return create_communicator(
            base, rank=rank, world=world, store=store, device=device, stripes=ways
        )
    if base == "torch_gloo" and world > 1:
        groups = [dist.new_group(backend="gloo") for _ in range(ways)]
        return create_communicator(base, groups=groups, device=device, chunk_bytes=4096)
    return create_communicator(base, device=device)


def fingerprint_run(
    rank: int,
    world: int,
    seed: int,
    device: str = "cpu",
    communicator: str = "torch_gloo",
    store_port: int = 0,
) -> list:
    """Apply the target sequence; list every slot whose weights are not exactly its expert's."""
    config = ModelConfig.model_validate(REBALANCE_CONFIG)
    source = FingerprintSource(config)
    model, state, initial, target = rank_model(source, rank, world, device)
    comm = make_test_communicator(communicator, rank, world, target, store_port)
    slots = REBALANCE_PHYSICAL // world
    wrong = []
    for step, (kind, new) in enumerate(rebalance_targets(world, seed)):
        apply_placement(state, model.moe_layers, new, rank, world, comm)
        assert np.array_equal(state.placement().phy2log, new.phy2log)
        for layer_index, layer in enumerate(model.moe_layers):
            for slot in range(slots):
                expert = int(new.phy2log[layer_index, rank * slots + slot])
                want = source.expert(layer_index, expert)
                for name in EXPERT_TENSORS:
                    weights = layer.slots[name][slot].cpu()
                    if not torch.equal(weights, want[name]):
                        wrong.append(
                            (kind, step, layer_index, slot, FingerprintSource.decode(weights))
                        )
    return wrong


def outputs_after_rebalances(rank: int, world: int, seed: int, device: str = "cpu") -> list:
    config = ModelConfig.model_validate(REBALANCE_CONFIG)
    source = SyntheticSource(config)
    model, state, initial, target = rank_model(source, rank, world, device)
    comm = create_communicator("auto", device=target)
    hidden = torch.randn(
        (8 * world, config.hidden_size), generator=torch.Generator().manual_seed(3)
    )
    mine = hidden[rank * 8 : (rank + 1) * 8].to(target)
    outputs = []
    for _, new in rebalance_targets(world, seed):
        apply_placement(state, model.moe_layers, new, rank, world, comm)
        outputs.append([layer(mine, rank * 8).cpu() for layer in model.layers])
    return outputs


def check_outputs_after_rebalances(world: int, seed: int, by_rank: list) -> None:
    config = ModelConfig.model_validate(REBALANCE_CONFIG)
    source = SyntheticSource(config)
    hidden = torch.randn(
        (8 * world, config.hidden_size), generator=torch.Generator().manual_seed(3)
    )
    for index in range(len(rebalance_targets(world, seed))):
        for layer in range(config.num_layers):
            got = torch.from_numpy(np.concatenate([by_rank[r][index][layer] for r in range(world)]))
            torch.testing.assert_close(
                got, dense_reference(source, layer, hidden), rtol=1e-5, atol=1e-6
            )

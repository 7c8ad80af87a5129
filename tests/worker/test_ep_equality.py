"""EP output equality: any valid placement and EP size gives the dense single-process result."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distributed import run_ranks
from moe_worker.config import ModelConfig
from moe_worker.eplb.policy import Placement
from moe_worker.model.experts import SyntheticSource
from moe_worker.model.moe import EPGroup, build_model, dense_reference, rms_norm

TOKENS_PER_RANK = 24
NUM_PHYSICAL = 20  # 16 experts + 4 redundant: divisible by EP sizes 1, 2 and 4

CONFIGS = {
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


def ep_outputs(rank: int, world: int, config: dict, placements: list[np.ndarray]) -> list:
    model_config = ModelConfig.model_validate(config)
    source = SyntheticSource(model_config)
    dtype = source.dtype
    hidden = torch.randn(
        (TOKENS_PER_RANK * world, model_config.hidden_size),
        generator=torch.Generator().manual_seed(7),
    ).to(dtype)
    mine = hidden[rank * TOKENS_PER_RANK : (rank + 1) * TOKENS_PER_RANK]
    offset = rank * TOKENS_PER_RANK
    results = []
    for phy2log in placements:
        placement = Placement.from_phy2log(phy2log, model_config.num_experts)
        model = build_model(source, placement, EPGroup(rank=rank, size=world))
        per_layer = [layer(mine, offset).float() for layer in model.layers]
        results.append((per_layer, model(mine, offset).float()))
    return results


def dense_model(source: SyntheticSource, hidden: torch.Tensor) -> torch.Tensor:
    for layer in range(source.config.num_layers):
        normed = rms_norm(hidden, source.config.rms_norm_eps)
        hidden = hidden + dense_reference(source, layer, normed).to(hidden.dtype)
    return hidden


@pytest.mark.parametrize("world", [1, 2, 4])
def test_outputs_equal_dense_reference(world: int) -> None:
    for name, config in CONFIGS.items():
        model_config = ModelConfig.model_validate(config)
        placements = random_placements(
            3, model_config.num_layers, model_config.num_experts, seed=world
        )
        by_rank = run_ranks(ep_outputs, world, config, placements)
        source = SyntheticSource(model_config)
        hidden = torch.randn(
            (TOKENS_PER_RANK * world, model_config.hidden_size),
            generator=torch.Generator().manual_seed(7),
        ).to(source.dtype)
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
                torch.testing.assert_close(
                    got, want, rtol=rtol, atol=atol, msg=f"{name} layer {layer}"
                )
            got = torch.from_numpy(np.concatenate([by_rank[r][index][1] for r in range(world)]))
            want = dense_model(source, hidden).float()
            torch.testing.assert_close(
                got, want, rtol=rtol * 10, atol=atol * 10, msg=f"{name} model"
            )

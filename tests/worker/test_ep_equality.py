"""EP output equality: any valid placement and EP size gives the dense single-process result."""

from __future__ import annotations

import pytest

from distributed import run_ranks
from ep_cases import EP_CONFIGS, check_ep_outputs, ep_outputs, random_placements
from moe_worker.config import ModelConfig


@pytest.mark.parametrize("world", [1, 2, 4])
def test_outputs_equal_dense_reference(world: int) -> None:
    for config in EP_CONFIGS.values():
        model_config = ModelConfig.model_validate(config)
        placements = random_placements(3, model_config.num_layers, model_config.num_experts, world)
        by_rank = run_ranks(ep_outputs, world, config, placements)
        check_ep_outputs(world, config, placements, by_rank)

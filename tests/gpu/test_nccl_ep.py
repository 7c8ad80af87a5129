"""The EP and rebalance tests with NCCL on GPUs (skipped without two CUDA GPUs)."""

from __future__ import annotations

import pytest
import torch

from distributed import free_port, run_ranks
from ep_cases import (
    EP_CONFIGS,
    check_ep_outputs,
    check_outputs_after_rebalances,
    ep_outputs,
    fingerprint_run,
    outputs_after_rebalances,
    random_placements,
)
from moe_worker.config import ModelConfig

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.device_count() < 2,
        reason="needs 2 CUDA GPUs",
    ),
]


def test_ep_outputs_equal_reference_over_nccl() -> None:
    for config in EP_CONFIGS.values():
        model_config = ModelConfig.model_validate(config)
        placements = random_placements(3, model_config.num_layers, model_config.num_experts, 2)
        by_rank = run_ranks(ep_outputs, 2, config, placements, "cuda", backend="nccl")
        check_ep_outputs(2, config, placements, by_rank)


GPU_BACKENDS = ["torch_nccl", "pynccl", "pynccl:2", "torch_gloo", "torch_gloo:3"]


@pytest.mark.parametrize("communicator", GPU_BACKENDS)
def test_executor_suite_on_every_gpu_backend(communicator: str) -> None:
    """Fingerprinted weights, random plans, duplicates, unchanged slots, empty plans."""
    args = (11, "cuda", communicator, free_port())
    for rank_wrong in run_ranks(fingerprint_run, 2, *args, backend="nccl"):
        assert rank_wrong == []


def test_outputs_after_rebalances_over_nccl() -> None:
    by_rank = run_ranks(outputs_after_rebalances, 2, 5, "cuda", backend="nccl")
    check_outputs_after_rebalances(2, 5, by_rank)

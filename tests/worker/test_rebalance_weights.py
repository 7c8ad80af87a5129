"""Synchronous rebalances move real weights: every slot ends up holding exactly its expert."""

from __future__ import annotations

import pytest

from distributed import run_ranks
from ep_cases import check_outputs_after_rebalances, fingerprint_run, outputs_after_rebalances


@pytest.mark.parametrize(
    ("world", "communicator"), [(2, "torch_gloo"), (4, "torch_gloo"), (2, "torch_gloo:3")]
)
def test_every_slot_holds_its_expert_after_each_rebalance(world: int, communicator: str) -> None:
    """The executor suite on gloo: fingerprinted weights, random plans, duplicate replicas,
    unchanged slots and empty plans; ``torch_gloo:3`` cuts tensors into chunks over 3 lanes."""
    for rank_wrong in run_ranks(fingerprint_run, world, 11, "cpu", communicator):
        assert rank_wrong == []


def test_outputs_match_reference_after_rebalances() -> None:
    check_outputs_after_rebalances(2, 5, run_ranks(outputs_after_rebalances, 2, 5))


def test_unknown_communicator_lists_the_available_ones() -> None:
    from moe_worker.eplb.communicator import (
        UnknownCommunicatorError,
        create_communicator,
        resolve_auto,
    )

    with pytest.raises(UnknownCommunicatorError, match="available: pynccl, torch_gloo, torch_nccl"):
        create_communicator("mpi")
    assert resolve_auto("cpu", use_async=True) == "torch_gloo"
    assert resolve_auto("cuda", use_async=False) == "torch_nccl"
    assert resolve_auto("cuda", use_async=True) == "pynccl"


def test_pynccl_dtype_table() -> None:
    import torch

    from moe_worker.eplb.communicator.pynccl import NCCL_DTYPES

    assert NCCL_DTYPES[torch.bfloat16] == 9 and NCCL_DTYPES[torch.float32] == 7

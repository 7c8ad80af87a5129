"""Synchronous rebalances move real weights: every slot ends up holding exactly its expert."""

from __future__ import annotations

import pytest

from distributed import run_ranks
from ep_cases import check_outputs_after_rebalances, fingerprint_run, outputs_after_rebalances


@pytest.mark.parametrize("world", [2, 4])
def test_every_slot_holds_its_expert_after_each_rebalance(world: int) -> None:
    for rank_wrong in run_ranks(fingerprint_run, world, 11):
        assert rank_wrong == []


def test_outputs_match_reference_after_rebalances() -> None:
    check_outputs_after_rebalances(2, 5, run_ranks(outputs_after_rebalances, 2, 5))

"""Transfer planning (pure): executing a plan yields the new placement, with minimal traffic."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_worker.eplb.planner import Duplicate, Transfer, apply_plan_to_contents, plan_layer


@st.composite
def layer_pair(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, int]:
    experts = draw(st.integers(1, 10))
    slots = draw(st.integers(1, 4))
    old_ranks = draw(st.integers(1, 5))
    new_ranks = draw(st.integers(1, 5))

    def placement(ranks: int) -> np.ndarray | None:
        total = ranks * slots
        if total < experts:
            return None
        extra = draw(
            st.lists(
                st.integers(0, experts - 1), min_size=total - experts, max_size=total - experts
            )
        )
        return np.asarray(draw(st.permutations(list(range(experts)) + extra)))

    old, new = placement(old_ranks), placement(new_ranks)
    if old is None or new is None:
        old = np.arange(experts)
        new = np.arange(experts)[::-1].copy()
        slots = 1
    return old, new, slots


@settings(max_examples=300, deadline=None)
@given(layer_pair())
def test_plan_realises_new_placement(case: tuple[np.ndarray, np.ndarray, int]) -> None:
    old, new, slots = case
    plan = plan_layer(old, new, slots)
    new_ranks = len(new) // slots
    assert np.array_equal(apply_plan_to_contents(old, plan, slots, new_ranks), new)
    old_grid = old.reshape(-1, slots)
    remote_pairs = [(t.dst_rank, t.expert) for t in plan.remote]
    assert len(remote_pairs) == len(set(remote_pairs)), "a rank receives each expert once"
    for t in plan.transfers:
        assert old_grid[t.src_rank, t.src_slot] == t.expert
        if t.src_rank != t.dst_rank:
            assert t.dst_rank >= len(old_grid) or t.expert not in old_grid[t.dst_rank]
        # Unchanged slots are never written.
        assert (
            t.dst_rank >= len(old_grid)
            or old_grid[t.dst_rank, t.dst_slot] != new[t.dst_rank * slots + t.dst_slot]
        )


def test_identical_placement_gives_empty_plan() -> None:
    old = np.array([0, 1, 2, 0])
    assert plan_layer(old, old, 2).is_empty()


def test_local_copy_and_duplicate() -> None:
    # Rank 0 had experts 0,1 and now holds 1,1: slot 1 keeps 1, slot 0 duplicates it locally.
    plan = plan_layer(np.array([0, 1, 2, 0]), np.array([1, 1, 2, 0]), 2)
    assert plan.transfers == [] and plan.duplicates == [Duplicate(0, 1, 0)]
    # Rank 0 had 0,1 and now holds 2,0: expert 0 moves locally from slot 0 to slot 1.
    plan = plan_layer(np.array([0, 1, 2, 3]), np.array([2, 0, 1, 3]), 2)
    assert Transfer(0, 0, 0, 0, 1) in plan.transfers
    # Rank 0 needs expert 2 twice: one remote receive, one local duplicate.
    plan = plan_layer(np.array([0, 1, 2, 0]), np.array([2, 2, 1, 0]), 2)
    assert [(t.expert, t.src_rank, t.dst_rank) for t in plan.remote] == [(2, 1, 0), (1, 0, 1)]
    assert len(plan.duplicates) == 1

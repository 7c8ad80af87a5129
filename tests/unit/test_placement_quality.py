"""Balancedness, its bound, replica counts, moved copies, the Placement type, input rules."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_worker.eplb.policy import (
    Placement,
    PlacementInputError,
    UnknownPolicyError,
    balancedness,
    compute_placement,
    default_placement,
    get_policy,
    gpu_loads,
    layer_balancedness,
    max_load_lower_bound,
    moved_copies,
)
from moe_worker.eplb.policy.quality import optimal_replica_counts


def test_gpu_loads_and_balancedness_by_hand() -> None:
    # Expert 0 has two replicas (slots 0 and 2); GPU 0 = slots 0,1; GPU 1 = slots 2,3.
    placement = Placement.from_phy2log(np.array([[0, 1, 0, 2]]), 3)
    weight = np.array([[100.0, 30.0, 10.0]])
    assert gpu_loads(weight, placement, 2).tolist() == [[80.0, 60.0]]
    assert layer_balancedness(weight, placement, 2).tolist() == [70.0 / 80.0]
    assert balancedness(weight, placement, 2) == pytest.approx(70.0 / 80.0)


def test_lower_bound_by_hand() -> None:
    # 3 slots on 3 GPUs, experts 90 and 10: best counts (2, 1) -> max per replica 45 > 100/3.
    assert max_load_lower_bound(np.array([[90.0, 10.0]]), 3, 3).tolist() == [45.0]
    # Uniform load: the bound is total / G.
    assert max_load_lower_bound(np.array([[10.0] * 4]), 8, 2).tolist() == [20.0]


def greedy_reference(weight: np.ndarray, num_physical: int, cap: int) -> np.ndarray:
    counts = np.ones_like(weight, dtype=np.int64)
    for _ in range(num_physical - weight.size):
        per = np.where(counts >= cap, -np.inf, weight / counts)
        counts[np.argmax(per)] += 1
    return counts


@settings(max_examples=200, deadline=None)
@given(
    weight=st.lists(st.integers(0, 10_000), min_size=1, max_size=20),
    extra=st.integers(0, 30),
    cap=st.integers(1, 12),
)
def test_optimal_replica_counts_match_greedy(weight: list[int], extra: int, cap: int) -> None:
    w = np.asarray(weight, dtype=np.float64)
    num_physical = w.size + extra
    counts = optimal_replica_counts(w[None, :], num_physical, max_per_expert=cap)[0]
    effective_cap = cap if cap * w.size >= num_physical else num_physical
    reference = greedy_reference(w, num_physical, effective_cap)
    assert counts.sum() == num_physical
    assert (counts >= 1).all() and (counts <= effective_cap).all()
    assert (w / counts).max() == pytest.approx((w / reference).max())


def test_moved_copies_counts_new_gpu_expert_pairs() -> None:
    old = Placement.from_phy2log(np.array([[0, 1, 2, 3]]), 4)
    same = Placement.from_phy2log(np.array([[1, 0, 3, 2]]), 4)  # swapped within GPUs only
    across = Placement.from_phy2log(np.array([[0, 2, 1, 3]]), 4)
    assert moved_copies(old, same, 2, 2).tolist() == [0]
    assert moved_copies(old, across, 2, 2).tolist() == [2]
    grown = Placement.from_phy2log(np.array([[0, 1, 2, 3, 0, 1]]), 4)
    assert moved_copies(old, grown, 2, 3).tolist() == [2]


def test_placement_json_round_trip_and_errors() -> None:
    placement = compute_placement(
        "balanced", np.arange(1, 13).reshape(2, 6), num_physical=8, num_gpus=4
    )
    again = Placement.from_json(placement.to_json())
    assert np.array_equal(again.phy2log, placement.phy2log)
    assert np.array_equal(again.log2phy, placement.log2phy)
    bad = placement.to_json()
    bad["replica_count"][0][0] += 1
    with pytest.raises(ValueError, match="disagrees"):
        Placement.from_json(bad)
    with pytest.raises(ValueError, match="phy2log"):
        Placement.from_json({"log2phy": []})


def test_default_placement_is_round_robin() -> None:
    assert default_placement(1, 3, 6).phy2log.tolist() == [[0, 1, 2, 0, 1, 2]]


@pytest.mark.parametrize(
    ("kwargs", "field", "rule"),
    [
        ({"weight": [1, 2, 3]}, "weight", "2-D"),
        ({"weight": [[1, -2, 3]]}, "weight", "non-negative"),
        ({"weight": [[1, float("nan"), 3]]}, "weight", "finite"),
        ({"weight": [["a", "b"]]}, "weight", "numeric"),
        ({"num_physical": 2}, "num_physical", ">= the number of experts"),
        ({"num_physical": 7}, "num_physical", "divisible by num_gpus"),
        ({"num_gpus": 0}, "num_gpus", "positive integer"),
        ({"num_groups": 3}, "num_groups", "divide the number of experts"),
        ({"num_nodes": 3}, "num_nodes", "divide num_gpus"),
    ],
)
def test_input_rules_name_field(kwargs: dict, field: str, rule: str) -> None:
    args = {"weight": [[1.0, 2.0, 3.0, 4.0]], "num_physical": 8, "num_gpus": 4} | kwargs
    with pytest.raises(PlacementInputError) as info:
        compute_placement("balanced", **args)
    assert info.value.field == field
    assert rule in str(info.value)


def test_previous_of_another_shape_is_rejected() -> None:
    previous = Placement.from_phy2log(np.array([[0, 1, 2, 0]]), 3)
    with pytest.raises(PlacementInputError) as info:
        compute_placement(
            "incremental", [[1.0, 2.0, 3.0, 4.0]], num_physical=8, num_gpus=4, previous=previous
        )
    assert info.value.field == "previous"


def test_unknown_policy_lists_available() -> None:
    with pytest.raises(UnknownPolicyError) as info:
        get_policy("magic")
    assert "available: balanced, deepseek, incremental" in str(info.value)

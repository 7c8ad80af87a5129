"""The exact two-slot bound: pairing and the integer program against brute force, and no
placement beats it (issue 20: the bound for decode-scale EP)."""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_worker.eplb.policy import compute_placement, gpu_loads
from moe_worker.eplb.policy.pair_bound import (
    least_pair_peak,
    pair_balancedness_bound,
    pairing_peak,
    replica_sizes,
)


def all_pairings_peak(sizes: list[float]) -> float:
    """The least largest pair over every way to pair the items (brute force)."""
    if not sizes:
        return 0.0
    first, rest = sizes[0], sizes[1:]
    best = np.inf
    for index, partner in enumerate(rest):
        others = rest[:index] + rest[index + 1 :]
        best = min(best, max(first + partner, all_pairings_peak(others)))
    return float(best)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 50), min_size=2, max_size=8).filter(lambda v: len(v) % 2 == 0))
def test_extreme_pairing_is_the_best_pairing(values: list[int]) -> None:
    sizes = [float(v) for v in values]
    assert pairing_peak(np.array(sizes)) == all_pairings_peak(sizes)


def brute_force_peak(weight: np.ndarray, num_gpus: int) -> float:
    """Every replica-count vector (each >= 1 and <= G, summing to 2G), paired at its best."""
    num_logical = weight.size
    best = np.inf
    for counts in itertools.product(range(1, num_gpus + 1), repeat=num_logical):
        if sum(counts) == 2 * num_gpus:
            sizes = replica_sizes(weight, np.array(counts))
            best = min(best, pairing_peak(sizes))
    return float(best)


@settings(max_examples=40, deadline=None)
@given(
    num_gpus=st.integers(2, 4),
    data=st.data(),
)
def test_the_integer_program_finds_the_brute_force_optimum(
    num_gpus: int, data: st.DataObject
) -> None:
    num_logical = data.draw(st.integers(2, min(5, 2 * num_gpus)))
    weight = np.array(
        data.draw(st.lists(st.integers(1, 100), min_size=num_logical, max_size=num_logical)),
        dtype=np.float64,
    )
    low, high = least_pair_peak(weight, 2 * num_gpus, num_gpus)
    exact = brute_force_peak(weight, num_gpus)
    assert low <= exact * (1 + 1e-9) and exact <= high * (1 + 1e-9)


def test_a_light_expert_may_need_a_replica_on_every_gpu() -> None:
    """Found by hypothesis: loads [1, 4, 4] on 4 GPUs x 2 slots are best as counts (4, 2, 2),
    the light expert's quarters partnering the heavy ones' halves (peak 2.25); a program that
    caps a light expert's count near its own size misses it (it said 2.33)."""
    weight = np.array([1.0, 4.0, 4.0])
    assert brute_force_peak(weight, 4) == 2.25
    low, high = least_pair_peak(weight, 8, 4)
    assert low <= 2.25 <= high * (1 + 1e-9) and high - low <= 1e-3


def test_no_placement_beats_the_bound() -> None:
    rng = np.random.default_rng(7)
    weight = rng.lognormal(0.0, 0.8, size=(3, 48)) * 1000
    num_gpus = 32  # 64 slots: 16 redundant
    bound = pair_balancedness_bound(weight, 2 * num_gpus, num_gpus)
    for policy in ("balanced", "deepseek"):
        placement = compute_placement(policy, weight, num_physical=64, num_gpus=num_gpus)
        loads = gpu_loads(weight, placement, num_gpus)
        achieved = loads.mean(axis=1) / loads.max(axis=1)
        assert (achieved <= bound + 1e-9).all(), (policy, achieved, bound)

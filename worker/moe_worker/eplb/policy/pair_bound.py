"""The exact balancedness bound when every GPU holds two slots (decode-scale EP).

``balancedness_bound`` ignores how replicas share GPUs; with two slots per GPU the pairing
decides everything. For a fixed multiset of replica sizes, pairing the largest with the smallest
(and so on inwards) minimises the largest pair, and a pairing with every pair <= T exists iff
for every replica of size b > T/2 there are at least as many replicas of size <= T - b as of
size >= b (Hall's condition for the big replicas). Which experts get the redundant replicas is
then an integer program: per expert one replica count c (its replicas weigh w / c), counts
summing to P, Hall's condition at every size level above T/2. Bisection on T with that program
(scipy's HiGHS) gives the least achievable largest GPU load per layer, a bound that a placement
can reach (up to the rule that a GPU does not hold two replicas of one expert, which only
lowers what is reachable). Analysis for the benchmarks and tests: needs scipy (the dev extra),
and takes seconds per layer, so no policy calls it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .quality import optimal_replica_counts


def pairing_peak(sizes: np.ndarray) -> float:
    """The least possible largest pair sum of an even multiset ``sizes`` [N]: largest with
    smallest, second largest with second smallest, ..."""
    ordered = np.sort(np.asarray(sizes, dtype=np.float64))
    half = ordered.size // 2
    return float((ordered[:half] + ordered[::-1][:half]).max()) if half else 0.0


def replica_sizes(weight: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Every replica's load: expert e's ``counts[e]`` replicas weigh ``weight[e] / counts[e]``."""
    return np.repeat(np.asarray(weight, dtype=np.float64) / counts, counts)


def _count_options(weight: np.ndarray, peak: float, most: int) -> list[tuple[int, int, float]]:
    """(expert, replica count, replica size) worth considering at largest pair ``peak``: counts
    until the replicas are below peak / 2, and two more (smaller partners)."""
    options = []
    for expert, load in enumerate(weight):
        upto = int(min(most, max(3, np.ceil(2.0 * load / peak) + 2)))
        for count in range(1, upto + 1):
            if load / count <= peak:
                options.append((expert, count, load / count))
    return options


def feasible(weight: np.ndarray, num_physical: int, num_gpus: int, peak: float) -> bool:
    """Whether replica counts (>= 1 each, <= num_gpus, summing to num_physical) exist whose
    replicas pair up two per GPU with every GPU's load <= ``peak``. weight [E]."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix

    num_logical = weight.shape[0]
    options = _count_options(weight, peak, num_gpus)
    experts = np.array([o[0] for o in options], dtype=np.int64)
    if np.unique(experts).size < num_logical:
        return False  # some expert's replicas are too heavy at any count
    counts = np.array([o[1] for o in options], dtype=np.float64)
    sizes = np.array([o[2] for o in options])
    columns = np.arange(len(options))
    choose_one = coo_matrix(
        (np.ones(len(options)), (experts, columns)), shape=(num_logical, len(options))
    )
    constraints: list[Any] = [
        LinearConstraint(choose_one.tocsr(), 1, 1),
        LinearConstraint(counts[None, :], num_physical, num_physical),
    ]
    levels = np.unique(sizes[sizes > peak / 2])
    if levels.size:
        big = (sizes[None, :] >= levels[:, None]).astype(np.float64)
        partner = (sizes[None, :] <= peak - levels[:, None]).astype(np.float64)
        constraints.append(LinearConstraint((big - partner) * counts[None, :], -np.inf, 0))
    result = milp(
        np.zeros(len(options)),
        constraints=constraints,
        integrality=np.ones(len(options)),
        bounds=Bounds(0, 1),
    )
    return bool(result.status == 0)


def least_pair_peak(
    weight: np.ndarray, num_physical: int, num_gpus: int, tolerance: float = 1e-4
) -> tuple[float, float]:
    """The least achievable largest GPU load of one layer [E] with two slots per GPU, as an
    interval (below: infeasible, above: reached) of relative width ``tolerance``, by bisection
    between the mean GPU load and the peak of the counts that minimise the largest replica."""
    weight = np.asarray(weight, dtype=np.float64)
    if num_physical != 2 * num_gpus:
        raise ValueError("least_pair_peak: only for two slots per GPU")
    low = weight.sum() / num_gpus
    start = optimal_replica_counts(weight[None, :], num_physical, max_per_expert=num_gpus)[0]
    high = pairing_peak(replica_sizes(weight, start))
    if low <= 0 or feasible(weight, num_physical, num_gpus, low):
        return low, low
    while high - low > tolerance * low:
        middle = 0.5 * (low + high)
        if feasible(weight, num_physical, num_gpus, middle):
            high = middle
        else:
            low = middle
    return low, high


def pair_balancedness_bound(weight: np.ndarray, num_physical: int, num_gpus: int) -> np.ndarray:
    """Per layer [L]: mean GPU load / the least achievable largest GPU load with two slots per
    GPU (its lower end: no placement does better)."""
    weight = np.asarray(weight, dtype=np.float64)
    mean = weight.sum(axis=1) / num_gpus
    peaks = np.array([least_pair_peak(row, num_physical, num_gpus)[0] for row in weight])
    return np.where(peaks > 0, mean / np.where(peaks > 0, peaks, 1.0), 1.0)

"""The exact balancedness bound when every GPU holds two slots (decode-scale EP).

``balancedness_bound`` ignores how replicas share GPUs; with two slots per GPU the pairing
decides everything. For a fixed multiset of replica sizes, pairing the largest with the smallest
(and so on inwards) minimises the largest pair, and a pairing with every pair <= T exists iff
for every replica of size b > T/2 there are at least as many replicas of size <= T - b as of
size >= b (Hall's condition for the big replicas). Which experts get the redundant replicas is
then an integer program: per expert one replica count c in 1..G (its replicas weigh w / c),
counts summing to P, Hall's condition at every size level above T/2 (a small expert may need
many replicas: they are the partners of the big ones). Bisection on T with that program
(scipy's HiGHS) gives the least achievable largest GPU load per layer, a bound that a placement
can reach (up to the rule that a GPU does not hold two replicas of one expert, which only
lowers what is reachable). Analysis for the benchmarks and tests: needs scipy (the dev extra),
and takes seconds per layer, so no policy calls it.
"""

from __future__ import annotations

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


def _small_groups(load: float, peak: float, levels: np.ndarray, first: int, most: int):  # type: ignore[no-untyped-def]
    """Counts ``first..most`` of one expert (replicas <= peak / 2), grouped into runs
    ``(lo, hi, k)`` whose replicas partner the same levels: the ``k`` smallest (a replica of
    size s partners level b iff s + b <= peak)."""
    counts = np.arange(first, most + 1)
    if counts.size == 0:
        return []
    ks = np.searchsorted(levels, peak - load / counts, side="right")
    starts = np.flatnonzero(np.r_[True, ks[1:] != ks[:-1]])
    ends = np.r_[starts[1:], counts.size] - 1
    return [(int(counts[a]), int(counts[b]), int(ks[a])) for a, b in zip(starts, ends, strict=True)]


def feasible(
    weight: np.ndarray, num_physical: int, num_gpus: int, peak: float, time_limit: float = 5.0
) -> bool | None:
    """Whether replica counts (>= 1 each, <= num_gpus, summing to num_physical) exist whose
    replicas pair up two per GPU with every GPU's load <= ``peak``. weight [E]. None: HiGHS
    neither found counts nor proved there are none within ``time_limit`` seconds.

    Exact over every count 1..num_gpus. A replica above peak / 2 is "big" and partners none;
    the program picks, per expert, either one big count (a binary) or a run of small counts
    that partner the same levels (a binary and an integer count within the run). Hall's
    condition at level r, #bigs >= level_r <= #replicas <= peak - level_r, is written with
    running sums (B_r, P_r), so every option appears in a constant number of rows."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix

    weight = np.asarray(weight, dtype=np.float64)
    num_logical = weight.shape[0]
    fewest = np.maximum(1, np.ceil(weight / peak - 1e-12)).astype(np.int64)  # replicas <= peak
    if (fewest > num_gpus).any():
        return False
    first_small = np.maximum(fewest, np.ceil(2.0 * weight / peak - 1e-12)).astype(np.int64)
    first_small = np.where(weight / first_small > peak / 2, first_small + 1, first_small)
    bigs = [
        (e, c, weight[e] / c)
        for e in range(num_logical)
        for c in range(int(fewest[e]), int(min(first_small[e], num_gpus + 1)))
    ]
    levels = np.unique([size for _, _, size in bigs])
    num_levels = levels.size
    # Columns: bigs (binary), then per small run a binary and a count, then B_r and P_r.
    groups = [
        (e, lo, hi, k)
        for e in range(num_logical)
        for lo, hi, k in _small_groups(weight[e], peak, levels, int(first_small[e]), num_gpus)
    ]
    nb, ng = len(bigs), len(groups)
    col_y = (nb + np.arange(ng)).tolist()
    col_n = (nb + ng + np.arange(ng)).tolist()
    col_b = (nb + 2 * ng + np.arange(num_levels)).tolist()
    col_p = (nb + 2 * ng + num_levels + np.arange(num_levels)).tolist()
    num_columns = nb + 2 * ng + 2 * num_levels
    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    lower: list[float] = []
    upper: list[float] = []

    def row(entries: list[tuple[int, float]], lo: float, hi: float) -> None:
        index = len(lower)
        for column, value in entries:
            rows.append(index)
            cols.append(int(column))
            vals.append(value)
        lower.append(lo)
        upper.append(hi)

    big_expert = np.array([b[0] for b in bigs], dtype=np.int64)
    group_expert = np.array([g[0] for g in groups], dtype=np.int64)
    group_k = np.array([g[3] for g in groups], dtype=np.int64)
    for e in range(num_logical):  # one choice per expert
        row(
            [(i, 1.0) for i in np.flatnonzero(big_expert == e).tolist()]
            + [(col_y[j], 1.0) for j in np.flatnonzero(group_expert == e).tolist()],
            1.0,
            1.0,
        )
    row(  # every slot holds a replica
        [(i, float(c)) for i, (_, c, _) in enumerate(bigs)] + [(c, 1.0) for c in col_n],
        num_physical,
        num_physical,
    )
    for j, (_, lo, hi, _) in enumerate(groups):  # a run's count lies in it, or is 0
        row([(col_n[j], 1.0), (col_y[j], -float(lo))], 0.0, np.inf)
        row([(col_n[j], 1.0), (col_y[j], -float(hi))], -np.inf, 0.0)
    level_of = np.searchsorted(levels, [size for _, _, size in bigs])
    for r in range(num_levels):
        # B_r = B_{r+1} + the big replicas at level r
        entries = [(col_b[r], 1.0)] + ([(col_b[r + 1], -1.0)] if r + 1 < num_levels else [])
        entries += [(i, -float(bigs[i][1])) for i in np.flatnonzero(level_of == r).tolist()]
        row(entries, 0.0, 0.0)
        # P_r = P_{r+1} + the small replicas that partner levels 0..r but not r+1
        entries = [(col_p[r], 1.0)] + ([(col_p[r + 1], -1.0)] if r + 1 < num_levels else [])
        entries += [(col_n[j], -1.0) for j in np.flatnonzero(group_k == r + 1).tolist()]
        row(entries, 0.0, 0.0)
        row([(col_b[r], 1.0), (col_p[r], -1.0)], -np.inf, 0.0)  # Hall at level r
    matrix = coo_matrix((vals, (rows, cols)), shape=(len(lower), num_columns)).tocsr()
    integrality = np.ones(num_columns)
    integrality[nb + 2 * ng :] = 0
    high = np.r_[np.ones(nb + ng), [g[2] for g in groups], np.full(2 * num_levels, np.inf)]
    result = milp(
        np.zeros(num_columns),
        constraints=[LinearConstraint(matrix, lower, upper)],
        integrality=integrality,
        bounds=Bounds(np.zeros(num_columns), high),
        options={"time_limit": time_limit},
    )
    if result.x is not None:
        return True
    return False if result.status == 2 else None


def least_pair_peak(
    weight: np.ndarray, num_physical: int, num_gpus: int, tolerance: float = 1e-4
) -> tuple[float, float]:
    """The least achievable largest GPU load of one layer [E] with two slots per GPU, as an
    interval of relative width ``tolerance``, by bisection between the mean GPU load and the
    peak of the counts that minimise the largest replica. Below the interval is proven
    infeasible; its top is reached, unless a solve ran out of time (then only the bottom, the
    bound, is certain: an undecided level counts as reachable)."""
    weight = np.asarray(weight, dtype=np.float64)
    if num_physical != 2 * num_gpus:
        raise ValueError("least_pair_peak: only for two slots per GPU")
    low = weight.sum() / num_gpus
    start = optimal_replica_counts(weight[None, :], num_physical, max_per_expert=num_gpus)[0]
    high = pairing_peak(replica_sizes(weight, start))
    if low <= 0 or feasible(weight, num_physical, num_gpus, low) is not False:
        return low, low
    while high - low > tolerance * low:
        middle = 0.5 * (low + high)
        if feasible(weight, num_physical, num_gpus, middle) is False:
            low = middle
        else:
            high = middle
    return low, high


def pair_balancedness_bound(weight: np.ndarray, num_physical: int, num_gpus: int) -> np.ndarray:
    """Per layer [L]: mean GPU load / the least achievable largest GPU load with two slots per
    GPU (its lower end: no placement does better)."""
    weight = np.asarray(weight, dtype=np.float64)
    mean = weight.sum(axis=1) / num_gpus
    peaks = np.array([least_pair_peak(row, num_physical, num_gpus)[0] for row in weight])
    return np.where(peaks > 0, mean / np.where(peaks > 0, peaks, 1.0), 1.0)

"""How good a placement is: per-GPU load, balancedness, its lower bound, moved copies.

Shapes: ``weight`` [L, E] logical expert load; ``phy2log`` [L, P]; G GPUs, S = P / G.
A replica carries its share of its expert's load (``Placement.slot_share``: equal unless the
placement says otherwise).
"""

from __future__ import annotations

import numpy as np

from .placement import Placement, _count_per_row


def slot_loads(weight: np.ndarray, placement: Placement) -> np.ndarray:
    """Load carried by each physical slot: [L, P] float64."""
    weight = np.asarray(weight, dtype=np.float64)
    return np.take_along_axis(weight, placement.phy2log, axis=1) * placement.slot_share()


def gpu_loads(weight: np.ndarray, placement: Placement, num_gpus: int) -> np.ndarray:
    """Load on each GPU: [L, G] float64."""
    loads = slot_loads(weight, placement)
    num_layers, num_physical = loads.shape
    return loads.reshape(num_layers, num_gpus, num_physical // num_gpus).sum(axis=2)


def _ratio(mean: np.ndarray, peak: np.ndarray) -> np.ndarray:
    """mean / peak, and 1.0 for a layer that carries no load at all."""
    safe_peak = np.where(peak > 0, peak, 1.0)
    return np.where(peak > 0, mean / safe_peak, 1.0)


def layer_balancedness(weight: np.ndarray, placement: Placement, num_gpus: int) -> np.ndarray:
    """Per layer: mean GPU load / max GPU load, in (0, 1]. Shape [L]."""
    loads = gpu_loads(weight, placement, num_gpus)
    return _ratio(loads.mean(axis=1), loads.max(axis=1))


def overall_balancedness(per_layer: np.ndarray) -> float:
    """The overall balancedness of a model from its per-layer values ``b_l`` (mean rank load /
    max rank load of layer ``l``, shape [L]): their harmonic mean, ``L / sum_l (1 / b_l)``.

    A step runs the MoE layers one after another, each waiting for its busiest rank, so its
    time goes with ``sum_l max_l``. Every token passes every layer, so the layers carry equal
    work ``W``, and ``max_l = (W / G) / b_l`` on ``G`` ranks: the share of the step spent on
    balanced work, ``sum_l mean_l / sum_l max_l``, is the harmonic mean. A bad layer pulls it
    down as far as it slows the step (the arithmetic mean would hide it). 1.0 for no layers.
    """
    values = np.asarray(per_layer, dtype=np.float64)
    if values.size == 0:
        return 1.0
    return float(values.size / np.sum(1.0 / np.maximum(values, 1e-12)))


def worst_layer_balancedness(per_layer: np.ndarray) -> float:
    """The lowest per-layer balancedness [L] (1.0 for no layers): the layer to look at."""
    values = np.asarray(per_layer, dtype=np.float64)
    return float(values.min()) if values.size else 1.0


def balancedness(weight: np.ndarray, placement: Placement, num_gpus: int) -> float:
    """Overall balancedness of ``placement`` for ``weight`` (``overall_balancedness``)."""
    return overall_balancedness(layer_balancedness(weight, placement, num_gpus))


def optimal_replica_counts(
    weight: np.ndarray, num_physical: int, max_per_expert: int | None = None
) -> np.ndarray:
    """Replica counts [L, E] (each >= 1, summing to P per layer) minimising max(w / count).

    Greedy: every extra slot goes to the expert whose per-replica load is largest; this is
    optimal for the min-max objective. ``max_per_expert`` caps a count (an expert needs no more
    replicas than there are GPUs) when the cap leaves enough room for all slots.
    """
    weight = np.asarray(weight, dtype=np.float64)
    num_layers, num_logical = weight.shape
    if max_per_expert is None or max_per_expert * num_logical < num_physical:
        max_per_expert = num_physical
    # Bisect the peak load-per-replica t between a lower bound (total / P) and the peak of a
    # feasible allocation (proportional shares rounded down); ceil(w / t) at a feasible t is
    # never above the greedy optimum, so the greedy finish below only adds the last few slots.
    total = weight.sum(axis=1, keepdims=True)
    share = np.floor(weight * (num_physical - num_logical) / np.where(total > 0, total, 1.0))
    high = (weight / np.clip(share, 1, max_per_expert)).max(axis=1, keepdims=True)
    low = total / num_physical
    for _ in range(12):
        middle = (low + high) / 2
        fits = _counts_at(weight, middle, max_per_expert).sum(axis=1, keepdims=True) <= num_physical
        high = np.where(fits, middle, high)
        low = np.where(fits, low, middle)
    counts = _counts_at(weight, high, max_per_expert)
    rows = np.arange(num_layers)
    missing = num_physical - counts.sum(axis=1)
    while missing.max() > 0:
        open_rows = rows[missing > 0]
        per_replica = weight[open_rows] / counts[open_rows]
        per_replica = np.where(counts[open_rows] >= max_per_expert, -np.inf, per_replica)
        counts[open_rows, np.argmax(per_replica, axis=1)] += 1
        missing[open_rows] -= 1
    return counts


def _counts_at(weight: np.ndarray, peak: np.ndarray, max_per_expert: int) -> np.ndarray:
    """Fewest replicas keeping every load-per-replica at or below ``peak`` [X, 1], capped."""
    needed = np.ceil(weight / np.where(peak > 0, peak, 1.0))
    return np.clip(needed, 1, max_per_expert).astype(np.int64)


def max_load_lower_bound(weight: np.ndarray, num_physical: int, num_gpus: int) -> np.ndarray:
    """Lower bound [L] on the max GPU load of any placement with P slots on G GPUs.

    max(total / G, the smallest achievable max load-per-replica over integer replica counts).
    """
    weight = np.asarray(weight, dtype=np.float64)
    counts = optimal_replica_counts(weight, num_physical)
    return np.maximum(weight.sum(axis=1) / num_gpus, (weight / counts).max(axis=1))


def balancedness_bound(weight: np.ndarray, num_physical: int, num_gpus: int) -> np.ndarray:
    """Upper bound [L] on per-layer balancedness: mean GPU load / lower bound of the max."""
    weight = np.asarray(weight, dtype=np.float64)
    bound = max_load_lower_bound(weight, num_physical, num_gpus)
    return _ratio(weight.sum(axis=1) / num_gpus, bound)


def gpu_expert_presence(phy2log: np.ndarray, num_gpus: int, num_logical: int) -> np.ndarray:
    """Whether GPU g holds at least one replica of expert e: [L, G, E] bool."""
    num_layers, num_physical = phy2log.shape
    slots_per_gpu = num_physical // num_gpus
    gpu_of_slot = np.arange(num_physical) // slots_per_gpu
    key = gpu_of_slot[None, :] * num_logical + phy2log
    present = _count_per_row(key, num_gpus * num_logical) > 0
    return present.reshape(num_layers, num_gpus, num_logical)


def moved_copies(
    old: Placement, new: Placement, old_num_gpus: int, new_num_gpus: int
) -> np.ndarray:
    """Per layer [L]: (GPU, expert) pairs present in ``new`` but not in ``old``.

    Each such pair is an expert copy that has to be transferred to that GPU. The GPU counts may
    differ (elastic resize); GPUs are identified by index.
    """
    if old.num_layers != new.num_layers:
        raise ValueError(f"layer counts differ: old {old.num_layers}, new {new.num_layers}")
    num_logical = max(old.num_logical, new.num_logical)
    num_gpus = max(old_num_gpus, new_num_gpus)
    old_present = np.zeros((old.num_layers, num_gpus, num_logical), dtype=bool)
    new_present = np.zeros_like(old_present)
    old_present[:, :old_num_gpus, :] = gpu_expert_presence(old.phy2log, old_num_gpus, num_logical)
    new_present[:, :new_num_gpus, :] = gpu_expert_presence(new.phy2log, new_num_gpus, num_logical)
    return (new_present & ~old_present).sum(axis=(1, 2))

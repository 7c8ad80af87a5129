"""The ``balanced`` policy (default): the best balance reachable in a few milliseconds.

1. Replica counts. Global: minimise the largest load per replica (no expert gets more replicas
   than there are GPUs); with two slots per GPU the counts are then tuned for the pairing.
   Node-aware (``num_nodes > 1`` and groups divide evenly over nodes): expert groups are packed
   onto nodes, every expert keeps a replica on its group's node, and each redundant slot of the
   lightest node with room goes to the expert whose extra replica lowers the peak the most.
   (The per-layer loops are compiled by numba; see ``jit``.)
2. Replicas are dealt onto GPUs (per node when node-aware) by balanced largest differencing.
3. Swaps between the heaviest GPU and the lightest ones lower the peak until it is within
   ``tolerance`` of the mean (or of the largest replica) or no swap helps.
No GPU ends up with two replicas of one expert unless slots per GPU exceed the expert count.
"""

from __future__ import annotations

import numpy as np

from .jit import njit, prange, row_kernel
from .packing import (
    differencing_assign,
    expand_replicas,
    gather_slots,
    greedy_pack,
    refine_by_swaps,
    repair_duplicates,
)
from .placement import Placement
from .quality import optimal_replica_counts

DEFAULT_TOLERANCE = 1e-3


@njit
def _pair_peak(weight: np.ndarray, counts: np.ndarray) -> tuple[float, int, int]:
    """Best pairing of one layer's replicas two per GPU (largest with smallest).

    Returns (worst pair load, expert of its larger replica, expert of its smaller replica).
    """
    num_items = int(counts.sum())
    size = np.empty(num_items)
    owner = np.empty(num_items, dtype=np.int64)
    i = 0
    for e in range(weight.shape[0]):
        for _ in range(counts[e]):
            size[i] = weight[e] / counts[e]
            owner[i] = e
            i += 1
    order = np.argsort(-size, kind="mergesort")
    worst, big, small = -1.0, -1, -1
    for k in range(num_items // 2):
        top, bottom = order[k], order[num_items - 1 - k]
        if size[top] + size[bottom] > worst:
            worst, big, small = size[top] + size[bottom], owner[top], owner[bottom]
    return worst, big, small


@njit
def _tune_pairs_layer(
    weight: np.ndarray, counts: np.ndarray, max_per_expert: int, max_rounds: int
) -> None:
    current, big, small = _pair_peak(weight, counts)
    for _ in range(max_rounds):
        improved = False
        for receiver in (big, small):
            if counts[receiver] >= max_per_expert:
                continue
            donor, donor_cost = -1, np.inf
            for e in range(weight.shape[0]):
                if e != receiver and counts[e] >= 2 and weight[e] / (counts[e] - 1) < donor_cost:
                    donor, donor_cost = e, weight[e] / (counts[e] - 1)
            if donor < 0:
                continue
            counts[receiver] += 1
            counts[donor] -= 1
            value, trial_big, trial_small = _pair_peak(weight, counts)
            if value < current * (1.0 - 1e-12):
                current, big, small, improved = value, trial_big, trial_small, True
                break
            counts[receiver] -= 1
            counts[donor] += 1
        if not improved:
            break


@row_kernel("tune_pairs_rows", "void(f8[:,::1], i8[:,::1], i8, i8)")
def _tune_pairs_rows(weight, counts, max_per_expert, max_rounds):  # type: ignore[no-untyped-def]
    for row in prange(weight.shape[0]):
        _tune_pairs_layer(weight[row], counts[row], max_per_expert, max_rounds)


def tune_counts_for_pairs(
    weight: np.ndarray, counts: np.ndarray, max_per_expert: int, max_rounds: int = 256
) -> np.ndarray:
    """Move single replicas between experts while that lowers the worst pair (two slots per GPU).

    The receiving expert is one of the two in the worst pair; the donor is the expert whose
    per-replica load stays smallest after giving one up. ``counts`` [X, E] -> tuned copy.
    """
    tuned = np.ascontiguousarray(counts, dtype=np.int64).copy()
    _tune_pairs_rows(
        np.ascontiguousarray(weight, dtype=np.float64), tuned, max_per_expert, max_rounds
    )
    return tuned


def home_nodes(weight: np.ndarray, num_groups: int, num_nodes: int) -> np.ndarray:
    """Node of every expert [L, E]: whole groups packed onto nodes, heaviest group first."""
    num_layers, num_logical = weight.shape
    group_size = num_logical // num_groups
    group_load = weight.reshape(num_layers, num_groups, group_size).sum(axis=2)
    group_node, _ = greedy_pack(group_load, num_nodes)
    return np.repeat(group_node, group_size, axis=1)


@njit
def _node_aware_layer(
    weight: np.ndarray,
    home_node: np.ndarray,
    num_physical: int,
    num_nodes: int,
    gpus_per_node: int,
    num_candidates: int,
) -> np.ndarray:
    num_logical = weight.shape[0]
    # Only the heaviest experts are candidates for redundant slots (swaps fine-tune the rest).
    candidates = np.argsort(-weight, kind="mergesort")[:num_candidates]
    counts = np.ones(num_logical, dtype=np.int64)
    on_node = np.zeros((num_logical, num_nodes), dtype=np.int64)
    node_load = np.zeros(num_nodes)
    for e in range(num_logical):
        on_node[e, home_node[e]] = 1
        node_load[home_node[e]] += weight[e]
    spare = np.full(num_nodes, (num_physical - num_logical) // num_nodes)
    new_load = np.empty(num_nodes)
    for _ in range(num_physical - num_logical):
        receiver, lightest = -1, np.inf
        for n in range(num_nodes):
            if spare[n] > 0 and node_load[n] < lightest:
                receiver, lightest = n, node_load[n]
        # The two largest loads per replica, to know the largest replica after a split.
        first, second, first_expert = -1.0, -1.0, -1
        for e in candidates:
            per_replica = weight[e] / counts[e]
            if per_replica > first:
                first, second, first_expert = per_replica, first, e
            elif per_replica > second:
                second = per_replica
        best, best_expert, best_per_replica = np.inf, -1, -1.0
        for e in candidates:
            if on_node[e, receiver] >= gpus_per_node:
                continue
            per_replica = weight[e] / counts[e]
            after = weight[e] / (counts[e] + 1)
            shrink = per_replica - after
            peak_node = 0.0
            for n in range(num_nodes):
                new_load[n] = node_load[n] - shrink * on_node[e, n]
                if n == receiver:
                    new_load[n] += after
                peak_node = max(peak_node, new_load[n])
            largest = second if e == first_expert else first
            peak = max(peak_node / gpus_per_node, max(largest, after))
            if peak < best or (peak == best and per_replica > best_per_replica):
                best, best_expert, best_per_replica = peak, e, per_replica
        if best_expert < 0:
            # Every candidate already has a replica on each of the node's GPUs: take the
            # heaviest-per-replica expert of all (only when slots per GPU force duplicates).
            for e in range(num_logical):
                if weight[e] / counts[e] > best_per_replica:
                    best_expert, best_per_replica = e, weight[e] / counts[e]
        e = best_expert
        per_replica = weight[e] / counts[e]
        after = weight[e] / (counts[e] + 1)
        for n in range(num_nodes):
            node_load[n] -= (per_replica - after) * on_node[e, n]
        node_load[receiver] += after
        on_node[e, receiver] += 1
        counts[e] += 1
        spare[receiver] -= 1
    return on_node


@row_kernel("node_aware_rows", "i8[:,:,::1](f8[:,::1], i8[:,::1], i8, i8, i8, i8)")
def _node_aware_rows(weight, home_node, num_physical, num_nodes, gpus_per_node, num_candidates):  # type: ignore[no-untyped-def]
    on_node = np.empty((weight.shape[0], weight.shape[1], num_nodes), dtype=np.int64)
    for row in prange(weight.shape[0]):
        on_node[row] = _node_aware_layer(
            weight[row], home_node[row], num_physical, num_nodes, gpus_per_node, num_candidates
        )
    return on_node


def node_aware_replicas(
    weight: np.ndarray,
    home_node: np.ndarray,
    num_physical: int,
    num_nodes: int,
    num_gpus: int,
    extra_candidates: int = 32,
) -> np.ndarray:
    """Replicas of every expert on every node: [L, E, N] int64.

    Each expert starts with one replica on its home node. Every redundant slot (the same number
    per node) is filled in turn on the lightest node with room, by the expert whose extra
    replica gives the lowest peak: max(heaviest node / GPUs per node, largest replica); ties go
    to the expert with the larger load per replica. No node gets more replicas of an expert
    than it has GPUs. Candidates are the (redundant slots + ``extra_candidates``) heaviest
    experts: the largest loads per replica always lie among them.
    """
    num_logical = weight.shape[1]
    return _node_aware_rows(
        np.ascontiguousarray(weight, dtype=np.float64),
        np.ascontiguousarray(home_node, dtype=np.int64),
        num_physical,
        num_nodes,
        num_gpus // num_nodes,
        min(num_logical, num_physical - num_logical + extra_candidates),
    )


def _deal_global(
    weight: np.ndarray, counts: np.ndarray, num_gpus: int
) -> tuple[np.ndarray, np.ndarray]:
    size, expert = expand_replicas(weight / counts, counts)
    slot_item = differencing_assign(size, num_gpus)
    return gather_slots(size, slot_item), gather_slots(expert, slot_item)


def _deal_per_node(
    weight: np.ndarray, on_node: np.ndarray, num_gpus: int
) -> tuple[np.ndarray, np.ndarray]:
    """Deal each node's replicas onto its GPUs. on_node [L, E, N] -> (size, expert) [L, G, S]."""
    num_layers, num_logical, num_nodes = on_node.shape
    counts = on_node.sum(axis=2)
    per_replica = np.repeat(weight / counts, num_nodes, axis=0)  # rows (layer, node)
    multiplicity = on_node.transpose(0, 2, 1).reshape(num_layers * num_nodes, num_logical)
    size, expert = expand_replicas(per_replica, multiplicity)
    slot_item = differencing_assign(size, num_gpus // num_nodes)
    shape = (num_layers, num_gpus, -1)
    return gather_slots(size, slot_item).reshape(shape), gather_slots(expert, slot_item).reshape(
        shape
    )


def is_node_aware(num_groups: int, num_nodes: int, num_gpus: int) -> bool:
    return num_nodes > 1 and num_groups % num_nodes == 0 and num_gpus % num_nodes == 0


def balanced_policy(
    weight: np.ndarray,
    num_physical: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    previous: Placement | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
) -> Placement:
    """Placement [L, P] with the best balance found; ``previous`` is ignored."""
    weight = np.asarray(weight, dtype=np.float64)
    num_layers, num_logical = weight.shape
    slots_per_gpu = num_physical // num_gpus
    if is_node_aware(num_groups, num_nodes, num_gpus):
        home_node = home_nodes(weight, num_groups, num_nodes)
        on_node = node_aware_replicas(weight, home_node, num_physical, num_nodes, num_gpus)
        counts = on_node.sum(axis=2)
        size, expert = _deal_per_node(weight, on_node, num_gpus)
        node_of_gpu = np.arange(num_gpus) // (num_gpus // num_nodes)
    else:
        counts = optimal_replica_counts(weight, num_physical, max_per_expert=num_gpus)
        if slots_per_gpu == 2:
            counts = tune_counts_for_pairs(weight, counts, max_per_expert=num_gpus)
        size, expert = _deal_global(weight, counts, num_gpus)
        node_of_gpu = np.zeros(num_gpus, dtype=np.int64)
        home_node = np.full((num_layers, num_logical), -1, dtype=np.int64)
    repair_duplicates(size, expert, node_of_gpu, home_node)
    floor = np.maximum(weight.sum(axis=1) / num_gpus, (weight / counts).max(axis=1))
    refine_by_swaps(size, expert, node_of_gpu, home_node, floor * (1 + tolerance))
    return Placement.from_phy2log(expert.reshape(num_layers, num_physical), num_logical)

"""The ``balanced`` policy (default): the best balance reachable in a few milliseconds.

1. Replica counts. Global: minimise the largest load per replica (no expert gets more replicas
   than there are GPUs); with two slots per GPU the counts are then tuned for the pairing.
   Node-aware (``num_nodes > 1`` and groups divide evenly over nodes): expert groups are packed
   onto nodes, every expert keeps a replica on its group's node, and each redundant slot of the
   lightest node with room goes to the expert whose extra replica lowers the peak the most.
2. Replicas are dealt onto GPUs (per node when node-aware) by balanced largest differencing.
3. Swaps between the heaviest GPU and the lightest ones lower the peak until it is within
   ``tolerance`` of the mean (or of the largest replica) or no swap helps.
No GPU ends up with two replicas of one expert unless slots per GPU exceed the expert count.
"""

from __future__ import annotations

import numpy as np

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

DEFAULT_TOLERANCE = 5e-4


def _pair_max(weight: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best pairing of replicas two per GPU (largest with smallest).

    Returns (max pair load [X], expert of the larger replica in the worst pair [X],
    expert of the smaller one [X]).
    """
    size, expert = expand_replicas(weight / counts, counts)
    pair = size + size[:, ::-1]
    half = size.shape[1] // 2
    worst = np.argmax(pair[:, :half], axis=1)
    rows = np.arange(size.shape[0])
    return pair[rows, worst], expert[rows, worst], expert[rows, size.shape[1] - 1 - worst]


def tune_counts_for_pairs(
    weight: np.ndarray, counts: np.ndarray, max_per_expert: int, max_rounds: int = 64
) -> np.ndarray:
    """Move single replicas between experts while that lowers the worst pair (two slots per GPU).

    The receiving expert is one of the two in the worst pair; the donor is the expert whose
    per-replica load stays smallest after giving one up. ``counts`` [X, E] -> tuned copy.
    """
    counts = counts.copy()
    rows = np.arange(weight.shape[0])
    current, big, small = _pair_max(weight, counts)
    for _ in range(max_rounds):
        improved_any = False
        for receiver in (big, small):
            donor_cost = np.where(counts >= 2, weight / np.maximum(counts - 1, 1), np.inf)
            donor_cost[rows, receiver] = np.inf
            donor = np.argmin(donor_cost, axis=1)
            ok = np.isfinite(donor_cost[rows, donor]) & (counts[rows, receiver] < max_per_expert)
            if not ok.any():
                continue
            trial = counts.copy()
            trial[rows[ok], receiver[ok]] += 1
            trial[rows[ok], donor[ok]] -= 1
            value, trial_big, trial_small = _pair_max(weight, trial)
            better = ok & (value < current * (1.0 - 1e-12))
            if better.any():
                improved_any = True
                counts[better] = trial[better]
                current = np.where(better, value, current)
                big = np.where(better, trial_big, big)
                small = np.where(better, trial_small, small)
        if not improved_any:
            break
    return counts


def home_nodes(weight: np.ndarray, num_groups: int, num_nodes: int) -> np.ndarray:
    """Node of every expert [L, E]: whole groups packed onto nodes, heaviest group first."""
    num_layers, num_logical = weight.shape
    group_size = num_logical // num_groups
    group_load = weight.reshape(num_layers, num_groups, group_size).sum(axis=2)
    group_node, _ = greedy_pack(group_load, num_nodes)
    return np.repeat(group_node, group_size, axis=1)


def node_aware_replicas(
    weight: np.ndarray,
    home_node: np.ndarray,
    num_physical: int,
    num_nodes: int,
    num_gpus: int,
    candidates: int = 16,
) -> np.ndarray:
    """Replicas of every expert on every node: [L, E, N] int64.

    Each expert starts with one replica on its home node. Every redundant slot (the same number
    per node) is filled in turn on the lightest node with room, by the expert, among the
    ``candidates`` with the largest load per replica, whose extra replica gives the lowest peak:
    max(heaviest node / GPUs per node, largest replica).
    """
    num_layers, num_logical = weight.shape
    gpus_per_node = num_gpus // num_nodes
    rows = np.arange(num_layers)
    row_col = rows[:, None]
    on_node = np.zeros((num_layers, num_logical, num_nodes), dtype=np.int64)
    on_node[row_col, np.arange(num_logical)[None, :], home_node] = 1
    counts = np.ones((num_layers, num_logical), dtype=np.int64)
    node_load = np.zeros((num_layers, num_nodes))
    for node in range(num_nodes):
        node_load[:, node] = np.where(home_node == node, weight, 0.0).sum(axis=1)
    spare = np.full((num_layers, num_nodes), (num_physical - num_logical) // num_nodes)
    c = min(candidates, num_logical)
    node_onehot = np.eye(num_nodes)
    for _ in range(num_physical - num_logical):
        receiver = np.argmin(np.where(spare > 0, node_load, np.inf), axis=1)  # [L]
        per_replica = weight / counts
        # An expert may not hold more replicas on a node than the node has GPUs.
        room = on_node[rows, :, receiver] < gpus_per_node  # [L, E]
        ranked = np.where(room, per_replica, -np.inf)
        cand = np.argsort(-ranked, axis=1)[:, :c]  # [L, C], largest per-replica first
        cand_w = weight[row_col, cand]
        cand_c = counts[row_col, cand]
        shrink = cand_w / cand_c - cand_w / (cand_c + 1)  # per replica already placed
        new_load = (
            node_load[:, None, :]
            - shrink[:, :, None] * on_node[row_col, cand]
            + node_onehot[receiver][:, None, :] * (cand_w / (cand_c + 1))[:, :, None]
        )
        ordered = np.sort(per_replica, axis=1)
        largest, second = ordered[:, -1], ordered[:, -2] if num_logical > 1 else ordered[:, -1]
        others = np.where(per_replica[row_col, cand] >= largest[:, None], second[:, None], largest[:, None])
        peak = np.maximum(new_load.max(axis=2) / gpus_per_node, np.maximum(others, cand_w / (cand_c + 1)))
        peak = np.where(np.isfinite(ranked[row_col, cand]), peak, np.inf)
        choice = cand[rows, np.argmin(peak, axis=1)]
        chosen_w = weight[rows, choice]
        chosen_c = counts[rows, choice]
        node_load -= (chosen_w / chosen_c - chosen_w / (chosen_c + 1))[:, None] * on_node[rows, choice]
        node_load[rows, receiver] += chosen_w / (chosen_c + 1)
        on_node[rows, choice, receiver] += 1
        counts[rows, choice] += 1
        spare[rows, receiver] -= 1
    return on_node


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
    return gather_slots(size, slot_item).reshape(shape), gather_slots(expert, slot_item).reshape(shape)


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
    home_node: np.ndarray | None = None
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
    repair_duplicates(size, expert, node_of_gpu)
    floor = np.maximum(weight.sum(axis=1) / num_gpus, (weight / counts).max(axis=1))
    refine_by_swaps(size, expert, node_of_gpu, home_node, floor * (1 + tolerance))
    return Placement.from_phy2log(expert.reshape(num_layers, num_physical), num_logical)

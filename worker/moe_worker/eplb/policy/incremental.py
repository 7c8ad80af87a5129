"""The ``incremental`` policy: reach a balancedness target while moving few expert copies.

Starts from the previous placement and changes it only as far as needed. A copy "moves" when a
(layer, GPU, expert) pair exists in the new placement but not in the old. Slots per GPU stay
fixed, so the GPU count may change (elastic resize):

- GPUs that survive keep their replicas;
- joining GPUs get replicas of the experts with the largest load per replica;
- replicas on retiring GPUs are dropped; an expert left with none takes the slot of a surviving
  redundant replica whose expert can best spare it;
- an expert whose load per replica exceeds the optimum by more than ``count_margin`` (25%) gets
  spare replicas of other experts relabelled to it (one move each).

Then swaps around the heaviest GPU (``refine_by_swaps``; moves are counted against the old
placement) lift each layer to its target: by default ``recover`` (95%) of the
gain a full ``balanced`` re-plan would get over the starting point, or an explicit
balancedness ``target``. A layer never ends worse balanced than before the optional moves.
Without a previous placement it is the ``balanced`` policy.
"""

from __future__ import annotations

import numpy as np

from .balanced import balanced_policy, is_node_aware
from .packing import refine_by_swaps, repair_duplicates
from .placement import Placement
from .quality import gpu_expert_presence, layer_balancedness, optimal_replica_counts
from .shares import fit_shares, replay, share_moves

DEFAULT_RECOVER = 0.95
DEFAULT_COUNT_MARGIN = 0.25


def _drop_retired(weight: np.ndarray, layout: np.ndarray, num_logical: int) -> np.ndarray:
    """Re-home experts whose only replicas were on retired GPUs. layout [L, G, S] kept GPUs."""
    num_layers = layout.shape[0]
    flat = layout.reshape(num_layers, -1).copy()
    for layer in range(num_layers):
        counts = np.bincount(flat[layer], minlength=num_logical)
        for orphan in np.nonzero(counts == 0)[0]:
            # Evict the redundant replica whose expert loses least by giving it up.
            spare_cost = np.where(counts >= 2, weight[layer] / np.maximum(counts - 1, 1), np.inf)
            donor = int(np.argmin(spare_cost))
            slots = np.nonzero(flat[layer] == donor)[0]
            flat[layer, slots[-1]] = orphan
            counts[donor] -= 1
            counts[orphan] += 1
    return flat.reshape(layout.shape)


def _add_joined(
    weight: np.ndarray, layout: np.ndarray, num_new_gpus: int, num_logical: int
) -> np.ndarray:
    """Fill joining GPUs' slots [L, G_new, S] with replicas of the heaviest-per-replica experts.

    Each new replica goes to the least loaded joining GPU that has room and does not hold that
    expert yet (an expert never gets more replicas than there are GPUs).
    """
    num_layers, num_old_gpus, slots = layout.shape
    joining = num_new_gpus - num_old_gpus
    joined = np.empty((num_layers, joining, slots), dtype=np.int64)
    for layer in range(num_layers):
        counts = np.bincount(layout[layer].ravel(), minlength=num_logical)
        grid = np.full((joining, slots), -1, dtype=np.int64)
        fill = np.zeros(joining, dtype=np.int64)
        load = np.zeros(joining)
        for _ in range(joining * slots):
            per_replica = np.where(counts >= num_new_gpus, -np.inf, weight[layer] / counts)
            if not np.isfinite(per_replica).any():  # more slots than experts x GPUs
                per_replica = weight[layer] / counts
            for expert in np.argsort(-per_replica, kind="stable"):
                room = [g for g in range(joining) if fill[g] < slots and expert not in grid[g]]
                if room:
                    break
            else:  # slots per GPU exceed the experts: a duplicate is unavoidable
                expert = int(np.argmax(per_replica))
                room = [g for g in range(joining) if fill[g] < slots]
            gpu = min(room, key=lambda g: (load[g], g))
            grid[gpu, fill[gpu]] = expert
            fill[gpu] += 1
            load[gpu] += weight[layer, expert] / (counts[expert] + 1)
            counts[expert] += 1
        joined[layer] = grid
    return np.concatenate([layout, joined], axis=1)


def _fix_replica_counts(
    weight: np.ndarray, layout: np.ndarray, num_gpus: int, margin: float
) -> np.ndarray:
    """Relabel spare replicas to experts whose load per replica is far above the optimum.

    Per layer, while the largest load per replica exceeds (1 + ``margin``) x the optimal
    largest (``optimal_replica_counts``), one replica of the expert that can best spare one
    (staying within that limit) becomes a replica of the overloaded expert, on the lightest
    GPU that does not hold it yet. layout [L, G, S] is changed in place; returns relabels [L].
    """
    num_layers, num_logical = weight.shape
    optimal = optimal_replica_counts(weight, layout[0].size, max_per_expert=num_gpus)
    limit = (weight / optimal).max(axis=1) * (1.0 + margin)
    relabels = np.zeros(num_layers, dtype=np.int64)
    for layer in range(num_layers):
        grid = layout[layer]
        counts = np.bincount(grid.ravel(), minlength=num_logical)
        while True:
            per_replica = weight[layer] / counts
            hot = int(np.argmax(per_replica))
            if per_replica[hot] <= limit[layer]:
                break
            spare = np.where(counts >= 2, weight[layer] / np.maximum(counts - 1, 1), np.inf)
            spare[hot] = np.inf
            donor = int(np.argmin(spare))
            if spare[donor] > limit[layer]:
                break
            gpu_load = (weight[layer] / counts)[grid].sum(axis=1)
            candidates = [
                g
                for g in np.argsort(gpu_load, kind="stable")
                if (grid[g] == donor).any() and not (grid[g] == hot).any()
            ]
            if not candidates:
                break
            gpu = candidates[0]
            grid[gpu, int(np.argmax(grid[gpu] == donor))] = hot
            counts[donor] -= 1
            counts[hot] += 1
            relabels[layer] += 1
    return relabels


def _sizes(weight: np.ndarray, counts: np.ndarray, layout: np.ndarray) -> np.ndarray:
    """Load of the replica in every slot: layout [L, G, S] -> [L, G, S]."""
    flat = layout.reshape(layout.shape[0], -1)
    return np.take_along_axis(weight / np.maximum(counts, 1), flat, axis=1).reshape(layout.shape)


def _frontiers(
    size: np.ndarray,
    expert: np.ndarray,
    node_of_gpu: np.ndarray,
    home_node: np.ndarray,
    target_max: np.ndarray,
    origin: np.ndarray,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every layer's frontier of (copies moved, heaviest GPU load): the swaps' trace without a
    budget, on copies of ``size`` and ``expert`` [L, G, S]."""
    num_layers, num_gpus, slots = size.shape
    steps = 4 * num_gpus * slots  # more swaps than a layer ever needs to reach its target
    trace = (np.full((num_layers, steps), -1, dtype=np.int64), np.full((num_layers, steps), np.inf))
    start_peak = size.sum(axis=2).max(axis=1)
    refine_by_swaps(
        size.copy(), expert.copy(), node_of_gpu, home_node, target_max, origin=origin, trace=trace
    )
    return [
        gain_curve(trace[0][row], trace[1][row], float(start_peak[row]))
        for row in range(num_layers)
    ]


def _without_duplicates(weight: np.ndarray, layout: np.ndarray, num_logical: int) -> np.ndarray:
    """Swap apart two replicas of an expert on one GPU (e.g. from a resize), when possible."""
    num_layers, num_gpus, _ = layout.shape
    counts = Placement.from_phy2log(layout.reshape(num_layers, -1), num_logical).replica_count
    expert = layout.copy()
    size = _sizes(weight, counts, expert)
    no_home = np.full((num_layers, num_logical), -1, dtype=np.int64)
    repair_duplicates(size, expert, np.zeros(num_gpus, dtype=np.int64), no_home)
    return expert


def gain_curve(
    moves: np.ndarray, peak: np.ndarray, start_peak: float
) -> tuple[np.ndarray, np.ndarray]:
    """One layer's swap trace -> its concave frontier: (moves [K], peak [K]) from (0, start),
    each point moving more copies for a lower peak, every step buying less per copy than the
    one before (the upper hull of balancedness against moves). Trace entries < 0 are unused."""
    if start_peak <= 0.0:  # a layer without load: nothing to gain
        return np.zeros(1, dtype=np.int64), np.array([start_peak])
    points_moves, points_peak = [0], [start_peak]
    for used, value in zip(moves.tolist(), peak.tolist(), strict=True):
        if used < 0:
            break
        if value < points_peak[-1] and used > points_moves[-1]:
            points_moves.append(used)
            points_peak.append(value)
        elif value < points_peak[-1]:  # as few moves or fewer (a refund): it replaces the last
            points_peak[-1] = value
    hull_moves, hull_value = [points_moves[0]], [1.0 / points_peak[0]]
    for used, value in zip(points_moves[1:], points_peak[1:], strict=True):
        inverse = 1.0 / value  # balancedness up to the layer's mean, a constant factor
        while len(hull_moves) >= 2:
            slope_last = (hull_value[-1] - hull_value[-2]) / (hull_moves[-1] - hull_moves[-2])
            slope_new = (inverse - hull_value[-1]) / (used - hull_moves[-1])
            if slope_new < slope_last:
                break
            hull_moves.pop()
            hull_value.pop()
        hull_moves.append(used)
        hull_value.append(inverse)
    return np.array(hull_moves, dtype=np.int64), 1.0 / np.array(hull_value)


def spread_budget(
    curves: list[tuple[np.ndarray, np.ndarray]], mean: np.ndarray, total: int
) -> np.ndarray:
    """Copies to move per layer [L] within ``total``: the steps of every layer's frontier in
    order of balancedness gained per copy moved, as long as they fit."""
    steps = []
    for layer, (moves, peak) in enumerate(curves):
        value = mean[layer] / peak
        for k in range(1, moves.size):
            cost = int(moves[k] - moves[k - 1])
            steps.append(((value[k] - value[k - 1]) / cost, layer, k, cost))
    steps.sort(key=lambda step: (-step[0], step[1], step[2]))
    reached = np.zeros(len(curves), dtype=np.int64)
    closed = np.zeros(len(curves), dtype=bool)
    spent = 0
    for _, layer, k, cost in steps:
        if closed[layer] or k != reached[layer] + 1:
            continue
        if spent + cost > total:
            closed[layer] = True  # its later steps would come after this one
            continue
        spent += cost
        reached[layer] = k
    return np.array([curves[layer][0][k] for layer, k in enumerate(reached)], dtype=np.int64)


def incremental_policy(
    weight: np.ndarray,
    num_physical: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    previous: Placement | None = None,
    target: float | None = None,
    recover: float = DEFAULT_RECOVER,
    max_moved_fraction: float | None = None,
    count_margin: float = DEFAULT_COUNT_MARGIN,
    moved_fraction: float | None = None,
    shares: bool = False,
) -> Placement:
    """Placement [L, P] close to ``previous`` whose balancedness reaches the target per layer.

    ``max_moved_fraction`` caps the copies the swaps may move per layer, as a fraction of the
    slots (moves forced by a change of GPU count are not counted against it). ``moved_fraction``
    is a budget for the whole model instead: that fraction of all L x P copies, spent where a
    moved copy buys the most balancedness (``spread_budget`` over each layer's swap frontier).
    ``shares``: choose the moves with replica shares refitted after each (``shares.share_moves``)
    and return the placement with its fitted shares (not node-aware: its moves keep no home
    node, so node-aware problems are refused).
    """
    if shares and is_node_aware(num_groups, num_nodes, num_gpus):
        from . import PlacementInputError  # the package imports this module first

        raise PlacementInputError(
            "shares", "not supported with node-aware placement (num_nodes > 1 with expert groups)"
        )
    weight = np.asarray(weight, dtype=np.float64)
    if previous is None:
        return balanced_policy(weight, num_physical, num_groups, num_nodes, num_gpus)
    num_layers, num_logical = weight.shape
    slots = num_physical // num_gpus
    old_gpus = previous.num_physical // slots
    old_layout = previous.phy2log.reshape(num_layers, old_gpus, slots)

    layout = old_layout[:, : min(old_gpus, num_gpus)]
    if num_gpus < old_gpus:
        layout = _drop_retired(weight, layout, num_logical)
    elif num_gpus > old_gpus:
        layout = _add_joined(weight, layout, num_gpus, num_logical)
    layout = _without_duplicates(weight, np.ascontiguousarray(layout, dtype=np.int64), num_logical)
    unchanged = layout.copy()
    relabels = _fix_replica_counts(weight, layout, num_gpus, count_margin)
    start = Placement.from_phy2log(layout.reshape(num_layers, num_physical), num_logical)
    counts = start.replica_count

    start_balance = layer_balancedness(weight, start, num_gpus)
    if target is None:
        full = balanced_policy(weight, num_physical, num_groups, num_nodes, num_gpus)
        full_balance = layer_balancedness(weight, full, num_gpus)
        goal = start_balance + recover * np.maximum(full_balance - start_balance, 0.0)
    else:
        goal = np.full(num_layers, float(target))
    mean = weight.sum(axis=1) / num_gpus
    target_max = np.where(goal > 0, mean / np.maximum(goal, 1e-12), np.inf)

    if is_node_aware(num_groups, num_nodes, num_gpus):
        # Each expert's home is the node of its first slot now, so locality is kept, not redone.
        node_of_gpu = np.arange(num_gpus) // (num_gpus // num_nodes)
        first_slot = np.argmax(start.log2phy >= 0, axis=2)
        home_node = node_of_gpu[
            np.take_along_axis(start.log2phy, first_slot[:, :, None], 2)[:, :, 0] // slots
        ]
    else:
        home_node = np.full((num_layers, num_logical), -1, dtype=np.int64)
        node_of_gpu = np.zeros(num_gpus, dtype=np.int64)
    expert = layout.copy()
    size = _sizes(weight, counts, expert)
    origin = np.zeros((num_layers, num_gpus, num_logical), dtype=bool)
    kept = min(old_gpus, num_gpus)
    origin[:, :kept] = gpu_expert_presence(previous.phy2log, old_gpus, num_logical)[:, :kept]
    budget = None
    if max_moved_fraction is not None:
        allowance = int(np.floor(max_moved_fraction * num_physical))
        budget = np.maximum(allowance - relabels, 0)
    if shares:
        moved = _share_aware(
            weight, layout, num_gpus, origin, target_max, budget, relabels, moved_fraction
        )
        return _no_worse(weight, moved, unchanged, num_gpus, num_logical, shares=True)
    if moved_fraction is not None:
        total = int(np.floor(moved_fraction * num_physical * num_layers)) - int(relabels.sum())
        frontier = _frontiers(size, expert, node_of_gpu, home_node, target_max, origin)
        spread = spread_budget(frontier, mean, max(total, 0))
        budget = spread if budget is None else np.minimum(budget, spread)
    refine_by_swaps(
        size,
        expert,
        node_of_gpu,
        home_node,
        target_max,
        origin=origin,
        move_budget=budget,
    )
    return _no_worse(weight, expert, unchanged, num_gpus, num_logical, shares=False)


def _no_worse(
    weight: np.ndarray,
    layout: np.ndarray,
    unchanged: np.ndarray,
    num_gpus: int,
    num_logical: int,
    shares: bool,
) -> Placement:
    """The placement of ``layout`` [L, G, S], except that a layer worse balanced than
    ``unchanged`` (before any optional move) keeps that. With ``shares`` both get fitted
    shares, and a layer keeps its moves only where they balance strictly better than the
    shares alone would (moves that buy nothing are not made)."""
    num_layers = layout.shape[0]
    result = Placement.from_phy2log(layout.reshape(num_layers, -1), num_logical)
    before = Placement.from_phy2log(unchanged.reshape(num_layers, -1), num_logical)
    if shares:
        result, before = fit_shares(weight, result, num_gpus), fit_shares(weight, before, num_gpus)
    after_balance = layer_balancedness(weight, result, num_gpus)
    before_balance = layer_balancedness(weight, before, num_gpus)
    worse = after_balance <= before_balance if shares else after_balance < before_balance
    if not worse.any():
        return result
    grid = result.phy2log.copy()
    grid[worse] = before.phy2log[worse]
    share = None
    if shares:
        share = result.slot_share().copy()
        share[worse] = before.slot_share()[worse]
    return Placement.from_phy2log(grid, num_logical).with_share(share)


def _share_aware(
    weight: np.ndarray,
    layout: np.ndarray,
    num_gpus: int,
    origin: np.ndarray,
    target_max: np.ndarray,
    budget: np.ndarray | None,
    relabels: np.ndarray,
    moved_fraction: float | None,
) -> np.ndarray:
    """``layout`` [L, G, S] after the share-aware moves: up to each layer's target and
    ``budget``, or, with ``moved_fraction``, that fraction of all copies spread over the
    layers where a copy buys the most (each layer's moves traced once without a target, then
    replayed up to its share of the budget)."""
    num_layers = layout.shape[0]
    phy2log = layout.reshape(num_layers, -1)
    num_physical = phy2log.shape[1]
    cap = np.full(num_layers, num_physical, dtype=np.int64) if budget is None else budget
    if moved_fraction is None:
        moved, _, _ = share_moves(weight, phy2log, num_gpus, origin, target_max, cap, num_physical)
        return moved.reshape(layout.shape)
    total = max(int(np.floor(moved_fraction * num_physical * num_layers)) - int(relabels.sum()), 0)
    steps = int(min(num_physical, max(8, 4 * np.ceil(total / num_layers))))
    _, trace, peaks = share_moves(
        weight, phy2log, num_gpus, origin, np.zeros(num_layers), cap, steps
    )
    curves = [
        gain_curve(trace[row, :, 0], peaks[row, 1:], float(peaks[row, 0]))
        for row in range(num_layers)
    ]
    mean = weight.sum(axis=1) / num_gpus
    copies = spread_budget(curves, mean, total)
    # Each layer replays up to its lowest peak among the steps that end within its copies:
    # the frontier point the budget chose.
    within = (trace[:, :, 0] >= 0) & (trace[:, :, 0] <= copies[:, None])
    lowest = np.where(within, peaks[:, 1:], np.inf)
    taken = np.where(copies > 0, np.argmin(lowest, axis=1) + 1, 0)
    taken[~within.any(axis=1)] = 0
    return replay(phy2log, trace, taken).reshape(layout.shape)

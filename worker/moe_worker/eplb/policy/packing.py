"""Packing primitives shared by the ``balanced`` and ``incremental`` policies.

A *bin* is a GPU with S slots; an *item* is one expert replica whose size is its expert's load
divided by its replica count. The per-layer kernels are plain loops compiled by numba (see
``jit``); the functions without a leading underscore take a batch of rows (layers) at once.

Bin contents are dense arrays, so a swap is a few writes:

- ``size``   [X, G, S] float64  load of the replica in each slot
- ``expert`` [X, G, S] int64    logical expert of the replica in each slot

Node-aware placements also pass ``node_of_gpu`` [G] and ``home_node`` [X, E]: every expert keeps
at least one replica on its home node (its group's node). Without nodes, ``home_node`` is all -1.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .jit import njit, prange, row_kernel


def greedy_pack(item_weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack N items per row into ``num_packs`` packs of exactly N / num_packs items each.

    Items go heaviest first (stable order) to the currently lightest pack that still has room
    (lowest index on ties). ``item_weight`` [X, N] -> (pack of item, position in pack), [X, N] each.
    """
    num_rows, num_items = item_weight.shape
    capacity = num_items // num_packs
    rows = np.arange(num_rows)
    order = np.argsort(-item_weight, axis=1, kind="stable")
    pack_load = np.zeros((num_rows, num_packs))
    pack_size = np.zeros((num_rows, num_packs), dtype=np.int64)
    pack_of = np.empty((num_rows, num_items), dtype=np.int64)
    position = np.empty((num_rows, num_items), dtype=np.int64)
    for k in range(num_items):
        item = order[:, k]
        open_load = np.where(pack_size < capacity, pack_load, np.inf)
        pack = np.argmin(open_load, axis=1)
        pack_of[rows, item] = pack
        position[rows, item] = pack_size[rows, pack]
        pack_load[rows, pack] += item_weight[rows, item]
        pack_size[rows, pack] += 1
    return pack_of, position


@row_kernel("expand_rows", "Tuple((f8[:,::1], i8[:,::1]))(f8[:,::1], i8[:,::1], i8)")
def _expand_rows(per_replica: np.ndarray, multiplicity: np.ndarray, num_items: int):  # type: ignore[no-untyped-def]
    num_rows, num_experts = per_replica.shape
    size = np.empty((num_rows, num_items))
    expert = np.empty((num_rows, num_items), dtype=np.int64)
    for row in prange(num_rows):
        row_size = np.empty(num_items)
        row_expert = np.empty(num_items, dtype=np.int64)
        i = 0
        for e in range(num_experts):
            for _ in range(multiplicity[row, e]):
                row_size[i] = per_replica[row, e]
                row_expert[i] = e
                i += 1
        order = np.argsort(-row_size, kind="mergesort")
        for k in range(num_items):
            size[row, k] = row_size[order[k]]
            expert[row, k] = row_expert[order[k]]
    return size, expert


def expand_replicas(
    per_replica: np.ndarray, multiplicity: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Items of every row, heaviest first: (size [X, N], expert [X, N]).

    ``per_replica`` [X, E] is each expert's load per replica and ``multiplicity`` [X, E] how
    many of its replicas the row holds; every row must hold the same number N of replicas.
    Replicas of an expert are adjacent; ties between experts keep expert order (stable sort).
    """
    return _expand_rows(
        np.ascontiguousarray(per_replica, dtype=np.float64),
        np.ascontiguousarray(multiplicity, dtype=np.int64),
        int(multiplicity[0].sum()),
    )


@njit
def _differencing_layer(item_size: np.ndarray, num_bins: int) -> np.ndarray:
    """Bin of every item [N] (items sorted heaviest first), equal item count per bin."""
    num_items = item_size.shape[0]
    num_parts = num_items // num_bins
    part_load = item_size.reshape(num_parts, num_bins).copy()
    item_bin = np.arange(num_items) % num_bins
    item_part = np.arange(num_items) // num_bins
    spread = np.empty(num_parts)
    for p in range(num_parts):
        spread[p] = part_load[p].max() - part_load[p].min()
    bin_map = np.empty(num_bins, dtype=np.int64)
    for _ in range(num_parts - 1):
        keep = np.argmax(spread)
        spread_keep = spread[keep]
        spread[keep] = -np.inf
        merged = np.argmax(spread)
        spread[keep] = spread_keep
        keep_light_first = np.argsort(part_load[keep])
        merged_heavy_first = np.argsort(-part_load[merged])
        for k in range(num_bins):
            bin_map[merged_heavy_first[k]] = keep_light_first[k]
            part_load[keep, keep_light_first[k]] += part_load[merged, merged_heavy_first[k]]
        spread[keep] = part_load[keep].max() - part_load[keep].min()
        spread[merged] = -np.inf
        for i in range(num_items):
            if item_part[i] == merged:
                item_bin[i] = bin_map[item_bin[i]]
                item_part[i] = keep
    return item_bin


@row_kernel("differencing_rows", "i8[:,:,::1](f8[:,::1], i8)")
def _differencing_rows(item_size: np.ndarray, num_bins: int) -> np.ndarray:
    num_rows, num_items = item_size.shape
    slots = num_items // num_bins
    slot_item = np.empty((num_rows, num_bins, slots), dtype=np.int64)
    for row in prange(num_rows):
        item_bin = _differencing_layer(item_size[row], num_bins)
        fill = np.zeros(num_bins, dtype=np.int64)
        for i in range(num_items):
            b = item_bin[i]
            slot_item[row, b, fill[b]] = i
            fill[b] += 1
    return slot_item


def differencing_assign(item_size: np.ndarray, num_bins: int) -> np.ndarray:
    """Deal items onto bins of equal cardinality by balanced largest differencing.

    ``item_size`` [X, N] must be sorted heaviest first. The items start as N / num_bins partial
    solutions (consecutive batches of ``num_bins`` items, one item per bin). The two partial
    solutions whose bin loads are spread widest are merged, heaviest bins of one with lightest
    bins of the other, until one remains. Returns the item index in every slot:
    [X, num_bins, N / num_bins].
    """
    return _differencing_rows(np.ascontiguousarray(item_size, dtype=np.float64), num_bins)


def gather_slots(values: np.ndarray, slot_item: np.ndarray) -> np.ndarray:
    """values [X, N] indexed by slot_item [X, G, S] -> [X, G, S]."""
    num_rows = values.shape[0]
    flat = np.take_along_axis(values, slot_item.reshape(num_rows, -1), axis=1)
    return flat.reshape(slot_item.shape)


@njit
def _swap_slots(
    size: np.ndarray,
    expert: np.ndarray,
    held: np.ndarray,
    node_held: np.ndarray,
    node_of_gpu: np.ndarray,
    gpu_a: Any,
    slot_a: int,
    gpu_b: int,
    slot_b: int,
) -> None:
    """Exchange two slots' replicas of one layer, keeping the holdings tables in step."""
    e, f = expert[gpu_a, slot_a], expert[gpu_b, slot_b]
    held[gpu_a, e] -= 1
    held[gpu_b, f] -= 1
    held[gpu_a, f] += 1
    held[gpu_b, e] += 1
    node_held[node_of_gpu[gpu_a], e] -= 1
    node_held[node_of_gpu[gpu_b], f] -= 1
    node_held[node_of_gpu[gpu_a], f] += 1
    node_held[node_of_gpu[gpu_b], e] += 1
    size_a = size[gpu_a, slot_a]
    size[gpu_a, slot_a] = size[gpu_b, slot_b]
    size[gpu_b, slot_b] = size_a
    expert[gpu_a, slot_a] = f
    expert[gpu_b, slot_b] = e


@njit
def _holdings(expert: np.ndarray, node_of_gpu: np.ndarray, num_logical: int, num_nodes: int):  # type: ignore[no-untyped-def]
    num_gpus, slots = expert.shape
    held = np.zeros((num_gpus, num_logical), dtype=np.int64)
    node_held = np.zeros((num_nodes, num_logical), dtype=np.int64)
    for g in range(num_gpus):
        for s in range(slots):
            held[g, expert[g, s]] += 1
            node_held[node_of_gpu[g], expert[g, s]] += 1
    return held, node_held


@njit
def _may_leave(e: int, node: int, home_node: np.ndarray, node_held: np.ndarray) -> bool:
    """Whether a replica of expert e may leave ``node``: not its home, or not its last one there."""
    return home_node[e] != node or node_held[node, e] >= 2


@njit
def _repair_layer(
    size: np.ndarray,
    expert: np.ndarray,
    node_of_gpu: np.ndarray,
    home_node: np.ndarray,
    num_logical: int,
    num_nodes: int,
) -> None:
    num_gpus, slots = expert.shape
    held, node_held = _holdings(expert, node_of_gpu, num_logical, num_nodes)
    for g in range(num_gpus):
        for s in range(slots):
            e = expert[g, s]
            if held[g, e] < 2:
                continue
            best_gap = np.inf
            best_gpu, best_slot = -1, -1
            for h in range(num_gpus):
                if held[h, e] > 0:
                    continue
                cross = node_of_gpu[h] != node_of_gpu[g]
                if cross and not _may_leave(e, node_of_gpu[g], home_node, node_held):
                    continue
                for t in range(slots):
                    f = expert[h, t]
                    if held[g, f] > 0:
                        continue
                    if cross and not _may_leave(f, node_of_gpu[h], home_node, node_held):
                        continue
                    gap = abs(size[h, t] - size[g, s])
                    if gap < best_gap:
                        best_gap, best_gpu, best_slot = gap, h, t
            if best_gpu >= 0:
                _swap_slots(size, expert, held, node_held, node_of_gpu, g, s, best_gpu, best_slot)


@row_kernel("repair_rows", "void(f8[:,:,::1], i8[:,:,::1], i8[::1], i8[:,::1], i8, i8)")
def _repair_rows(size, expert, node_of_gpu, home_node, num_logical, num_nodes):  # type: ignore[no-untyped-def]
    for row in prange(size.shape[0]):
        _repair_layer(size[row], expert[row], node_of_gpu, home_node[row], num_logical, num_nodes)


def repair_duplicates(
    size: np.ndarray, expert: np.ndarray, node_of_gpu: np.ndarray, home_node: np.ndarray
) -> None:
    """Move second replicas of an expert off a GPU that already holds one, in place.

    Each such replica is swapped with the closest-sized replica on a GPU that holds neither
    expert, keeping every expert's home-node replica. A duplicate no swap can remove stays.
    """
    num_logical = max(int(expert.max()) + 1, home_node.shape[1])
    _repair_rows(size, expert, node_of_gpu, home_node, num_logical, int(node_of_gpu.max()) + 1)


@njit
def _refine_layer(
    size: np.ndarray,
    expert: np.ndarray,
    node_of_gpu: np.ndarray,
    home_node: np.ndarray,
    origin: np.ndarray,
    target_max: float,
    move_budget: int,
    num_logical: int,
    num_nodes: int,
    trace_moves: np.ndarray,
    trace_peak: np.ndarray,
) -> int:
    """Swap replicas between the heaviest GPU and another until the target or no gain.

    ``origin`` [G, E] marks the previous placement's (GPU, expert) pairs: a swap costs one move
    for each replica it brings to a GPU where that expert was not before, and refunds one for
    each earlier move it undoes. After swap ``t`` (while ``t`` < their length) the moves used
    so far and the heaviest GPU's load go to ``trace_moves[t]`` and ``trace_peak[t]``. Returns
    the moves used.
    """
    num_gpus, slots = expert.shape
    held, node_held = _holdings(expert, node_of_gpu, num_logical, num_nodes)
    load = np.zeros(num_gpus)
    for g in range(num_gpus):
        load[g] = size[g].sum()
    moves = 0
    steps = 0
    while True:
        h = np.argmax(load)
        if load[h] <= target_max:
            break
        # Two candidates: the cheapest swap (in moves) that brings both GPUs under the target,
        # and, failing that, the swap that lowers their peak the most.
        best = load[h] * (1.0 - 1e-12)
        best_gpu, best_a, best_b, best_cost = -1, -1, -1, 0
        reach_cost, reach_peak = 1 << 30, np.inf
        reach_gpu, reach_a, reach_b = -1, -1, -1
        for j in range(num_gpus):
            # A swap with GPU j leaves at best (load[h] + load[j]) / 2: skip j when that is no
            # better than the best swap found and does not reach the target.
            bound = 0.5 * (load[h] + load[j])
            if j == h or (bound >= best and bound > target_max):
                continue
            cross = node_of_gpu[j] != node_of_gpu[h]
            for a in range(slots):
                ea = expert[h, a]
                if held[j, ea] > 0:
                    continue
                if cross and not _may_leave(ea, node_of_gpu[h], home_node, node_held):
                    continue
                for b in range(slots):
                    delta = size[h, a] - size[j, b]
                    if delta <= 0.0:
                        continue
                    worse = max(load[h] - delta, load[j] + delta)
                    if worse >= best and worse > target_max:
                        continue
                    eb = expert[j, b]
                    if held[h, eb] > 0:
                        continue
                    if cross and not _may_leave(eb, node_of_gpu[j], home_node, node_held):
                        continue
                    cost = 0
                    if not origin[j, ea]:
                        cost += 1
                    if not origin[h, eb]:
                        cost += 1
                    if held[h, ea] == 1 and not origin[h, ea]:
                        cost -= 1
                    if held[j, eb] == 1 and not origin[j, eb]:
                        cost -= 1
                    if moves + cost > move_budget:
                        continue
                    if worse <= target_max and (
                        cost < reach_cost or (cost == reach_cost and worse < reach_peak)
                    ):
                        reach_cost, reach_peak = cost, worse
                        reach_gpu, reach_a, reach_b = j, a, b
                    if worse < best:
                        best, best_gpu, best_a, best_b, best_cost = worse, j, a, b, cost
        if reach_gpu >= 0:
            best_gpu, best_a, best_b, best_cost = reach_gpu, reach_a, reach_b, reach_cost
        if best_gpu < 0:
            break
        delta = size[h, best_a] - size[best_gpu, best_b]
        _swap_slots(size, expert, held, node_held, node_of_gpu, h, best_a, best_gpu, best_b)
        load[h] -= delta
        load[best_gpu] += delta
        moves += best_cost
        if steps < trace_moves.shape[0]:
            trace_moves[steps] = moves
            trace_peak[steps] = load.max()
        steps += 1
    return moves


@row_kernel(
    "refine_rows",
    "i8[::1](f8[:,:,::1], i8[:,:,::1], i8[::1], i8[:,::1], b1[:,:,::1], f8[::1], i8[::1], i8, i8,"
    " i8[:,::1], f8[:,::1])",
)
def _refine_rows(
    size,
    expert,
    node_of_gpu,
    home_node,
    origin,
    target_max,
    move_budget,
    num_logical,
    num_nodes,
    trace_moves,
    trace_peak,
):  # type: ignore[no-untyped-def]
    moves = np.zeros(size.shape[0], dtype=np.int64)
    for row in prange(size.shape[0]):
        moves[row] = _refine_layer(
            size[row],
            expert[row],
            node_of_gpu,
            home_node[row],
            origin[row],
            target_max[row],
            move_budget[row],
            num_logical,
            num_nodes,
            trace_moves[row],
            trace_peak[row],
        )
    return moves


def refine_by_swaps(
    size: np.ndarray,
    expert: np.ndarray,
    node_of_gpu: np.ndarray,
    home_node: np.ndarray,
    target_max: np.ndarray,
    origin: np.ndarray | None = None,
    move_budget: np.ndarray | None = None,
    trace: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Lower each row's heaviest GPU by swapping one of its replicas with another GPU's, in place.

    Each step takes the heaviest GPU and, over all other GPUs and slot pairs, applies the swap
    that brings both GPUs under ``target_max`` [X] with the fewest copies moved (then the lowest
    peak), or if none does, the swap that minimises the larger of the two new loads, if that
    lowers it. A swap never puts two replicas of an expert on one GPU and never takes an
    expert's last replica off its home node. A row stops at its target, when no swap helps, or
    when the next swap would exceed ``move_budget`` [X] expert copies moved relative to
    ``origin`` [X, G, E] bool (the previous placement's pairs). Returns moves used per row.
    ``trace`` (moves [X, T] int64, peak [X, T] float64, filled by the caller with -1 and inf)
    receives each row's moves so far and heaviest GPU load after each of its first T swaps.
    """
    num_rows, num_gpus, _ = size.shape
    num_logical = max(int(expert.max()) + 1, home_node.shape[1])
    if origin is None:
        origin = np.ones((num_rows, num_gpus, num_logical), dtype=np.bool_)
    if move_budget is None:
        move_budget = np.full(num_rows, np.iinfo(np.int64).max // 2, dtype=np.int64)
    return _refine_rows(
        size,
        expert,
        node_of_gpu,
        home_node,
        origin,
        np.asarray(target_max, dtype=np.float64),
        np.asarray(move_budget, dtype=np.int64),
        num_logical,
        int(node_of_gpu.max()) + 1,
        *(
            trace
            if trace is not None
            else (np.zeros((num_rows, 0), np.int64), np.zeros((num_rows, 0)))
        ),
    )

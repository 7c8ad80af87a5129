"""Vectorised packing primitives shared by the ``balanced`` and ``incremental`` policies.

Everything works on a batch of independent rows X (usually layers) at once. A *bin* is a GPU
with S slots; an *item* is one expert replica whose size is its expert's load / replica count.
Bin contents are kept as dense arrays so a swap is two writes:

- ``size``   [X, G, S] float64  load of the replica in each slot
- ``expert`` [X, G, S] int64    logical expert of the replica in each slot

Node-aware placements also pass ``node_of_gpu`` [G] and ``home_node`` [X, E]: every expert keeps
at least one replica on its home node (its group's node).
"""

from __future__ import annotations

import numpy as np


def greedy_pack(item_weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack N items per row into ``num_packs`` packs of exactly N / num_packs items each.

    Items go heaviest first (stable order) to the currently lightest pack that still has room
    (lowest index on ties). ``item_weight`` [X, N] -> (pack of item [X, N], position in pack [X, N]).
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


def expand_replicas(
    per_replica: np.ndarray, multiplicity: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Items of every row, heaviest first: (size [X, N], expert [X, N]).

    ``per_replica`` [X, E] is each expert's load per replica and ``multiplicity`` [X, E] how
    many of its replicas the row holds; every row must hold the same number N of replicas. The
    order is deterministic; replicas of an expert are adjacent unless another expert's replicas
    have exactly the same size.
    """
    num_rows, num_experts = per_replica.shape
    num_items = int(multiplicity[0].sum())
    expert = np.repeat(np.tile(np.arange(num_experts), num_rows), multiplicity.ravel()).reshape(
        num_rows, num_items
    )
    size = np.take_along_axis(per_replica, expert, axis=1)
    order = np.argsort(-size, axis=1)
    return np.take_along_axis(size, order, axis=1), np.take_along_axis(expert, order, axis=1)


def differencing_assign(item_size: np.ndarray, num_bins: int) -> np.ndarray:
    """Deal items onto bins of equal cardinality by balanced largest differencing.

    ``item_size`` [X, N] must be sorted heaviest first. The items start as N / num_bins partial
    solutions (consecutive batches of ``num_bins`` items, one item per bin). The two partial
    solutions whose bin loads are spread widest are merged, heaviest bins of one with lightest
    bins of the other, until one remains. Returns the item index in every slot:
    [X, num_bins, N / num_bins].
    """
    num_rows, num_items = item_size.shape
    num_parts = num_items // num_bins
    rows = np.arange(num_rows)
    row_col = rows[:, None]
    part_load = item_size.reshape(num_rows, num_parts, num_bins).copy()
    item_part = np.broadcast_to(np.arange(num_items) // num_bins, (num_rows, num_items)).copy()
    item_bin = np.broadcast_to(np.arange(num_items) % num_bins, (num_rows, num_items)).copy()
    alive = np.ones((num_rows, num_parts), dtype=bool)
    for _ in range(num_parts - 1):
        spread = np.where(alive, part_load.max(axis=2) - part_load.min(axis=2), -np.inf)
        widest = np.argpartition(-spread, 1, axis=1)[:, :2]
        keep, merged = widest[:, 0], widest[:, 1]
        keep_load = part_load[rows, keep]
        merged_load = part_load[rows, merged]
        keep_light_first = np.argsort(keep_load, axis=1, kind="stable")
        merged_heavy_first = np.argsort(-merged_load, axis=1, kind="stable")
        # Bin merged_heavy_first[k] of the merged part joins bin keep_light_first[k] of the kept.
        bin_map = np.empty_like(merged_heavy_first)
        bin_map[row_col, merged_heavy_first] = keep_light_first
        keep_load[row_col, keep_light_first] += merged_load[row_col, merged_heavy_first]
        part_load[rows, keep] = keep_load
        alive[rows, merged] = False
        in_merged = item_part == merged[:, None]
        item_bin = np.where(in_merged, np.take_along_axis(bin_map, item_bin, axis=1), item_bin)
        item_part = np.where(in_merged, keep[:, None], item_part)
    by_bin = np.argsort(item_bin, axis=1, kind="stable")
    return by_bin.reshape(num_rows, num_bins, num_parts)


def gather_slots(values: np.ndarray, slot_item: np.ndarray) -> np.ndarray:
    """values [X, N] indexed by slot_item [X, G, S] -> [X, G, S]."""
    num_rows = values.shape[0]
    flat = np.take_along_axis(values, slot_item.reshape(num_rows, -1), axis=1)
    return flat.reshape(slot_item.shape)


def holdings(expert: np.ndarray, num_logical: int) -> np.ndarray:
    """How many replicas of each expert each GPU holds: expert [X, G, S] -> [X, G, E] int64."""
    num_rows, num_gpus, _ = expert.shape
    bin_key = (np.arange(num_rows * num_gpus) * num_logical).reshape(num_rows, num_gpus, 1)
    held = np.bincount((bin_key + expert).ravel(), minlength=num_rows * num_gpus * num_logical)
    return held.reshape(num_rows, num_gpus, num_logical)


def repair_duplicates(size: np.ndarray, expert: np.ndarray, node_of_gpu: np.ndarray) -> None:
    """Move away second replicas of an expert sharing a GPU, in place, where a swap allows it.

    Each duplicate is swapped with the closest-sized replica on another GPU of the same node
    that holds neither expert (same node, so every expert keeps its home-node replica).
    Duplicates are rare after ``differencing_assign``: this loops in Python over those that exist.
    """
    num_rows, num_gpus, slots = expert.shape
    if slots < 2:
        return
    ordered = np.sort(expert, axis=2)
    has_dup = (ordered[:, :, 1:] == ordered[:, :, :-1]).any(axis=2)
    for row in np.unique(np.nonzero(has_dup)[0]):
        held = holdings(expert[row : row + 1], int(expert[row].max()) + 1)[0]  # [G, E]
        for gpu in np.nonzero(has_dup[row])[0]:
            for slot in range(slots):
                e = expert[row, gpu, slot]
                if held[gpu, e] < 2:
                    continue
                # Partner slots: same node, their GPU lacks e, their expert is not on `gpu`.
                partner_ok = (
                    (node_of_gpu == node_of_gpu[gpu])[:, None]
                    & (held[:, e] == 0)[:, None]
                    & (held[gpu][expert[row]] == 0)
                )
                if not partner_ok.any():
                    continue
                gap = np.where(partner_ok, np.abs(size[row] - size[row, gpu, slot]), np.inf)
                other_gpu, other_slot = np.unravel_index(int(np.argmin(gap)), gap.shape)
                f = expert[row, other_gpu, other_slot]
                held[gpu, e] -= 1
                held[other_gpu, f] -= 1
                held[gpu, f] += 1
                held[other_gpu, e] += 1
                for array in (size, expert):
                    a = array[row, gpu, slot].copy()
                    array[row, gpu, slot] = array[row, other_gpu, other_slot]
                    array[row, other_gpu, other_slot] = a


def refine_by_swaps(
    size: np.ndarray,
    expert: np.ndarray,
    node_of_gpu: np.ndarray,
    home_node: np.ndarray | None,
    target_max: np.ndarray,
    swap_budget: np.ndarray | None = None,
    candidates: int = 6,
    max_rounds: int = 400,
) -> np.ndarray:
    """Lower each row's heaviest GPU by swapping one of its replicas with a lighter GPU's, in place.

    Each round, in every row still above ``target_max`` [X], the heaviest GPU is compared with
    the ``candidates`` lightest GPUs and the single swap that minimises the larger of the two new
    loads is applied, if it lowers the heaviest load. A swap never puts two replicas of an expert
    on one GPU and never takes an expert's last replica off its home node (``home_node`` [X, E],
    None when there is one node). Rows stop when they reach their target, run out of
    ``swap_budget`` [X], or no swap helps. Returns the swaps made per row [X].
    """
    num_rows, num_gpus, slots = size.shape
    swaps = np.zeros(num_rows, dtype=np.int64)
    if num_gpus < 2:
        return swaps
    num_logical = int(expert.max()) + 1
    held = holdings(expert, num_logical)
    num_nodes = int(node_of_gpu.max()) + 1
    multi_node = home_node is not None and num_nodes > 1
    if multi_node:
        node_held = np.zeros((num_rows, num_nodes, num_logical), dtype=np.int64)
        for node in range(num_nodes):
            node_held[:, node] = held[:, node_of_gpu == node].sum(axis=1)
    budget = np.full(num_rows, np.iinfo(np.int64).max) if swap_budget is None else swap_budget
    k = min(candidates, num_gpus - 1)
    load = size.sum(axis=2)
    active = np.nonzero((load.max(axis=1) > target_max) & (budget > 0))[0]
    for _ in range(max_rounds):
        if active.size == 0:
            break
        n = active.size
        r = np.arange(n)
        row_load = load[active]
        heavy = np.argmax(row_load, axis=1)
        light = np.argpartition(row_load, k - 1, axis=1)[:, :k]
        # The heaviest GPU is among the "lightest" only when loads tie; any other GPU will do.
        light = np.where(light == heavy[:, None], (heavy[:, None] + 1) % num_gpus, light)
        rows_light = active[:, None]
        a_size = size[active, heavy]  # [n, S]
        a_expert = expert[active, heavy]
        b_size = size[rows_light, light]  # [n, k, S]
        b_expert = expert[rows_light, light]
        delta = a_size[:, None, :, None] - b_size[:, :, None, :]  # [n, k, Sa, Sb]
        heavy_load = row_load[r, heavy]
        light_load = row_load[r[:, None], light]
        worse = np.maximum(
            heavy_load[:, None, None, None] - delta, light_load[:, :, None, None] + delta
        )
        valid = delta > 0
        if slots > 1:
            light_has_a = held[rows_light[:, :, None], light[:, :, None], a_expert[:, None, :]] > 0
            heavy_has_b = held[rows_light[:, :, None], heavy[:, None, None], b_expert] > 0
            valid &= ~light_has_a[:, :, :, None] & ~heavy_has_b[:, :, None, :]
        if multi_node:
            assert home_node is not None
            heavy_node = node_of_gpu[heavy]  # [n]
            light_node = node_of_gpu[light]  # [n, k]
            rows_e = active[:, None]
            a_leaves_ok = (np.take_along_axis(home_node[active], a_expert, axis=1) != heavy_node[:, None]) | (
                node_held[rows_e, heavy_node[:, None], a_expert] >= 2
            )  # [n, S]
            b_home = home_node[rows_e[:, :, None], b_expert]  # [n, k, S]
            b_leaves_ok = (b_home != light_node[:, :, None]) | (
                node_held[rows_light[:, :, None], light_node[:, :, None], b_expert] >= 2
            )
            same_node = (heavy_node[:, None] == light_node)[:, :, None, None]
            valid &= same_node | (a_leaves_ok[:, None, :, None] & b_leaves_ok[:, :, None, :])
        worse = np.where(valid, worse, np.inf).reshape(n, -1)
        best = np.argmin(worse, axis=1)
        improves = worse[r, best] < heavy_load * (1.0 - 1e-12)
        if not improves.any():
            break
        pick = np.nonzero(improves)[0]
        rows = active[pick]
        cand, slot_a, slot_b = np.unravel_index(best[pick], (k, slots, slots))
        gpu_a = heavy[pick]
        gpu_b = light[pick, cand]
        size_a = size[rows, gpu_a, slot_a]
        size_b = size[rows, gpu_b, slot_b]
        expert_a = expert[rows, gpu_a, slot_a]
        expert_b = expert[rows, gpu_b, slot_b]
        held[rows, gpu_a, expert_a] -= 1
        held[rows, gpu_b, expert_b] -= 1
        held[rows, gpu_a, expert_b] += 1
        held[rows, gpu_b, expert_a] += 1
        if multi_node:
            node_a, node_b = node_of_gpu[gpu_a], node_of_gpu[gpu_b]
            node_held[rows, node_a, expert_a] -= 1
            node_held[rows, node_b, expert_b] -= 1
            node_held[rows, node_a, expert_b] += 1
            node_held[rows, node_b, expert_a] += 1
        size[rows, gpu_a, slot_a] = size_b
        size[rows, gpu_b, slot_b] = size_a
        expert[rows, gpu_a, slot_a] = expert_b
        expert[rows, gpu_b, slot_b] = expert_a
        load[rows, gpu_a] -= size_a - size_b
        load[rows, gpu_b] += size_a - size_b
        swaps[rows] += 1
        still = (load[rows].max(axis=1) > target_max[rows]) & (swaps[rows] < budget[rows])
        active = rows[still]
    return swaps

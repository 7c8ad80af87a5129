"""Replica shares: how an expert's tokens split over its replicas.

An expert with several replicas need not split its tokens evenly: routing sends each replica a
*share* (``Placement.share`` [L, P], summing to 1 over an expert's slots), so the replicas of
the hot experts act as pipes between GPUs and a placement can be rebalanced without moving a
weight. Shares are realised by the routing tables (``route_tables``): an expert with unequal
shares gets ``ROUTE_TICKETS`` table entries, slot ``p`` holding ``share[p] * ROUTE_TICKETS``
of them, and token ``t``'s ``j``-th choice takes entry ``(t + j) mod length``; with equal
shares the table is the expert's slots once each, what routing did before shares existed.

- ``fit_shares``: for fixed slots, the shares that minimise the largest GPU load. Per expert the
  best split of its load over its GPUs, given every other load, fills the lightest GPUs to a
  common level (water-filling); sweeping the experts until nothing changes minimises the sum of
  squared GPU loads (block coordinate descent on a convex function over a product of simplices),
  whose minimiser also has the least possible largest load. The shares are then rounded to
  whole tickets (``round_shares``).

Placement policies do not produce shares yet (every policy returns equal shares); a placement
file may carry them (``moe-eplb plan --shares``), and the worker's routing honours them.
"""

from __future__ import annotations

import numpy as np

from .jit import njit, prange, row_kernel
from .placement import Placement
from .quality import gpu_loads

ROUTE_TICKETS = 128  # routing-table entries of an expert whose replicas have unequal shares
MAX_SWEEPS = 200  # water-filling sweeps per fit (they stop once nothing changes)
QUICK_SWEEPS = 8  # sweeps that rank a candidate move
STEP_SWEEPS = 32  # sweeps after each move (the final shares get a full fit)
LIGHT_GPUS = 6  # how many of the lightest GPUs a move may reach from the heaviest one
REFIT_CANDIDATES = 8  # moves per step whose estimate is checked by a short refit


@njit
def _fit_layer(weight, phy2log, slots_per_gpu, share, gpu_load, sweeps=MAX_SWEEPS):  # type: ignore[no-untyped-def]
    """Refit one layer's shares [P] in place (from their current values, each expert's summing
    to 1) with at most ``sweeps`` sweeps; writes the GPU loads [G]."""
    num_physical = phy2log.size
    num_logical = weight.size
    gpu_load[:] = 0.0
    count = np.zeros(num_logical, np.int64)
    for slot in range(num_physical):
        count[phy2log[slot]] += 1
        gpu_load[slot // slots_per_gpu] += weight[phy2log[slot]] * share[slot]
    start = np.zeros(num_logical + 1, np.int64)
    for expert in range(num_logical):
        start[expert + 1] = start[expert] + count[expert]
    fill = start[:-1].copy()
    slots = np.empty(num_physical, np.int64)
    for slot in range(num_physical):  # each expert's slots, in slot (so GPU) order
        slots[fill[phy2log[slot]]] = slot
        fill[phy2log[slot]] += 1
    gpus = np.empty(num_physical, np.int64)
    carried = np.empty(num_physical)
    base = np.empty(num_physical)
    per_gpu = np.empty(num_physical, np.int64)
    tolerance = 1e-9 * max(weight.sum(), 1e-300) / max(num_physical, 1)
    for _ in range(sweeps):
        change = 0.0
        for expert in range(num_logical):
            load = weight[expert]
            if count[expert] < 2 or load <= 0.0:
                continue
            k = 0  # the expert's distinct GPUs, what it carries on each
            for i in range(start[expert], start[expert + 1]):
                gpu = slots[i] // slots_per_gpu
                if k > 0 and gpus[k - 1] == gpu:
                    carried[k - 1] += load * share[slots[i]]
                    per_gpu[k - 1] += 1
                else:
                    gpus[k] = gpu
                    carried[k] = load * share[slots[i]]
                    per_gpu[k] = 1
                    k += 1
            if k < 2:
                continue
            for i in range(k):
                base[i] = gpu_load[gpus[i]] - carried[i]
            ordered = np.sort(base[:k])
            level = 0.0
            total = 0.0
            for m in range(1, k + 1):  # fill the m lightest to a common level
                total += ordered[m - 1]
                level = (load + total) / m
                if m == k or level <= ordered[m]:
                    break
            for i in range(k):
                amount = max(level - base[i], 0.0)
                change = max(change, abs(amount - carried[i]))
                gpu_load[gpus[i]] = base[i] + amount
                carried[i] = amount
            j = 0
            for i in range(start[expert], start[expert + 1]):
                gpu = slots[i] // slots_per_gpu
                while gpus[j] != gpu:
                    j += 1
                share[slots[i]] = carried[j] / per_gpu[j] / load
        if change <= tolerance:
            break


@njit
def _equal_shares(phy2log, num_logical, share):  # type: ignore[no-untyped-def]
    count = np.zeros(num_logical, np.int64)
    for slot in range(phy2log.size):
        count[phy2log[slot]] += 1
    for slot in range(phy2log.size):
        share[slot] = 1.0 / count[phy2log[slot]]


@row_kernel("fit_share_rows", "f8[:,::1](f8[:,::1], i8[:,::1], i8)")
def _fit_share_rows(weight, phy2log, slots_per_gpu):  # type: ignore[no-untyped-def]
    """Shares [L, P] minimising each layer's largest GPU load, for fixed ``phy2log`` [L, P]."""
    num_layers, num_physical = phy2log.shape
    share = np.empty((num_layers, num_physical))
    gpu_load = np.empty((num_layers, num_physical // slots_per_gpu))
    for row in prange(num_layers):
        _equal_shares(phy2log[row], weight.shape[1], share[row])
        _fit_layer(weight[row], phy2log[row], slots_per_gpu, share[row], gpu_load[row])
    return share


@njit
def _holds(phy2log, slots_per_gpu, gpu, expert):  # type: ignore[no-untyped-def]
    for slot in range(gpu * slots_per_gpu, (gpu + 1) * slots_per_gpu):
        if phy2log[slot] == expert:
            return True
    return False


@njit
def _new_copies(phy2log, slots_per_gpu, origin, gpus, experts):  # type: ignore[no-untyped-def]
    """How many of the (GPU, expert) pairs [4] are held now and were not in ``origin``."""
    moved = 0
    for i in range(gpus.size):
        if not origin[gpus[i], experts[i]] and _holds(phy2log, slots_per_gpu, gpus[i], experts[i]):
            moved += 1
    return moved


@njit
def _leave_expert(share, phy2log, slot):  # type: ignore[no-untyped-def]
    """Slot ``slot`` stops carrying its expert: the expert's other slots take its share."""
    expert = phy2log[slot]
    rest = 1.0 - share[slot]
    others = 0
    for p in range(phy2log.size):
        if phy2log[p] == expert and p != slot:
            others += 1
    for p in range(phy2log.size):
        if phy2log[p] == expert and p != slot:
            share[p] = share[p] / rest if rest > 1e-12 else 1.0 / others
    share[slot] = 0.0


@njit
def _apply_move(phy2log, share, kind, a, b):  # type: ignore[no-untyped-def]
    """kind 1: slot ``b`` becomes a replica of slot ``a``'s expert (share 0 until refitted);
    kind 2: slots ``a`` and ``b`` swap experts, each share going with its replica."""
    if kind == 1:
        _leave_expert(share, phy2log, b)
        phy2log[b] = phy2log[a]
    else:
        phy2log[a], phy2log[b] = phy2log[b], phy2log[a]
        share[a], share[b] = share[b], share[a]


@njit
def _estimate(weight, phy2log, slots_per_gpu, share, load, kind, a, b):  # type: ignore[no-untyped-def]
    """The larger of the two GPUs' loads after a move (and, for a relabel, of the GPU taking the
    relabelled expert's share), estimated without a refit: a swap moves the two replicas with
    their shares; a relabel lets the new replica take up to what its expert carries on the
    heaviest GPU (evening the two), and the relabelled expert's share goes to its lightest
    other GPU. Other GPUs as heavy as the heaviest (shares even them out) are left to the
    refit."""
    heaviest, light = a // slots_per_gpu, b // slots_per_gpu
    carried_a = weight[phy2log[a]] * share[a]
    carried_b = weight[phy2log[b]] * share[b]
    if kind == 2:
        return max(load[heaviest] - carried_a + carried_b, load[light] + carried_a - carried_b)
    shift = min(carried_a, max(load[heaviest] - load[light] + carried_b, 0.0) / 2)
    other = np.inf
    for slot in range(phy2log.size):
        if slot != b and phy2log[slot] == phy2log[b]:
            other = min(other, load[slot // slots_per_gpu])
    return max(load[heaviest] - shift, load[light] - carried_b + shift, other + carried_b)


@njit
def _share_moves_layer(  # type: ignore[no-untyped-def]
    weight, phy2log, slots_per_gpu, origin, target_max, budget, trace, peaks
):
    """Greedy moves on one layer, ``phy2log`` [P] changed in place, shares refitted after
    each: until the largest GPU load is <= ``target_max``, ``budget`` copies are moved, or no
    move lowers it. A move is a swap between the heaviest GPU and one of the ``LIGHT_GPUS``
    lightest, or a relabel of a spare replica on one of those into a replica of one of the
    heaviest GPU's experts. Candidates are ranked by an estimate (``_estimate``) per copy
    moved; the best ``REFIT_CANDIDATES`` are refitted briefly and the one that lowers the peak
    most per copy is made. ``trace`` [K, 4] gets one row per step: (copies moved so far,
    kind, slot a, slot b), ``peaks`` [K + 1] the largest GPU load before the first and after
    each. Returns the number of steps."""
    num_physical = phy2log.size
    num_gpus = num_physical // slots_per_gpu
    num_logical = weight.size
    share = np.empty(num_physical)
    load = np.empty(num_gpus)
    _equal_shares(phy2log, num_logical, share)
    _fit_layer(weight, phy2log, slots_per_gpu, share, load, STEP_SWEEPS)
    peaks[0] = load.max()
    trial_share = np.empty(num_physical)
    trial_load = np.empty(num_gpus)
    count = np.zeros(num_logical, np.int64)
    gpus = np.empty(4, np.int64)
    experts = np.empty(4, np.int64)
    pick_score = np.empty(REFIT_CANDIDATES)
    pick = np.empty((REFIT_CANDIDATES, 4), np.int64)  # kind, a, b, copies moved after
    moved = 0
    steps = 0
    while steps < trace.shape[0]:
        heaviest = np.argmax(load)
        peak = load[heaviest]
        if peak <= target_max or moved >= budget:
            break
        order = np.argsort(load)
        count[:] = 0
        for slot in range(num_physical):
            count[phy2log[slot]] += 1
        pick_score[:] = 0.0
        for rank in range(min(LIGHT_GPUS, num_gpus)):
            light = order[rank]
            if light == heaviest:
                continue
            for a in range(heaviest * slots_per_gpu, (heaviest + 1) * slots_per_gpu):
                ea = phy2log[a]
                if _holds(phy2log, slots_per_gpu, light, ea):
                    continue
                for b in range(light * slots_per_gpu, (light + 1) * slots_per_gpu):
                    eb = phy2log[b]
                    for kind in (1, 2):
                        if kind == 1 and count[eb] < 2:
                            continue  # a relabel takes a spare replica only
                        if kind == 2 and _holds(phy2log, slots_per_gpu, heaviest, eb):
                            continue
                        estimate = _estimate(
                            weight, phy2log, slots_per_gpu, share, load, kind, a, b
                        )
                        if estimate >= peak:
                            continue
                        gpus[0], experts[0] = light, ea
                        gpus[1], experts[1] = light, eb
                        gpus[2], experts[2] = heaviest, ea
                        gpus[3], experts[3] = heaviest, eb
                        before = _new_copies(phy2log, slots_per_gpu, origin, gpus, experts)
                        if kind == 1:
                            phy2log[b] = ea
                        else:
                            phy2log[a], phy2log[b] = eb, ea
                        after = _new_copies(phy2log, slots_per_gpu, origin, gpus, experts)
                        phy2log[a], phy2log[b] = ea, eb
                        if moved + after - before > budget:
                            continue
                        score = (peak - estimate) / max(after - before, 0.5)
                        worst = np.argmin(pick_score)
                        if score > pick_score[worst]:
                            pick_score[worst] = score
                            pick[worst, 0], pick[worst, 1] = kind, a
                            pick[worst, 2], pick[worst, 3] = b, moved + after - before
        best_score = 0.0
        best = -1
        for i in range(REFIT_CANDIDATES):
            if pick_score[i] <= 0.0:
                continue
            kind, a, b = pick[i, 0], pick[i, 1], pick[i, 2]
            ea, eb = phy2log[a], phy2log[b]
            trial_share[:] = share
            _apply_move(phy2log, trial_share, kind, a, b)
            _fit_layer(weight, phy2log, slots_per_gpu, trial_share, trial_load, QUICK_SWEEPS)
            phy2log[a], phy2log[b] = ea, eb
            gain = peak - trial_load.max()
            score = gain / max(pick[i, 3] - moved, 0.5)
            if gain > 1e-9 * peak and score > best_score:
                best_score, best = score, i
        if best < 0:
            break
        _apply_move(phy2log, share, pick[best, 0], pick[best, 1], pick[best, 2])
        _fit_layer(weight, phy2log, slots_per_gpu, share, load, STEP_SWEEPS)
        moved = pick[best, 3]
        trace[steps, 0] = moved
        trace[steps, 1] = pick[best, 0]
        trace[steps, 2] = pick[best, 1]
        trace[steps, 3] = pick[best, 2]
        peaks[steps + 1] = load.max()
        steps += 1
    return steps


@row_kernel(
    "share_move_rows",
    "i8[::1](f8[:,::1], i8[:,::1], i8, b1[:,:,::1], f8[::1], i8[::1], i8[:,:,::1], f8[:,::1])",
)
def _share_move_rows(weight, phy2log, slots_per_gpu, origin, target_max, budget, trace, peaks):  # type: ignore[no-untyped-def]
    """``_share_moves_layer`` on every row (layer) of ``phy2log`` [L, P], in place; ``trace``
    [L, K, 4], ``peaks`` [L, K + 1]. Returns the steps taken per row [L]."""
    steps = np.zeros(phy2log.shape[0], np.int64)
    for row in prange(phy2log.shape[0]):
        steps[row] = _share_moves_layer(
            weight[row],
            phy2log[row],
            slots_per_gpu,
            origin[row],
            target_max[row],
            budget[row],
            trace[row],
            peaks[row],
        )
    return steps


def share_moves(
    weight: np.ndarray,
    phy2log: np.ndarray,
    num_gpus: int,
    origin: np.ndarray,
    target_max: np.ndarray,
    budget: np.ndarray,
    max_steps: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run the greedy share-aware moves on a copy of ``phy2log`` [L, P]; ``origin`` [L, G, E]
    the previous placement's (GPU, expert) pairs. Returns (the moved phy2log, trace
    [L, max_steps, 4]: per step the copies moved so far, kind, slots, -1 past the last; peaks
    [L, max_steps + 1]: the largest GPU load before the first step and after each, inf past
    the last)."""
    moved = np.ascontiguousarray(phy2log, dtype=np.int64).copy()
    trace = np.full((moved.shape[0], max_steps, 4), -1, dtype=np.int64)
    peaks = np.full((moved.shape[0], max_steps + 1), np.inf)
    _share_move_rows(
        np.ascontiguousarray(weight, dtype=np.float64),
        moved,
        moved.shape[1] // num_gpus,
        np.ascontiguousarray(origin, dtype=np.bool_),
        np.ascontiguousarray(target_max, dtype=np.float64),
        np.ascontiguousarray(budget, dtype=np.int64),
        trace,
        peaks,
    )
    return moved, trace, peaks


def replay(phy2log: np.ndarray, trace: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """``phy2log`` [L, P] after the first ``steps[l]`` moves of each layer's ``trace``."""
    out = np.array(phy2log, dtype=np.int64, copy=True)
    share = np.zeros(out.shape[1])  # the moves' slot changes do not depend on shares
    for layer in range(out.shape[0]):
        for step in range(int(steps[layer])):
            _, kind, a, b = trace[layer, step]
            _apply_move(out[layer], share, kind, a, b)
    return out


def round_shares(
    weight: np.ndarray,
    phy2log: np.ndarray,
    share: np.ndarray,
    num_gpus: int,
    tickets: int = ROUTE_TICKETS,
) -> np.ndarray:
    """Shares [L, P] rounded to what routing tables carry: an expert whose replicas share
    equally keeps 1 / count; any other gets whole ``tickets``ths, each
    slot its share rounded down, the tickets left one by one to the slot on the lightest GPU
    (heaviest experts first), so every expert's shares still sum to 1."""
    num_layers, num_physical = phy2log.shape
    num_logical = weight.shape[1]
    slots_per_gpu = num_physical // num_gpus
    gpu_of = np.arange(num_physical) // slots_per_gpu
    placement = Placement.from_phy2log(phy2log, num_logical)
    equal = placement.slot_share()
    rounded = equal.copy()
    for layer in range(num_layers):
        row = phy2log[layer]
        deviation = np.zeros(num_logical)
        np.maximum.at(deviation, row, np.abs(share[layer] - equal[layer]))
        uneven = deviation > 0.5 / tickets
        if not uneven.any():
            continue
        slots_uneven = uneven[row]
        rounded[layer, slots_uneven] = np.floor(share[layer, slots_uneven] * tickets) / tickets
        load = np.bincount(gpu_of, weights=weight[layer, row] * rounded[layer], minlength=num_gpus)
        for expert in sorted(np.flatnonzero(uneven), key=lambda e: -weight[layer, e]):
            slots = placement.log2phy[layer, expert, : placement.replica_count[layer, expert]]
            gpus = gpu_of[slots]
            for _ in range(int(round(tickets * (1.0 - rounded[layer, slots].sum())))):
                pick = int(np.argmin(load[gpus]))
                rounded[layer, slots[pick]] += 1.0 / tickets
                load[gpus[pick]] += weight[layer, expert] / tickets
    return rounded


def optimal_shares(weight: np.ndarray, placement: Placement, num_gpus: int) -> np.ndarray:
    """The shares [L, P] that minimise every layer's largest GPU load for ``weight`` [L, E] on
    ``placement``'s slots (unrounded)."""
    weight = np.ascontiguousarray(weight, dtype=np.float64)
    phy2log = np.ascontiguousarray(placement.phy2log, dtype=np.int64)
    if phy2log.shape[0] == 0:
        return np.zeros(phy2log.shape)
    return np.asarray(_fit_share_rows(weight, phy2log, placement.num_physical // num_gpus))


def fit_shares(weight: np.ndarray, placement: Placement, num_gpus: int) -> Placement:
    """``placement`` with the shares that minimise every layer's largest GPU load for
    ``weight`` [L, E], rounded to routing tickets; a layer where the rounded shares would be
    no better than equal ones keeps equal shares."""
    weight = np.asarray(weight, dtype=np.float64)
    if placement.num_layers == 0:
        return placement
    equal = placement.with_share(None)
    rounded = round_shares(
        weight, placement.phy2log, optimal_shares(weight, placement, num_gpus), num_gpus
    )
    shared = equal.with_share(rounded)
    keep = gpu_loads(weight, shared, num_gpus).max(axis=1) >= gpu_loads(
        weight, equal, num_gpus
    ).max(axis=1)
    rounded[keep] = equal.slot_share()[keep]
    return equal.with_share(rounded)


@njit
def _interleave(slots, tickets, out):  # type: ignore[no-untyped-def]
    """Fill ``out`` [sum(tickets)] with ``slots`` [k], slot i ``tickets[i]`` times, each next
    entry to the slot furthest behind its due count (every prefix within one of it)."""
    total = tickets.sum()
    given = np.zeros(slots.size, np.int64)
    for entry in range(total):
        pick = -1
        most = -np.inf
        for i in range(slots.size):
            if given[i] < tickets[i]:
                behind = (entry + 1) * tickets[i] / total - given[i]
                if behind > most:
                    most = behind
                    pick = i
        out[entry] = slots[pick]
        given[pick] += 1


def route_tables(
    placement: Placement, layers: range | list[int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Routing tables of ``layers`` (default every layer), one row per layer asked: (table
    [len(layers), E, W] int64, -1 padded; length [len(layers), E]).

    An expert with equal shares lists its slots once (length = its replica count); one with
    unequal shares lists slot p ``share[p] * ROUTE_TICKETS`` times, interleaved (each next
    entry goes to the slot furthest behind its share), so consecutive tokens spread over the
    replicas. W is the longest table."""
    rows = np.arange(placement.num_layers) if layers is None else np.asarray(list(layers), int)
    log2phy, count = placement.log2phy[rows], placement.replica_count[rows]
    if placement.share is None:
        return log2phy.copy(), count.copy()
    table = np.full(log2phy.shape[:2] + (max(log2phy.shape[2], ROUTE_TICKETS),), -1, np.int64)
    table[:, :, : log2phy.shape[2]] = log2phy
    length = count.copy()
    share = np.where(log2phy >= 0, placement.share[rows[:, None, None], log2phy], 0.0)
    equal = np.where(log2phy >= 0, 1.0 / np.maximum(count, 1)[:, :, None], 0.0)
    for row, expert in zip(*np.nonzero((np.abs(share - equal) > 1e-9).any(axis=2)), strict=True):
        slots = log2phy[row, expert, : count[row, expert]]
        tickets = np.rint(share[row, expert, : slots.size] * ROUTE_TICKETS).astype(np.int64)
        _interleave(slots, tickets, table[row, expert, : int(tickets.sum())])
        length[row, expert] = int(tickets.sum())
    return table, length


def shares_from_tables(table: np.ndarray, length: np.ndarray, phy2log: np.ndarray) -> np.ndarray:
    """The shares [L, P] that routing tables ([L, E, W], [L, E]) realise."""
    num_layers, num_physical = phy2log.shape
    used = np.arange(table.shape[2])[None, None, :] < length[:, :, None]
    layer = np.broadcast_to(np.arange(num_layers)[:, None, None], table.shape)[used]
    weight = np.broadcast_to((1.0 / np.maximum(length, 1))[:, :, None], table.shape)[used]
    share = np.zeros((num_layers, num_physical))
    np.add.at(share, (layer, table[used]), weight)
    return share

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


def round_shares(
    weight: np.ndarray, phy2log: np.ndarray, share: np.ndarray, num_gpus: int, tickets: int = 0
) -> np.ndarray:
    """Shares [L, P] rounded to what routing tables carry: an expert whose replicas share
    equally keeps 1 / count; any other gets whole ``tickets``ths (``ROUTE_TICKETS``), each
    slot its share rounded down, the tickets left one by one to the slot on the lightest GPU
    (heaviest experts first), so every expert's shares still sum to 1."""
    tickets = tickets or ROUTE_TICKETS
    num_layers, num_physical = phy2log.shape
    slots_per_gpu = num_physical // num_gpus
    rounded = np.array(share, dtype=np.float64, copy=True)
    for layer in range(num_layers):
        row = phy2log[layer]
        order = np.argsort(row, kind="stable")
        bounds = np.flatnonzero(np.r_[True, row[order][1:] != row[order][:-1], True])
        groups = [order[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
        uneven = []
        for slots in groups:
            part = share[layer, slots] / max(share[layer, slots].sum(), 1e-300)
            if slots.size < 2 or np.allclose(part, 1.0 / slots.size, rtol=0, atol=0.5 / tickets):
                rounded[layer, slots] = 1.0 / slots.size
            else:
                rounded[layer, slots] = np.floor(part * tickets) / tickets
                uneven.append(slots)
        load = np.bincount(
            np.arange(num_physical) // slots_per_gpu,
            weights=weight[layer, row] * rounded[layer],
            minlength=num_gpus,
        )
        uneven.sort(key=lambda slots: -weight[layer, row[slots[0]]])
        for slots in uneven:
            expert_load = weight[layer, row[slots[0]]]
            gpus = slots // slots_per_gpu
            for _ in range(int(round(tickets * (1.0 - rounded[layer, slots].sum())))):
                pick = int(np.argmin(load[gpus]))
                rounded[layer, slots[pick]] += 1.0 / tickets
                load[gpus[pick]] += expert_load / tickets
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


def route_tables(placement: Placement) -> tuple[np.ndarray, np.ndarray]:
    """Routing tables of every layer: (table [L, E, W] int64, -1 padded; length [L, E]).

    An expert with equal shares lists its slots once (length = its replica count); one with
    unequal shares lists slot p ``share[p] * ROUTE_TICKETS`` times, interleaved (each next
    entry goes to the slot furthest behind its share), so consecutive tokens spread over the
    replicas. W is the longest table."""
    log2phy, count = placement.log2phy, placement.replica_count
    if placement.share is None:
        return log2phy.copy(), count.copy()
    num_layers, num_logical, _ = log2phy.shape
    width = max(log2phy.shape[2], ROUTE_TICKETS)
    table = np.full((num_layers, num_logical, width), -1, dtype=np.int64)
    length = count.copy()
    table[:, :, : log2phy.shape[2]] = log2phy
    for layer, expert in zip(*np.nonzero(count > 1), strict=True):
        slots = log2phy[layer, expert, : count[layer, expert]]
        part = placement.share[layer, slots]
        if np.allclose(part, 1.0 / slots.size, rtol=0, atol=1e-9):
            continue
        tickets = np.rint(part * ROUTE_TICKETS).astype(np.int64)
        given = np.zeros(slots.size)
        for entry in range(ROUTE_TICKETS):
            behind = (entry + 1) * tickets / ROUTE_TICKETS - given
            pick = int(np.argmax(np.where(given < tickets, behind, -np.inf)))
            table[layer, expert, entry] = slots[pick]
            given[pick] += 1
        length[layer, expert] = ROUTE_TICKETS
    return table, length


def shares_from_tables(table: np.ndarray, length: np.ndarray, phy2log: np.ndarray) -> np.ndarray:
    """The shares [L, P] that routing tables ([L, E, W], [L, E]) realise."""
    num_layers, num_physical = phy2log.shape
    share = np.zeros((num_layers, num_physical))
    for layer in range(num_layers):
        for expert in np.flatnonzero(length[layer] > 0):
            entries = table[layer, expert, : length[layer, expert]]
            np.add.at(share[layer], entries, 1.0 / length[layer, expert])
    return share

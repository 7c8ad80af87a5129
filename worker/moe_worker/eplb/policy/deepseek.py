"""The ``deepseek`` policy: DeepSeek EPLB's semantics, re-implemented (vectorised over layers).

Hierarchical when ``num_groups % num_nodes == 0``: expert groups are packed onto nodes, experts
are replicated inside each node, and the node's replicas are packed onto its GPUs. Otherwise the
same procedure runs with one group and one node (global). Kept as the baseline the other
policies are measured against; its packing may place two replicas of an expert on one GPU.
"""

from __future__ import annotations

import numpy as np

from .packing import greedy_pack
from .placement import Placement


def _replicate(weight: np.ndarray, num_slots: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Give each extra slot to the expert with the largest load per replica.

    ``weight`` [X, n] -> (slot -> expert [X, num_slots], replica rank of the slot [X, num_slots],
    replica count [X, n]). Slot i < n holds expert i.
    """
    num_rows, num_experts = weight.shape
    rows = np.arange(num_rows)
    slot_expert = np.empty((num_rows, num_slots), dtype=np.int64)
    slot_expert[:, :num_experts] = np.arange(num_experts)
    slot_rank = np.zeros((num_rows, num_slots), dtype=np.int64)
    count = np.ones((num_rows, num_experts), dtype=np.int64)
    for slot in range(num_experts, num_slots):
        expert = np.argmax(weight / count, axis=1)
        slot_expert[:, slot] = expert
        slot_rank[:, slot] = count[rows, expert]
        count[rows, expert] += 1
    return slot_expert, slot_rank, count


def _inverse(permutation: np.ndarray) -> np.ndarray:
    """Row-wise inverse of a permutation [X, N]."""
    inverse = np.empty_like(permutation)
    np.put_along_axis(
        inverse, permutation, np.broadcast_to(np.arange(permutation.shape[1]), permutation.shape), 1
    )
    return inverse


def _hierarchical(
    weight: np.ndarray, num_physical: int, num_groups: int, num_nodes: int, num_gpus: int
) -> np.ndarray:
    """DeepSeek's three-step hierarchical placement. Returns phy2log [L, P]."""
    num_layers, num_logical = weight.shape
    group_size = num_logical // num_groups
    groups_per_node = num_groups // num_nodes
    experts_per_node = num_logical // num_nodes
    slots_per_node = num_physical // num_nodes
    slots_per_gpu = num_physical // num_gpus

    # 1. Groups onto nodes. "mlog" numbers experts node by node (node-major logical ids).
    group_load = weight.reshape(num_layers, num_groups, group_size).sum(axis=2)
    group_node, group_position = greedy_pack(group_load, num_nodes)
    first_mlog_of_group = (group_node * groups_per_node + group_position) * group_size
    log2mlog = (first_mlog_of_group[:, :, None] + np.arange(group_size)).reshape(num_layers, -1)
    mlog2log = _inverse(log2mlog)

    # 2. Replicate inside each node (rows = (layer, node)).
    mlog_load = np.take_along_axis(weight, mlog2log, axis=1).reshape(-1, experts_per_node)
    slot_mlog, _, mlog_count = _replicate(mlog_load, slots_per_node)

    # 3. Pack each node's replicas onto its GPUs.
    replica_load = np.take_along_axis(mlog_load / mlog_count, slot_mlog, axis=1)
    gpu_of, position = greedy_pack(replica_load, num_gpus // num_nodes)
    packed_slot = gpu_of * slots_per_gpu + position
    slot_of_packed = _inverse(packed_slot)
    packed_mlog = np.take_along_axis(slot_mlog, slot_of_packed, axis=1)
    node_offset = (np.arange(num_nodes) * experts_per_node)[None, :, None]
    packed_mlog = (packed_mlog.reshape(num_layers, num_nodes, -1) + node_offset).reshape(
        num_layers, -1
    )
    return np.take_along_axis(mlog2log, packed_mlog, axis=1)


def deepseek_policy(
    weight: np.ndarray,
    num_physical: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    previous: Placement | None = None,
) -> Placement:
    """DeepSeek EPLB placement; ``previous`` is ignored (no migration awareness)."""
    weight = np.asarray(weight, dtype=np.float64)
    if num_groups % num_nodes == 0:
        phy2log = _hierarchical(weight, num_physical, num_groups, num_nodes, num_gpus)
    else:
        phy2log = _hierarchical(weight, num_physical, 1, 1, num_gpus)
    return Placement.from_phy2log(phy2log, weight.shape[1])

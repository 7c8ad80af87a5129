"""numNodes reaches placement: four gloo ranks of the routing-simulator engine on two "nodes"
(NODE_NAME per rank) rebalance with node-aware placement, every expert group with a home node
holding a replica of each of its experts; ranks
whose nodes interleave fall back to flat placement with a warning."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest

from distributed import run_ranks

CONFIG: dict[str, Any] = {
    "epSize": 4,
    "numNodes": 2,
    "device": "cpu",
    "model": {
        "numLayers": 2,
        "hiddenSize": 16,
        "numExperts": 16,
        "topK": 2,
        "intermediateSize": 8,
        "numExpertGroups": 4,
        "topkGroups": 2,
    },
    "eplb": {
        "numRedundantExperts": 8,
        "windowSize": 32,
        "stepInterval": 100000,
        "useAsync": False,
        "policy": "balanced",
        "communicator": "torch_gloo",
    },
    "workload": {"tokensPerStep": 64},
}


def rebalanced(rank: int, world: int, nodes: list[str]) -> tuple[tuple[int, int], Any]:
    from moe_worker.config import WorkerConfig
    from moe_worker.engine import create_engine

    os.environ["NODE_NAME"] = nodes[rank]
    engine = create_engine(WorkerConfig.model_validate(CONFIG), rank, world)
    for _ in range(8):
        engine.step()
    assert engine.eplb is not None
    result = engine.eplb.rebalance_now("manual")
    assert result.result == "ok", result
    layout = engine.eplb.placement_layout()
    return (layout.num_groups, layout.num_nodes), engine.eplb.models["main"].state.phy2log


@pytest.mark.parametrize(
    ("nodes", "expected"),
    [(["a", "a", "b", "b"], (4, 2)), (["a", "b", "a", "b"], (4, 1))],
    ids=["consecutive", "interleaved"],
)
def test_placement_packs_expert_groups_onto_the_ranks_nodes(
    nodes: list[str], expected: tuple[int, int]
) -> None:
    results = run_ranks(rebalanced, 4, nodes)
    assert [layout for layout, _ in results] == [expected] * 4
    phy2log = np.asarray(results[0][1])
    assert all(np.array_equal(np.asarray(r[1]), phy2log) for r in results)
    slots = phy2log.shape[1] // 4
    node_of_slot = (np.arange(phy2log.shape[1]) // slots) // 2  # ranks 0-1: node 0
    experts_per_group = 16 // 4
    homed = []  # per (layer, group): some node holds a replica of every expert of the group
    for layer in range(phy2log.shape[0]):
        for group in range(4):
            members = range(group * experts_per_group, (group + 1) * experts_per_group)
            nodes_of = [set(node_of_slot[phy2log[layer] == e].tolist()) for e in members]
            homed.append(bool(set.intersection(*nodes_of)))
    assert sorted(np.unique(phy2log).tolist()) == list(range(16)), "every expert placed"
    if expected[1] == 2:
        assert all(homed), "each expert group has a home node holding all its experts"
    else:
        assert not all(homed), "flat placement (this load, this seed) splits some group"

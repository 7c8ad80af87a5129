"""Where the ranks sit, for node-aware placement: a pure decision over the ranks' node names.

Node-aware placement (``num_nodes`` > 1 in ``compute_placement``) packs expert groups onto
nodes so a token's grouped top-k stays on few nodes; it takes node ``n`` to hold the ranks
``[n R, (n + 1) R)``, ``R`` = EP size / nodes. ``nodes_in_use`` checks that against the nodes
the ranks report (the pods' ``spec.nodeName``) and answers the node count placement may assume.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    """What node-aware placement needs: the model's expert groups (its grouped top-k), and
    the nodes the ranks span (ranks of a node consecutive)."""

    num_groups: int = 1
    num_nodes: int = 1

    def at(self, world: int) -> Layout:
        """This layout for ``world`` ranks: flat when they do not split evenly over the nodes."""
        return self if world % self.num_nodes == 0 else Layout(self.num_groups, 1)


def nodes_in_use(declared: int, rank_nodes: Sequence[str]) -> tuple[int, str | None]:
    """(nodes, why not ``declared``) for the ranks whose nodes are ``rank_nodes`` (rank order;
    "" where a rank does not know its node).

    ``declared`` holds when no rank knows its node (a run outside Kubernetes: the spec is taken
    at its word) or when the ranks of each node are one consecutive block of ``world /
    declared``; otherwise placement goes flat (1 node) and the second item says why.
    """
    world = len(rank_nodes)
    if declared <= 1:
        return 1, None
    if world % declared:
        return 1, f"{world} ranks do not split evenly over {declared} nodes"
    if not any(rank_nodes):
        return declared, None
    unknown = [rank for rank, node in enumerate(rank_nodes) if not node]
    if unknown:
        return 1, f"rank {unknown[0]} does not know its node (NODE_NAME unset)"
    per_node = world // declared
    blocks = [tuple(rank_nodes[first : first + per_node]) for first in range(0, world, per_node)]
    for index, block in enumerate(blocks):
        if len(set(block)) != 1:
            first = index * per_node
            return 1, (
                f"ranks {first}-{first + per_node - 1} are on nodes {', '.join(sorted(set(block)))}"
                f"; node-aware placement needs each node's {per_node} ranks consecutive"
            )
    if len({block[0] for block in blocks}) != declared:
        return 1, f"the ranks are on fewer than numNodes = {declared} nodes"
    return declared, None

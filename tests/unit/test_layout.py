"""Node-aware placement's layout: which node count the ranks' reported nodes bear out."""

from __future__ import annotations

from moe_worker.eplb.layout import Layout, nodes_in_use


def test_declared_nodes_hold_when_each_node_has_a_consecutive_block() -> None:
    assert nodes_in_use(2, ["a", "a", "b", "b"]) == (2, None)
    assert nodes_in_use(4, ["n1", "n2", "n3", "n4"]) == (4, None)
    assert nodes_in_use(1, ["a", "b"]) == (1, None)  # flat was asked for


def test_outside_kubernetes_the_spec_is_taken_at_its_word() -> None:
    assert nodes_in_use(2, ["", "", "", ""]) == (2, None)


def test_interleaved_or_missing_nodes_go_flat_and_say_why() -> None:
    nodes, why = nodes_in_use(2, ["a", "b", "a", "b"])
    assert nodes == 1 and why is not None and "ranks 0-1 are on nodes a, b" in why
    nodes, why = nodes_in_use(2, ["a", "a", "a", "a"])
    assert nodes == 1 and why is not None and "fewer than numNodes = 2" in why
    nodes, why = nodes_in_use(2, ["a", "", "b", "b"])
    assert nodes == 1 and why is not None and "rank 1 does not know its node" in why
    nodes, why = nodes_in_use(2, ["a", "a", "b"])
    assert nodes == 1 and why is not None and "3 ranks do not split evenly" in why


def test_a_layout_at_a_size_that_does_not_split_goes_flat() -> None:
    assert Layout(8, 2).at(4) == Layout(8, 2)
    assert Layout(8, 2).at(3) == Layout(8, 1)

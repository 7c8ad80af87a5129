"""The one overall balancedness: the share of a step spent on balanced work."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from moe_worker.eplb.policy import (
    Placement,
    balancedness,
    layer_balancedness,
    overall_balancedness,
    worst_layer_balancedness,
)
from moe_worker.metrics import WorkerMetrics

# Four layers on four ranks, equal work per layer; the last puts it all on rank 0.
RANK_LOAD = np.array([[1.0, 1.0, 1.0, 1.0]] * 3 + [[4.0, 0.0, 0.0, 0.0]])


def test_a_bad_layer_the_mean_over_layers_hides_weighs_as_it_slows_the_step() -> None:
    per_layer = RANK_LOAD.mean(axis=1) / RANK_LOAD.max(axis=1)
    assert per_layer.tolist() == [1.0, 1.0, 1.0, 0.25]
    assert per_layer.mean() == pytest.approx(0.8125)  # what the mean over layers would say
    # What the step loses: each layer waits for its busiest rank.
    useful_over_step = RANK_LOAD.mean(axis=1).sum() / RANK_LOAD.max(axis=1).sum()
    assert useful_over_step == pytest.approx(4 / 7)
    assert overall_balancedness(per_layer) == pytest.approx(useful_over_step)
    assert worst_layer_balancedness(per_layer) == 0.25
    assert overall_balancedness(np.array([])) == 1.0


def test_the_planner_and_the_metric_use_the_same_definition() -> None:
    # Experts 0..3 each on their own rank (one slot per rank): the same loads as above.
    placement = Placement.from_phy2log(np.tile(np.arange(4), (4, 1)), 4)
    weight = RANK_LOAD  # [L, E]: expert e's load = rank e's
    assert layer_balancedness(weight, placement, 4).tolist() == [1.0, 1.0, 1.0, 0.25]
    assert balancedness(weight, placement, 4) == pytest.approx(4 / 7)
    metrics = WorkerMetrics("demo", 0, "torch_gloo", "incremental", True)
    metrics.set_balancedness(layer_balancedness(weight, placement, 4))
    samples = {
        sample.name: sample.value
        for family in text_string_to_metric_families(metrics.exposition().decode())
        for sample in family.samples
    }
    assert samples["moe_balancedness"] == pytest.approx(4 / 7)
    assert samples["moe_balancedness_worst_layer"] == 0.25

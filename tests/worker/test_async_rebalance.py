"""Asynchronous rebalancing on CPU ranks: equal to sync, correct throughout, safe under faults."""

from __future__ import annotations

import numpy as np
import torch

from async_cases import TOKENS, async_rebalance_run, sync_rebalance_run
from distributed import run_ranks
from ep_cases import REBALANCE_CONFIG
from moe_worker.config import ModelConfig
from moe_worker.eplb.policy import default_placement
from moe_worker.model.experts import SyntheticSource
from moe_worker.model.moe import dense_reference


def test_async_equals_sync_and_commits_layer_by_layer() -> None:
    world = 2
    sync = run_ranks(sync_rebalance_run, world)
    runs = run_ranks(async_rebalance_run, world, "none")
    for rank in range(world):
        assert runs[rank]["result"] == "ok"
        assert np.array_equal(runs[rank]["final"], sync[rank]["final"])
        assert runs[rank]["wrong"] == [] and sync[rank]["wrong"] == []
        assert runs[rank]["generation"] == 1
    # Every rank saw the same maps at every step, and layers switched one at a time.
    assert all(np.array_equal(a, b) for a, b in zip(runs[0]["maps"], runs[1]["maps"], strict=True))
    initial = default_placement(2, 12, 16).phy2log
    changed = [int((m != initial).any(axis=1).sum()) for m in runs[0]["maps"]]
    assert changed == sorted(changed) and changed[-1] >= 1


def test_outputs_match_reference_while_rebalancing() -> None:
    world = 2
    runs = run_ranks(async_rebalance_run, world, "none", 30.0, False)
    source = SyntheticSource(ModelConfig.model_validate(REBALANCE_CONFIG))
    hidden = torch.randn(
        (TOKENS * world, source.config.hidden_size), generator=torch.Generator().manual_seed(9)
    )
    reference = [
        dense_reference(source, layer, hidden) for layer in range(source.config.num_layers)
    ]
    assert len(runs[0]["outputs"]) >= 2, "steps ran during the rebalance"
    for step in range(len(runs[0]["outputs"])):
        for layer in range(source.config.num_layers):
            got = torch.from_numpy(
                np.concatenate([runs[r]["outputs"][step][layer] for r in range(world)])
            )
            torch.testing.assert_close(got, reference[layer], rtol=1e-5, atol=1e-6)


def test_a_rank_raising_aborts_everywhere_and_keeps_the_old_mapping() -> None:
    runs = run_ranks(async_rebalance_run, 2, "raise")
    initial = default_placement(2, 12, 16).phy2log
    assert {r["result"] for r in runs} <= {"aborted", "failed"}
    assert runs[1]["result"] == "failed" and "injected" in runs[1]["error"]
    for run in runs:
        assert run["committed"] == 0
        assert np.array_equal(run["final"], initial)
        assert run["wrong"] == []


def test_a_stalled_rank_passes_the_deadline_and_everyone_abandons_together() -> None:
    deadline = 3.0
    runs = run_ranks(async_rebalance_run, 2, "stall", deadline)
    initial = default_placement(2, 12, 16).phy2log
    assert [r["result"] for r in runs] == ["aborted", "aborted"]
    assert runs[0]["committed"] == runs[1]["committed"] == 1, "layer 0 committed before the stall"
    for run in runs:
        assert run["seconds"] < deadline + 10
        assert np.array_equal(run["final"][1], initial[1]), "uncommitted layer keeps the old map"
        assert not np.array_equal(run["final"][0], initial[0])
        assert run["wrong"] == [], "each layer's weights match its maps"
    assert np.array_equal(runs[0]["final"], runs[1]["final"])


def test_a_rank_exiting_does_not_hang_the_others() -> None:
    deadline = 3.0
    runs = run_ranks(async_rebalance_run, 2, "exit", deadline, may_die=(1,))
    initial = default_placement(2, 12, 16).phy2log
    for run in runs[:1]:
        assert run["result"] in {"aborted", "failed"}
        assert run["seconds"] < 3 * deadline + 10
        assert run["committed"] == 0 and np.array_equal(run["final"], initial)

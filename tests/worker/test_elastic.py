"""Elastic EP: live resize 2 -> 4 -> 2 and recovery from a killed rank (the leader included),
outputs checked.

Every rank runs with ``checkOutputs``: each step's output is compared with a dense
single-process forward of the same batch, so "outputs equal the reference" is measured on every
step before, during and after each switch.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from moe_worker.elastic import (
    ElasticError,
    Topology,
    adoption_topology,
    recovery_maps,
    resize_placement,
    resize_problem,
)
from moe_worker.eplb.planner import apply_plan_to_contents, plan_layer
from moe_worker.eplb.policy import Placement, default_placement
from rank_processes import RankProcesses, http

CONFIG: dict[str, Any] = {
    "deployment": "elastic-test",
    "steps": 0,
    "checkOutputs": True,
    "model": {"numExperts": 8, "numLayers": 2, "hiddenSize": 16, "intermediateSize": 8, "topK": 2},
    # 2 ranks x 5 slots: 2 redundant; at 4 ranks the same 5 slots per rank give 12 redundant.
    "eplb": {"numRedundantExperts": 2, "windowSize": 20, "stepInterval": 25, "useAsync": True},
    "workload": {"kind": "drift", "tokensPerStep": 32, "driftPeriod": 80},
    "elastic": {"collectiveTimeoutS": 20, "replacementTimeoutS": 60},
    "metrics": {"updateInterval": 5},
}


# --- decisions -----------------------------------------------------------------------------


def test_resize_problem_names_the_field_and_rule() -> None:
    assert resize_problem(4, 2, 5, 8) is None
    assert "must be >= 1" in (resize_problem(0, 2, 5, 8) or "")
    assert "cannot hold all 8 experts" in (resize_problem(1, 2, 5, 8) or "")
    assert "already 2" in (resize_problem(2, 2, 5, 8) or "")
    with_draft = resize_problem(4, 2, 5, 8, has_draft=True) or ""
    assert with_draft.startswith("model.draft: elastic resizes are not supported")


@pytest.mark.parametrize("old_world,new_world", [(2, 4), (4, 2), (2, 3), (3, 2)])
def test_resize_placement_keeps_slots_per_rank_and_every_expert(
    old_world: int, new_world: int
) -> None:
    slots, experts, layers = 5, 8, 2
    current = default_placement(layers, experts, old_world * slots)
    load = np.random.default_rng(1).random((layers, experts)) * 100
    new = resize_placement(current, load, slots, new_world)
    assert new.phy2log.shape == (layers, new_world * slots)
    for layer in range(layers):
        assert set(new.phy2log[layer]) == set(range(experts))
        plan = plan_layer(current.phy2log[layer], new.phy2log[layer], slots)
        contents = apply_plan_to_contents(current.phy2log[layer], plan, slots, new_world)
        assert (contents == new.phy2log[layer]).all(), "the moves produce the new placement"
        # Surviving ranks keep what the new map leaves in place: no move into a kept slot.
        assert all(t.dst_rank < new_world for t in plan.transfers)


def test_recovery_maps_mark_lost_slots_and_plan_reloads_only_for_unreplicated_experts() -> None:
    slots = 5
    mapped = np.array([[0, 1, 2, 3, 4, 5, 6, 7, 0, 1]])  # rank 1 holds 5, 6, 7 alone
    held = {0: mapped[:, :slots]}
    old, new = recovery_maps(held, mapped, world=2, slots_per_rank=slots)
    assert (old[0, slots:] == -1).all() and (new == mapped).all()
    plan = plan_layer(old[0], new[0], slots)
    assert sorted(r.expert for r in plan.reloads) == [5, 6, 7]
    assert sorted(t.expert for t in plan.transfers) == [0, 1]
    assert all(t.src_rank == 0 and t.dst_rank == 1 for t in plan.transfers)
    contents = apply_plan_to_contents(old[0], plan, slots, 2)
    assert (contents == new[0]).all()


def test_adoption_topology_takes_the_survivors_back_and_marks_the_leader_lost() -> None:
    slots = 4
    mapped = np.array([[0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3], [7, 6, 5, 4, 3, 2, 1, 0, 7, 6, 5, 4]])

    def report(rank: int, step: int) -> dict:
        held = mapped[:, rank * slots : (rank + 1) * slots]
        return {"generation": 2, "world": 3, "step": step, "mappingGeneration": 5,
                "mapped": mapped.tolist(), "held": held.tolist()}  # fmt: skip

    topology = adoption_topology({1: report(1, 40), 2: report(2, 41)}, slots)
    assert topology.generation == 3 and topology.kind == "recover" and topology.world == 3
    assert topology.lost_ranks == (0,) and topology.start_step == 40
    assert topology.mapping_generation == 6
    old, new = np.asarray(topology.old_phy2log), np.asarray(topology.new_phy2log)
    assert (old[:, :slots] == -1).all() and (old[:, slots:] == mapped[:, slots:]).all()
    assert (new == mapped).all(), "the replacement leader gets exactly what rank 0 held"
    # Two dead (rank 0 and rank 2): both lost; survivors that disagree are refused.
    assert adoption_topology({1: report(1, 40)}, slots).lost_ranks == (0, 2)
    other = {**report(2, 41), "generation": 1}
    with pytest.raises(ElasticError, match="different generations"):
        adoption_topology({1: report(1, 40), 2: other}, slots)


def test_topology_round_trips_through_json() -> None:
    placement = default_placement(2, 8, 10)
    topology = Topology(
        3,
        2,
        120,
        "recover",
        previous_world=2,
        lost_ranks=(1,),
        mapping_generation=4,
        old_phy2log=placement.phy2log.tolist(),
        new_phy2log=placement.phy2log.tolist(),
    )
    again = Topology.from_json(topology.to_json())
    assert again == topology and again.transfer_world == 2
    assert isinstance(again.placement(8), Placement)


# --- processes -----------------------------------------------------------------------------


def steps_of(ranks: RankProcesses) -> int:
    return int(ranks.state()["step"])


def test_live_resizes_two_four_two_three_keep_outputs_equal_and_close_their_channels(
    tmp_path: Path,
) -> None:
    ranks = RankProcesses(tmp_path, CONFIG, world=2)
    try:
        ranks.start(0)
        ranks.start(1)
        ranks.wait(lambda: ranks.readyz(0)[0] == 200 and ranks.readyz(1)[0] == 200, what="ready")
        ranks.wait(lambda: steps_of(ranks) >= 30, what="30 steps at EP 2")
        code, body = ranks.control("POST", "/v1/ep/resize", {"epSize": 4})
        assert code == 409 and "[2, 3]" in body["error"], "joiners have not registered"
        assert ranks.control("POST", "/v1/ep/resize", {"epSize": 1})[0] == 422
        assert ranks.control("POST", "/v1/ep/resize", {"size": 4})[0] == 422

        ranks.start(2)
        ranks.start(3)
        for rank in (2, 3):
            ranks.wait(
                lambda rank=rank: ranks.readyz(rank)[1].get("status") == "standby",
                what=f"rank {rank} on standby",
            )
        assert ranks.state()["epSize"] == 2
        code, body = ranks.control("POST", "/v1/ep/resize", {"epSize": 4, "reason": "test"})
        assert code == 202, body
        state = ranks.wait(
            lambda: (
                (s := ranks.state())["epSize"] == 4 and s["resize"]["phase"] == "committed" and s
            ),
            what="EP 4 committed",
        )
        assert state["topologyGeneration"] == 1 and state["resize"]["fromEpSize"] == 2
        at_four = steps_of(ranks)
        ranks.wait(lambda: steps_of(ranks) >= at_four + 30, what="30 steps at EP 4")

        ranks.expected_exits |= {2, 3}
        code, body = ranks.control("POST", "/v1/ep/resize", {"epSize": 2})
        assert code == 202, body
        retired = [ranks.summary(rank) for rank in (2, 3)]
        assert all(s["retired"] and s["topologyGeneration"] == 2 for s in retired)
        state = ranks.wait(
            lambda: (s := ranks.state())["epSize"] == 2 and s["topologyGeneration"] == 2 and s,
            what="EP 2 committed",
        )
        at_two = steps_of(ranks)
        ranks.wait(lambda: steps_of(ranks) >= at_two + 30, what="30 steps back at EP 2")

        ranks.expected_exits.discard(2)
        ranks.start(2)  # a third resize: 2 -> 3
        ranks.wait(lambda: ranks.readyz(2)[1].get("status") == "standby", what="rank 2 again")
        assert ranks.control("POST", "/v1/ep/resize", {"epSize": 3})[0] == 202
        state = ranks.wait(
            lambda: (s := ranks.state())["epSize"] == 3 and s["topologyGeneration"] == 3 and s,
            what="EP 3 committed",
        )
        # Every generation's channels (and each resize's move channels) were closed: only the
        # current generation's are open after three resizes. 4 generations + 3 moves opened.
        assert state["eplbChannels"] == {"backend": "torch_gloo", "open": 1, "opened": 7}
        # The config says "auto"; the info metric names the backend in use.
        code, exposition = http("GET", f"http://127.0.0.1:{ranks.metrics_port}/metrics")
        assert code == 200 and 'communicator="torch_gloo"' in exposition, exposition[:300]
        at_three = steps_of(ranks)
        ranks.wait(lambda: steps_of(ranks) >= at_three + 30, what="30 steps at EP 3")
    finally:
        ranks.stop()
    survivors = [ranks.summary(rank) for rank in (0, 1, 2)]
    for summary in survivors + retired:
        assert summary["outputMismatches"] == 0, summary
        assert summary["recoveries"] == 0, "no step failed"
    assert all(s["outputsChecked"] >= 90 and s["epSize"] == 3 for s in survivors[:2])
    assert survivors[2]["outputsChecked"] >= 25 and survivors[2]["epSize"] == 3
    assert all(s["outputsChecked"] >= 25 for s in retired), "the joiners served at EP 4"


def serve_then_kill(ranks: RankProcesses, rank: int, noticed: Callable[[], bool]) -> None:
    """Two ranks serve 30 steps; ``rank`` is SIGKILLed and, once ``noticed()``, started again
    (a restarted pod keeps its ordinal and address)."""
    ranks.start(0)
    ranks.start(1)
    ranks.wait(lambda: steps_of(ranks) >= 30, what="30 steps")
    ranks.expected_exits.add(rank)
    ranks.kill(rank)
    ranks.wait(noticed, what="the death noticed")
    ranks.expected_exits.discard(rank)
    ranks.start(rank)


def test_killed_rank_is_replaced_and_every_expert_restored(tmp_path: Path) -> None:
    ranks = RankProcesses(tmp_path, CONFIG, world=2)
    try:
        serve_then_kill(ranks, 1, lambda: ranks.state()["resize"].get("phase") == "recovering")
        state = ranks.wait(
            lambda: (s := ranks.state())["recoveries"] == 1 and s["topologyGeneration"] == 1 and s,
            what="recovered",
        )
        assert state["resize"]["lostRanks"] == [1]
        at = steps_of(ranks)
        ranks.wait(lambda: steps_of(ranks) >= at + 30, what="30 steps after recovery")
    finally:
        ranks.stop()
    leader, replacement = ranks.summary(0), ranks.summary(1)
    assert leader["outputMismatches"] == 0 and replacement["outputMismatches"] == 0
    assert replacement["outputsChecked"] >= 25 and leader["recoveries"] == 1


def test_killed_leader_restarts_and_takes_the_survivor_back(tmp_path: Path) -> None:
    """Rank 0 hosts the store: the survivor reconnects to its restart, which adopts it."""
    ranks = RankProcesses(tmp_path, CONFIG, world=2)
    try:
        serve_then_kill(ranks, 0, lambda: "the leader is gone" in ranks.log(1))
        state = ranks.wait(lambda: (s := ranks.state())["topologyGeneration"] == 1 and s, 60)
        assert state["resize"]["lostRanks"] == [0] and state["resize"]["kind"] == "recover"
        at = steps_of(ranks)
        ranks.wait(lambda: steps_of(ranks) >= at + 30, what="30 steps after the adoption")
    finally:
        ranks.stop()
    leader, survivor = ranks.summary(0), ranks.summary(1)
    assert survivor["recoveries"] == 1 and survivor["topologyGeneration"] == 1
    assert leader["topologyGeneration"] == 1 and leader["epSize"] == 2
    assert leader["outputMismatches"] == 0 and survivor["outputMismatches"] == 0
    assert leader["outputsChecked"] >= 25 and survivor["outputsChecked"] >= 50


def test_a_rank_that_fails_on_its_own_exits_and_the_others_recover(tmp_path: Path) -> None:
    """Rank 1's step raises an out-of-memory error (not communication): rank 1 says so and exits
    non-zero without starting the recovery protocol; rank 0 finds it gone at its next collective
    (within the collective timeout) and recovers once the pod's replacement starts."""
    faulty = [sys.executable, str(Path(__file__).resolve().parents[1] / "faulty_rank.py"), "40"]
    ranks = RankProcesses(tmp_path, CONFIG, world=2)
    try:
        ranks.start(0)
        ranks.expected_exits.add(1)
        ranks.start(1, faulty)
        process = ranks.processes[1]
        ranks.wait(lambda: process.poll() is not None, what="rank 1 to exit")
        exited_at = time.monotonic()
        assert process.returncode != 0
        log = ranks.log(1)
        assert "failed on this rank (OutOfMemoryError" in log, log
        assert "generation 0 failed" not in log, "no recovery on a false premise"
        ranks.wait(
            lambda: ranks.state()["resize"].get("phase") == "recovering",
            CONFIG["elastic"]["collectiveTimeoutS"] + 10,
            "rank 0 to notice",
        )
        assert time.monotonic() - exited_at <= CONFIG["elastic"]["collectiveTimeoutS"] + 10
        ranks.expected_exits.discard(1)
        ranks.start(1)  # the pod restarts it
        state = ranks.wait(lambda: (s := ranks.state())["recoveries"] == 1 and s, 120, "recovery")
        assert state["resize"]["lostRanks"] == [1]
    finally:
        ranks.stop()

"""The local runtime's record of each action: what the leader answered and when it was done."""

from __future__ import annotations

from moe_operator.policy import Decision, Snapshot
from moe_operator.runtime.local import (
    Timeline,
    finish_resize,
    progress_line,
    settle_remaps,
)


def snapshot(generation: int) -> Snapshot:
    return Snapshot(taken_at=0.0, ep_size=2, balancedness=0.8, rank_tokens_per_s=(10.0, 30.0),
                    mapping_generation=generation)  # fmt: skip


def test_a_refused_remap_stays_refused_and_an_accepted_one_is_done_when_the_map_moves() -> None:
    timeline = Timeline()
    refused = timeline.add(snapshot(4), Decision("remap", "balancedness 0.80 < 0.9"), 2)
    accepted = timeline.add(snapshot(4), Decision("remap", "balancedness 0.80 < 0.9"), 2)
    assert refused is not None and accepted is not None
    assert timeline.add(snapshot(4), Decision("none", "balanced enough"), 2) is None
    refused["outcome"] = "failed: the leader answered 500: boom"  # as actuator.remap says
    accepted["outcome"] = "accepted"
    settle_remaps(timeline.actions, snapshot(4), 5.0)  # the map has not moved yet
    assert accepted["outcome"] == "accepted" and accepted["finished_t"] is None
    settle_remaps(timeline.actions, snapshot(5), 7.5)
    assert (accepted["outcome"], accepted["finished_t"]) == ("done", 7.5)
    assert refused["outcome"].startswith("failed") and refused["finished_t"] is None


def test_a_resize_is_done_or_failed_when_the_runtime_finishes_it() -> None:
    timeline = Timeline()
    first = timeline.add(snapshot(0), Decision("resize", "load high", target_ep_size=3), 2)
    second = timeline.add(snapshot(0), Decision("resize", "load high", target_ep_size=4), 3)
    assert first is not None and second is not None and second["to_ep_size"] == 4
    finish_resize(timeline.actions, "failed: rank 3 did not join", 20.0)
    assert second["outcome"] == "failed: rank 3 did not join" and second["finished_t"] == 20.0
    finish_resize(timeline.actions, "done", 30.0)
    assert (first["outcome"], first["finished_t"]) == ("done", 30.0)
    line = progress_line(snapshot(0), Decision("none", "ok"), timeline)
    assert "EP 2 balancedness 0.800 tokens/s/rank 20" in line and "actions done 1/2" in line

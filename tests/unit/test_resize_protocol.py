"""The live-resize protocol (pure): the order of pod changes and the leader's request."""

from __future__ import annotations

from pathlib import Path

import yaml
from hypothesis import assume, given
from hypothesis import strategies as st

from moe_operator.api import MoEDeployment
from moe_operator.resize import (
    ResizeObservation,
    begin,
    desired_pods,
    pods_for,
    pods_up,
    progress_from_status,
    progress_to_status,
    serving_ep_size,
    step,
)

ROOT = Path(__file__).resolve().parents[2]


def run(from_size: int, to_size: int, gpus: int) -> list[tuple[str, str]]:
    """Drive the protocol against a simulated cluster; returns (action, phase) per round."""
    progress = begin(from_size, to_size, 0.0)
    pods, leader, ready = pods_for(from_size, gpus), from_size, pods_for(from_size, gpus)
    trace = []
    for t in range(1, 30):
        action, progress = step(progress, ResizeObservation(ready, leader), gpus, float(t), 100.0)
        trace.append((action, progress.phase))
        if action == "set-pods":
            pods = (
                pods_for(progress.to_ep_size, gpus)
                if progress.phase == "pods-down"
                else max(pods, pods_for(progress.to_ep_size, gpus))
            )
            ready = pods  # the new pods come up on standby
        elif action == "post-resize":
            assert pods >= pods_for(max(from_size, to_size), gpus), "every rank has a pod"
            leader = to_size
        elif action == "done":
            assert leader == to_size and pods == pods_for(to_size, gpus)
            return trace
    raise AssertionError(f"did not finish: {trace}")


def test_scale_up_adds_pods_before_asking_the_leader() -> None:
    trace = run(2, 4, 1)
    assert [a for a, _ in trace] == ["set-pods", "post-resize", "done"]


def test_scale_down_asks_the_leader_before_removing_pods() -> None:
    trace = run(4, 2, 1)
    assert [a for a, _ in trace] == ["post-resize", "set-pods", "done"]


def test_scale_up_waits_for_ready_pods_and_for_the_leader() -> None:
    progress = begin(2, 4, 0.0)
    action, progress = step(
        progress, ResizeObservation(ready_pods=3, leader_ep_size=2), 1, 1.0, 60.0
    )
    assert action == "set-pods" and progress.phase == "pods-up"
    action, progress = step(progress, ResizeObservation(4, 2), 1, 2.0, 60.0)
    assert action == "post-resize" and progress.phase == "moving"
    action, progress = step(progress, ResizeObservation(4, None), 1, 3.0, 60.0)
    assert action == "wait", "leader busy resizing"
    action, _ = step(progress, ResizeObservation(4, 4), 1, 4.0, 60.0)
    assert action == "done"


def test_a_phase_past_its_deadline_fails() -> None:
    progress = begin(2, 4, 0.0)
    action, _ = step(progress, ResizeObservation(2, 2), 1, 61.0, 60.0)
    assert action == "failed"


@given(st.integers(1, 8), st.integers(1, 8), st.sampled_from([1, 2, 4]).filter(lambda g: g <= 8))
def test_protocol_finishes_and_never_drops_a_serving_rank(a: int, b: int, gpus: int) -> None:
    assume(a != b)
    run(a * gpus, b * gpus, gpus)


def test_progress_round_trips_through_the_status() -> None:
    progress = begin(2, 4, 10.0)
    assert progress_from_status(progress_to_status(progress)) == progress
    assert progress_from_status(None) is None


def test_desired_pods_keeps_serving_ranks_until_a_scale_down_has_passed_its_request() -> None:
    document = yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())
    document["spec"]["parallelism"]["pods"] = 2
    spec = MoEDeployment.model_validate(document).spec
    assert serving_ep_size(spec, {}) == 2  # a fresh group forms at the elastic minimum
    assert desired_pods(spec, {"expertParallelSize": 4}) == 4, "still serving at 4"
    down = progress_to_status(begin(4, 2, 0.0))
    assert desired_pods(spec, {"expertParallelSize": 4, "resize": down}) == 4
    passed = {**down, "phase": "pods-down"}  # type: ignore[dict-item]
    assert desired_pods(spec, {"expertParallelSize": 2, "resize": passed}) == 2
    document["spec"]["elastic"] = {"enabled": False}
    fixed = MoEDeployment.model_validate(document).spec
    assert desired_pods(fixed, {"expertParallelSize": 4}) == 2, "without elastic: the spec's"


def test_pods_up_counts_whole_standby_pods_beside_the_ready_ones() -> None:
    # two ready pods of 2 GPUs serve ranks 0-3; pod 2 (ranks 4, 5) is on standby whole,
    # pod 3 has only rank 6 registered so far
    assert pods_up(2, [4, 5, 6], gpus_per_pod=2) == 3
    assert pods_up(2, [], gpus_per_pod=2) == 2
    assert pods_up(1, [1, 2], gpus_per_pod=1) == 3

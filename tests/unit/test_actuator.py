"""The operator's actions as one implementation (``actuator``) over a group of ranks: what a
remap and a live-resize round do for each answer of the leader, with an in-memory group (the
operator's KubeGroup and the local runtime's LocalPods are the real ones; the KMock and e2e
tests run them)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from moe_operator.actuator import advance_resize, remap
from moe_operator.resize import begin


@dataclass
class FakeGroup:
    """A leader answering from a script; pods counted, retiring ones recorded."""

    answers: dict[tuple[str, str], Any] = field(default_factory=dict)  # value or exception
    pods: int = 2
    up: int = 2
    retired_from: int | None = None
    calls: list[tuple[str, str, Any]] = field(default_factory=list)

    async def call_leader(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        self.calls.append((method, path, body))
        answer = self.answers[(method, path)]
        if isinstance(answer, BaseException):
            raise answer
        return answer  # type: ignore[no-any-return]

    async def pods_up(self, standby_ranks: list[int]) -> int:
        return self.up

    async def set_pods(self, count: int) -> None:
        self.pods = count

    async def retiring(self, keep: int) -> None:
        self.retired_from = keep


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


def test_remap_answers() -> None:
    group = FakeGroup({("POST", "/v1/eplb/rebalance"): (202, {"accepted": True})})
    assert run(remap(group, "low")).outcome == "accepted"
    group.answers[("POST", "/v1/eplb/rebalance")] = (409, {"error": "pending"})
    answer = run(remap(group, "low"))
    assert answer.ok and answer.outcome == "already running"
    group.answers[("POST", "/v1/eplb/rebalance")] = (500, {"error": "boom"})
    answer = run(remap(group, "low"))
    assert not answer.ok and "500" in answer.outcome
    group.answers[("POST", "/v1/eplb/rebalance")] = aiohttp.ClientConnectionError("refused")
    answer = run(remap(group, "low"))  # no exception escapes: the caller asks again later
    assert not answer.ok and "did not answer" in answer.outcome


def test_a_scale_down_request_the_leader_did_not_get_is_asked_again() -> None:
    state = (200, {"epSize": 4, "resizing": False, "standbyRanks": []})
    group = FakeGroup({("GET", "/v1/state"): state}, pods=4, up=4)
    progress = begin(4, 2, 0.0)
    group.answers[("POST", "/v1/ep/resize")] = aiohttp.ClientConnectionError("down")
    action, after, why = run(advance_resize(group, progress, 1, 1.0, 60.0))
    assert (action, after, why) == ("wait", progress, None)  # unchanged: retried next round
    assert group.retired_from is None, "nobody retires before the leader accepted"
    group.answers[("POST", "/v1/ep/resize")] = (202, {"accepted": True})
    action, after, why = run(advance_resize(group, progress, 1, 2.0, 60.0))
    assert action == "post-resize" and after.phase == "moving" and why is None
    assert group.retired_from == 2, "pods 2 and 3 leave"
    group.answers[("GET", "/v1/state")] = (200, {"epSize": 2, "resizing": False})
    action, after, _ = run(advance_resize(group, after, 1, 3.0, 60.0))
    assert action == "set-pods" and group.pods == 2
    action, _, _ = run(advance_resize(group, after, 1, 4.0, 60.0))
    assert action == "done"


def test_a_refused_resize_fails_with_the_leaders_answer_and_a_timeout_says_which_phase() -> None:
    state = (200, {"epSize": 2, "resizing": False, "standbyRanks": [2, 3]})
    group = FakeGroup({("GET", "/v1/state"): state}, pods=2, up=2)
    progress = begin(2, 4, 0.0)
    action, progress, _ = run(advance_resize(group, progress, 1, 1.0, 60.0))
    assert action == "set-pods" and group.pods == 4
    group.up = 4  # the new pods are up (their ranks on standby)
    group.answers[("POST", "/v1/ep/resize")] = (422, {"error": "epSize: cannot hold"})
    action, _, why = run(advance_resize(group, progress, 1, 2.0, 60.0))
    assert action == "failed" and why == "the leader answered 422: {'error': 'epSize: cannot hold'}"
    stuck = begin(2, 4, 0.0)
    group.up = 2  # the new pods never come up
    action, _, why = run(advance_resize(group, stuck, 1, 100.0, 60.0))
    assert action == "failed" and why is not None and "phase pods-up took over 60 s" in why

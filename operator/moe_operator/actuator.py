"""The operator's actions on a group of ranks, one implementation for a cluster and for the
local runtime: a remap, and one step of a live resize (the protocol of ``resize.py``).

``Group`` is the I/O: the leader's control API, which pods are up, the pod count. The
operator's is ``autopilot.KubeGroup`` (the StatefulSet and the leader behind the headless
Service); ``moe-eplb run``'s is ``runtime.local.LocalPods``. Both get the same answers to the
same events: a leader that cannot be reached leaves things as they were, to be tried again next
round, and never ends the caller.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

import aiohttp

from .errors import KubeError
from .resize import ResizeObservation, ResizeProgress, pods_for
from .resize import step as resize_step

# What a call to the leader may raise: no connection, no answer in time, a body that is not
# JSON, or (in a cluster) the control token's Secret not readable.
LEADER_ERRORS = (aiohttp.ClientError, TimeoutError, ValueError, KubeError)


class Group(Protocol):
    async def call_leader(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """One request to the leader's control API: (HTTP status, JSON body)."""

    async def pods_up(self, standby_ranks: list[int]) -> int:
        """Pods whose every rank is up: ready, or on standby (``standby_ranks``: the leader's
        list of ranks waiting to join)."""

    async def set_pods(self, count: int) -> None:
        """Run ``count`` pods (ordinals 0 .. count - 1), as a StatefulSet's replicas."""

    async def retiring(self, keep: int) -> None:
        """The pods from ordinal ``keep`` up are leaving the group (the leader accepted a
        smaller size): their ranks exit when done and are not to be restarted."""


@dataclass(frozen=True)
class Answer:
    """How the leader answered an action: ``ok`` (accepted, or already under way) or not, in
    words."""

    ok: bool
    outcome: str


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def remap(group: Group, reason: str) -> Answer:
    """Ask the leader for a rebalance."""
    try:
        code, body = await group.call_leader("POST", "/v1/eplb/rebalance", {"reason": reason})
    except LEADER_ERRORS as exc:
        return Answer(False, f"the leader did not answer ({_describe(exc)})")
    if code == 202:
        return Answer(True, "accepted")
    if code == 409:
        return Answer(True, "already running")
    return Answer(False, f"the leader answered {code}: {body}")


async def leader_state(group: Group) -> dict[str, Any] | None:
    """The leader's GET /v1/state, or None when it cannot be reached."""
    try:
        code, body = await group.call_leader("GET", "/v1/state")
    except LEADER_ERRORS:
        return None
    return body if code == 200 and isinstance(body, dict) else None


def serving_size(state: dict[str, Any] | None) -> int | None:
    """The EP size the leader serves at (None: unreachable, or a resize is under way)."""
    if state is None or state.get("resizing"):
        return None
    return int(state["epSize"])


ResizeAction = Literal["set-pods", "post-resize", "wait", "done", "failed"]


async def advance_resize(
    group: Group,
    progress: ResizeProgress,
    gpus_per_pod: int,
    now: float,
    phase_timeout_s: float,
    state: dict[str, Any] | None = None,
) -> tuple[ResizeAction, ResizeProgress, str | None]:
    """One round of a live resize: (the action taken, the progress after it, why it failed).

    ``state``: the leader's state when the caller has just read it. A resize request the leader
    did not receive (no connection) leaves the progress as it was, so the next round asks again.
    """
    if state is None:
        state = await leader_state(group)
    standby = [int(rank) for rank in (state or {}).get("standbyRanks") or []]
    observed = ResizeObservation(await group.pods_up(standby), serving_size(state))
    action, after = resize_step(progress, observed, gpus_per_pod, now, phase_timeout_s)
    target_pods = pods_for(after.to_ep_size, gpus_per_pod)
    if action == "set-pods":
        await group.set_pods(target_pods)
    elif action == "post-resize":
        try:
            code, body = await group.call_leader(
                "POST", "/v1/ep/resize", {"epSize": after.to_ep_size}
            )
        except LEADER_ERRORS:
            return "wait", progress, None  # not received: ask again next round
        if code not in (202, 409) and not (code == 422 and "already" in str(body)):
            return "failed", after, f"the leader answered {code}: {body}"
        if not after.up:
            await group.retiring(target_pods)
    elif action == "failed":
        why = (
            f"phase {after.phase} took over {phase_timeout_s:.0f} s; "
            "the group keeps serving at its size"
        )
        return action, after, why
    return action, after, None

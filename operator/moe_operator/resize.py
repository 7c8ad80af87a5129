"""The live-resize protocol between the pods and the leader's control API. Pure.

Scale up: raise the pods to the target, wait until the new pods are ready (a joining rank
reports ready while it waits on standby), then ask the leader to resize; done when the leader
serves at the target. Scale down: ask the leader first (retiring ranks hand their experts away
and exit), and lower the pods once the leader serves at the target.

``step`` maps the stored progress and what is observed now to the one action to take next and
the progress after it; the operator keeps the progress in ``status.resize`` (an operator restart
resumes it) and the local runtime in memory.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

Phase = Literal["pods-up", "request", "moving", "pods-down"]
Action = Literal["set-pods", "post-resize", "wait", "done", "failed"]


@dataclass(frozen=True)
class ResizeProgress:
    """A resize from ``from_ep_size`` to ``to_ep_size`` ranks, in ``phase`` since ``since``."""

    from_ep_size: int
    to_ep_size: int
    phase: Phase
    since: float
    started_at: float

    @property
    def up(self) -> bool:
        return self.to_ep_size > self.from_ep_size


@dataclass(frozen=True)
class Observed:
    """``ready_pods``: pods answering ready (standby included); ``leader_ep_size``: the EP
    size the leader reports serving (None when unreachable)."""

    ready_pods: int
    leader_ep_size: int | None


def pods_for(ep_size: int, gpus_per_pod: int) -> int:
    return -(-ep_size // gpus_per_pod)


def begin(from_ep_size: int, to_ep_size: int, now: float) -> ResizeProgress:
    phase: Phase = "pods-up" if to_ep_size > from_ep_size else "request"
    return ResizeProgress(from_ep_size, to_ep_size, phase, now, now)


def step(
    progress: ResizeProgress,
    observed: Observed,
    gpus_per_pod: int,
    now: float,
    timeout_s: float,
) -> tuple[Action, ResizeProgress]:
    """The next action: ``set-pods`` (to ``pods_for(target)``), ``post-resize``, ``wait``,
    ``done`` or ``failed`` (a phase outlived ``timeout_s``; the old size stays in force)."""
    target_pods = pods_for(progress.to_ep_size, gpus_per_pod)
    if now - progress.since > timeout_s:
        return "failed", progress
    if progress.phase == "pods-up":
        if observed.ready_pods >= target_pods:
            return "post-resize", replace(progress, phase="moving", since=now)
        return "set-pods", progress
    if progress.phase == "request":
        return "post-resize", replace(progress, phase="moving", since=now)
    if progress.phase == "moving":
        if observed.leader_ep_size != progress.to_ep_size:
            return "wait", progress
        if progress.up:
            return "done", progress
        return "set-pods", replace(progress, phase="pods-down", since=now)
    # pods-down: the retired ranks have left; the pods above the target go away.
    return "done", progress

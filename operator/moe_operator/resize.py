"""The live-resize protocol between the pods and the leader's control API. Pure.

Scale up: raise the pods to the target, wait until the new pods are up (ready, or on standby:
a joining rank is not ready, since it admits no requests, but the leader lists it among its
``standbyRanks``), then ask the leader to resize; done when the leader
serves at the target. Scale down: ask the leader first (retiring ranks hand their experts away
and exit), and lower the pods once the leader serves at the target.

``step`` maps the stored progress and what is observed now to the one action to take next and
the progress after it; the operator keeps the progress in ``status.resize`` (an operator restart
resumes it) and the local runtime in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from .api.models import MoEDeploymentSpec, ResizeStatus

Phase = Literal["pods-up", "request", "moving", "pods-down"]
Action = Literal["set-pods", "post-resize", "wait", "done", "failed"]


# The progress is the status model itself (one definition), kept in status.resize.
ResizeProgress = ResizeStatus


@dataclass(frozen=True)
class ResizeObservation:
    """``ready_pods``: pods that are up (ready, or every rank on standby; see ``pods_up``);
    ``leader_ep_size``: the EP size the leader reports serving (None when unreachable)."""

    ready_pods: int
    leader_ep_size: int | None


def pods_for(ep_size: int, gpus_per_pod: int) -> int:
    return -(-ep_size // gpus_per_pod)


def pods_up(ready_pods: int, standby_ranks: list[int], gpus_per_pod: int) -> int:
    """Pods up for a resize: the ``ready_pods`` (admitting) plus the pods whose every rank is
    among the leader's ``standby_ranks`` (registered to join; not ready, as they admit no
    requests yet)."""
    standby = set(standby_ranks)
    ordinals = {rank // gpus_per_pod for rank in standby}
    whole = [
        pod
        for pod in ordinals
        if all(pod * gpus_per_pod + local in standby for local in range(gpus_per_pod))
    ]
    return ready_pods + len(whole)


def begin(from_ep_size: int, to_ep_size: int, now: float) -> ResizeProgress:
    phase: Phase = "pods-up" if to_ep_size > from_ep_size else "request"
    return ResizeProgress(
        from_ep_size=from_ep_size, to_ep_size=to_ep_size, phase=phase, since=now, started_at=now
    )


def step(
    progress: ResizeProgress,
    observed: ResizeObservation,
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
            return "post-resize", progress.model_copy(update={"phase": "moving", "since": now})
        return "set-pods", progress
    if progress.phase == "request":
        return "post-resize", progress.model_copy(update={"phase": "moving", "since": now})
    if progress.phase == "moving":
        if observed.leader_ep_size != progress.to_ep_size:
            return "wait", progress
        if progress.up:
            return "done", progress
        return "set-pods", progress.model_copy(update={"phase": "pods-down", "since": now})
    # pods-down: the retired ranks have left; the pods above the target go away.
    return "done", progress


def progress_from_status(value: dict[str, Any] | None) -> ResizeProgress | None:
    return ResizeProgress.model_validate(dict(value)) if value else None


def progress_to_status(progress: ResizeProgress | None) -> dict[str, Any] | None:
    return None if progress is None else progress.model_dump(by_alias=True)


def serving_ep_size(spec: MoEDeploymentSpec, status: dict[str, Any]) -> int:
    """The EP size the group serves at: the last one the leader reported (status), else the
    size a fresh group starts at."""
    if spec.elastic.enabled:
        return int(status.get("expertParallelSize") or spec.base_ep_size)
    return spec.parallelism.expert_parallel_size


def desired_pods(spec: MoEDeploymentSpec, status: dict[str, Any]) -> int:
    """The StatefulSet's replicas. Without elastic: the spec's. With it: enough for the spec's
    size and for the ranks serving now, and for the old size until a scale-down has passed
    its request (so no serving rank's pod is removed before it hands its experts away)."""
    gpus = spec.parallelism.gpus_per_pod
    if not spec.elastic.enabled:
        return spec.parallelism.pods
    sizes = [spec.parallelism.expert_parallel_size, serving_ep_size(spec, status)]
    progress = progress_from_status(status.get("resize"))
    if progress is not None and progress.phase != "pods-down":
        sizes.append(progress.from_ep_size)
    return pods_for(max(sizes), gpus)

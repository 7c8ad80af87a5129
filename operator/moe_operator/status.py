"""Pure: the MoEDeployment status (phase, conditions, counts) from what the operator observed.

Conditions follow the Kubernetes convention: each has a type, a status ("True"/"False"), a
CamelCase reason, a message, the generation it was computed for, and the time of its last
transition (kept when the status does not change, so it says how long a state has lasted).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

from .resize import pods_for

METRICS_UNAVAILABLE = "MetricsUnavailable"
CONDITION_TYPES = ("Ready", "Progressing", "Degraded", "Rebalancing", "Resizing")


def now_rfc3339(now: datetime.datetime | None = None) -> str:
    moment = now or datetime.datetime.now(tz=datetime.UTC)
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def size_status(ep_size: int, gpus_per_pod: int) -> dict[str, int]:
    """The serving size as status records it: EP ranks and pods (the scale subresource's
    status replicas)."""
    return {"expertParallelSize": ep_size, "pods": pods_for(ep_size, gpus_per_pod)}


@dataclass(frozen=True)
class Observed:
    """What the operator saw this round.

    ``problem`` (reason, message) is set when the spec cannot be acted on or a call failed;
    ``pods_ready``/``pods_updated``/``pods_wanted`` come from the StatefulSet's status.
    """

    generation: int
    ep_size: int
    gpus_per_pod: int
    selector: str
    pods_wanted: int = 0
    pods_ready: int = 0
    pods_updated: int = 0
    sts_observed_generation: int | None = None
    sts_generation: int | None = None
    problem: tuple[str, str] | None = None
    resize: str | None = None  # a live resize in progress, in words
    endpoint: str | None = None  # the inference Service's URL


def set_condition(
    conditions: list[dict[str, Any]],
    kind: str,
    status: bool,
    reason: str,
    message: str,
    generation: int,
    now: str,
) -> list[dict[str, Any]]:
    """``conditions`` with ``kind`` set; lastTransitionTime moves only when status flips."""
    value = "True" if status else "False"
    previous = next((c for c in conditions if c.get("type") == kind), None)
    since = (
        previous["lastTransitionTime"]
        if previous is not None and previous.get("status") == value
        else now
    )
    updated = {
        "type": kind,
        "status": value,
        "reason": reason,
        "message": message,
        "lastTransitionTime": since,
        "observedGeneration": generation,
    }
    others = [c for c in conditions if c.get("type") != kind]
    return sorted([*others, updated], key=lambda c: CONDITION_TYPES.index(c["type"]))


def compute_status(observed: Observed, previous: dict[str, Any] | None, now: str) -> dict[str, Any]:
    """The status fields this round sets (phase, conditions, counts, selector)."""
    previous = previous or {}
    conditions = list(previous.get("conditions") or [])
    generation = observed.generation
    ready_ranks = observed.pods_ready * observed.gpus_per_pod
    if observed.problem is not None:
        reason, message = observed.problem
        conditions = set_condition(conditions, "Degraded", True, reason, message, generation, now)
        conditions = set_condition(
            conditions, "Ready", False, reason, "see the Degraded condition", generation, now
        )
        conditions = set_condition(
            conditions,
            "Progressing",
            False,
            reason,
            "waiting for a spec that can be acted on",
            generation,
            now,
        )
        return {
            "phase": "Degraded",
            "conditions": conditions,
            "observedGeneration": generation,
            "readyRanks": ready_ranks,
            "selector": observed.selector,
        }
    rolled_out = (
        observed.sts_generation is not None
        and observed.sts_observed_generation == observed.sts_generation
        and observed.pods_updated >= observed.pods_wanted
    )
    all_ready = observed.pods_ready >= observed.pods_wanted and rolled_out
    degraded: dict[str, Any] = next((c for c in conditions if c.get("type") == "Degraded"), {})
    if not (degraded.get("status") == "True" and degraded.get("reason") == METRICS_UNAVAILABLE):
        # One owner per reason: the autopilot's timer sets and clears MetricsUnavailable; a
        # reconcile round clearing it would flip the condition (and its Event) every resync.
        conditions = set_condition(conditions, "Degraded", False, "AsExpected", "", generation, now)
    if all_ready:
        conditions = set_condition(
            conditions,
            "Ready",
            True,
            "AllRanksReady",
            f"{ready_ranks}/{observed.ep_size} ranks ready",
            generation,
            now,
        )
        conditions = set_condition(
            conditions, "Progressing", False, "RolloutComplete", "", generation, now
        )
    else:
        waiting = (
            f"{ready_ranks}/{observed.ep_size} ranks ready, "
            f"{observed.pods_updated}/{observed.pods_wanted} pods updated"
        )
        conditions = set_condition(
            conditions, "Ready", False, "RanksNotReady", waiting, generation, now
        )
        conditions = set_condition(
            conditions, "Progressing", True, "RollingOut", waiting, generation, now
        )
    phase = "Running" if all_ready else "Pending"
    if observed.resize is not None:
        phase = "Resizing"
        conditions = set_condition(
            conditions, "Resizing", True, "LiveResize", observed.resize, generation, now
        )
    elif any(c.get("type") == "Resizing" for c in conditions):
        conditions = set_condition(conditions, "Resizing", False, "Stable", "", generation, now)
    return {
        "phase": phase,
        "conditions": conditions,
        "observedGeneration": generation,
        **size_status(observed.ep_size, observed.gpus_per_pod),
        "readyRanks": ready_ranks,
        "selector": observed.selector,
        "endpoint": observed.endpoint,
    }

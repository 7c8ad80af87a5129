"""Pure: (spec, policy memory, metrics snapshot, now) -> what the operator does next.

The memory (``PolicyMemory``) lives in the MoEDeployment's status, so an operator restart
resumes with the same timers. Rules:

- never act on missing or stale metrics (decision ``unavailable``: the caller sets Degraded with
  reason MetricsUnavailable), nor while a previous action is unfinished;
- remap when balancedness has stayed below the threshold for ``remap.sustainedSeconds`` and the
  last remap is older than ``remap.minIntervalSeconds``;
- resize one step (gpusPerPod x numNodes ranks) when the mean per-rank load has stayed outside
  ``[tokensPerRankLow, tokensPerRankHigh]`` for ``elastic.sustainedSeconds``, within min/max,
  with separate up/down cooldowns, and with hysteresis: scaling down must not put the per-rank
  load above ``high x HYSTERESIS`` at the smaller size (which would just scale it back up).

Resizes take precedence over remaps (a resize re-places every expert anyway).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .api.models import MoEDeploymentSpec, PendingActionStatus, PolicyStatus

HYSTERESIS = 0.8
Verb = Literal["none", "remap", "resize", "unavailable", "wait"]


@dataclass(frozen=True)
class Snapshot:
    """Metrics of one deployment at ``taken_at`` (seconds, same clock as ``now``).

    ``balancedness``: the overall balancedness (``moe_balancedness``: the harmonic mean over
    layers, ``moe_worker.eplb.policy.overall_balancedness``; None when unknown);
    ``rank_tokens_per_s``: tokens/s of
    each rank (by rank index); ``rebalancing``: some rank is rebalancing now.
    """

    taken_at: float
    ep_size: int
    balancedness: float | None
    rank_tokens_per_s: tuple[float, ...] = ()
    rebalancing: bool = False
    topology_generation: int = 0
    mapping_generation: int = 0

    @property
    def mean_rank_load(self) -> float | None:
        if not self.rank_tokens_per_s:
            return None
        return sum(self.rank_tokens_per_s) / len(self.rank_tokens_per_s)


# The policy's memory is the status model itself (one definition): what it remembers between
# rounds, kept in status.policy so an operator restart resumes its timers.
PolicyMemory = PolicyStatus
PendingAction = PendingActionStatus


def _remember(memory: PolicyMemory, **changes: object) -> PolicyMemory:
    return memory.model_copy(update=changes)


@dataclass(frozen=True)
class Decision:
    verb: Verb
    reason: str
    target_ep_size: int = 0
    memory: PolicyMemory = field(default_factory=PolicyMemory)


def _step(spec: MoEDeploymentSpec) -> int:
    return spec.parallelism.ep_step


def _finished(pending: PendingAction, snapshot: Snapshot, now: float, timeout: float) -> bool:
    if now - pending.started_at > timeout:
        return True  # given up on: the next round may act again
    if pending.verb == "remap":
        return (
            snapshot.mapping_generation > pending.from_mapping_generation
            and not snapshot.rebalancing
        )
    return snapshot.ep_size == pending.target_ep_size and not snapshot.rebalancing


def _since(flag: bool, since: float | None, now: float) -> float | None:
    return (since if since is not None else now) if flag else None


def decide(
    spec: MoEDeploymentSpec,
    memory: PolicyMemory,
    snapshot: Snapshot | None,
    now: float,
    max_metrics_age: float = 60.0,
    action_timeout: float = 900.0,
) -> Decision:
    """The next action and the updated memory (the caller stores it whatever the verb)."""
    if snapshot is None:
        return Decision("unavailable", "no metrics", memory=memory)
    age = now - snapshot.taken_at
    if age > max_metrics_age:
        return Decision("unavailable", f"metrics are {age:.0f} s old", memory=memory)
    if memory.pending is not None:
        if not _finished(memory.pending, snapshot, now, action_timeout):
            return Decision("wait", f"{memory.pending.verb} in progress", memory=memory)
        memory = _remember(memory, pending=None)

    # Load band (elastic).
    elastic = spec.elastic
    mean = snapshot.mean_rank_load
    sizes_it = elastic.enabled and elastic.scaler == "operator"  # else an external scaler does
    high = sizes_it and mean is not None and mean > elastic.tokens_per_rank_high
    low = sizes_it and mean is not None and mean < elastic.tokens_per_rank_low
    memory = _remember(
        memory,
        load_high_since=_since(high, memory.load_high_since, now),
        load_low_since=_since(low, memory.load_low_since, now),
    )
    step, size = _step(spec), snapshot.ep_size
    if high and memory.load_high_since is not None:
        held = now - memory.load_high_since
        target = size + step
        cooled = (
            memory.last_scale_up_at is None
            or now - memory.last_scale_up_at >= elastic.scale_up_cooldown_seconds
        )
        if (
            held >= elastic.sustained_seconds
            and cooled
            and target <= elastic.max_expert_parallel_size
        ):
            memory = _remember(
                memory,
                last_scale_up_at=now,
                load_high_since=None,
                pending=PendingAction(verb="resize", started_at=now, target_ep_size=target),
            )
            return Decision(
                "resize",
                f"per-rank load {mean:.0f} tokens/s above {elastic.tokens_per_rank_high:.0f} "
                f"for {held:.0f} s",
                target,
                memory,
            )
    if low and memory.load_low_since is not None and mean is not None:
        held = now - memory.load_low_since
        target = size - step
        after = mean * size / target if target > 0 else float("inf")
        cooled = (
            memory.last_scale_down_at is None
            or now - memory.last_scale_down_at >= elastic.scale_down_cooldown_seconds
        )
        if (
            held >= elastic.sustained_seconds
            and cooled
            and target >= elastic.min_expert_parallel_size
            and after <= elastic.tokens_per_rank_high * HYSTERESIS
        ):
            memory = _remember(
                memory,
                last_scale_down_at=now,
                load_low_since=None,
                pending=PendingAction(verb="resize", started_at=now, target_ep_size=target),
            )
            return Decision(
                "resize",
                f"per-rank load {mean:.0f} tokens/s below {elastic.tokens_per_rank_low:.0f} "
                f"for {held:.0f} s",
                target,
                memory,
            )

    # Balancedness (remap).
    remap = spec.remap
    below = (
        snapshot.balancedness is not None and snapshot.balancedness < remap.balancedness_threshold
    )
    memory = _remember(
        memory, below_threshold_since=_since(below, memory.below_threshold_since, now)
    )
    if below and memory.below_threshold_since is not None:
        held = now - memory.below_threshold_since
        interval_ok = (
            memory.last_remap_at is None or now - memory.last_remap_at >= remap.min_interval_seconds
        )
        if held >= remap.sustained_seconds and interval_ok:
            memory = _remember(
                memory,
                last_remap_at=now,
                below_threshold_since=None,
                pending=PendingAction(
                    verb="remap",
                    started_at=now,
                    from_mapping_generation=snapshot.mapping_generation,
                ),
            )
            return Decision(
                "remap",
                f"balancedness {snapshot.balancedness:.3f} below "
                f"{remap.balancedness_threshold} for {held:.0f} s",
                memory=memory,
            )
    return Decision("none", "within bounds", memory=memory)


def memory_to_status(memory: PolicyMemory) -> dict[str, object]:
    """The memory as status.policy (camelCase, epoch seconds; explicit nulls, so a JSON merge
    patch clears what the memory forgot)."""
    return memory.model_dump(by_alias=True)


def memory_from_status(status: dict[str, object] | None) -> PolicyMemory:
    """Inverse of ``memory_to_status`` (missing or null fields: nothing remembered)."""
    return PolicyMemory.model_validate(status or {})

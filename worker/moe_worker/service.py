"""The serving loop of one rank: steps the engine, feeds metrics and status, relays control.

Control flags (stop, rebalance, resize target) are combined over all ranks with one small
all-reduce per step, so a request made on the leader, or a SIGTERM on any rank, acts on every
rank at the same step. With a ``Membership`` the loop also resizes (elastic EP) and, when a
collective fails because a peer died, recovers and repeats the step that failed.

A serving group resizes without losing requests: at the step a smaller target is agreed, the
ranks it leaves out stop admitting (readiness false), and the group keeps stepping until none of
them has a request left (or ``elastic.drainTimeoutS`` passes); only then do they hand their
experts over and leave. Ranks that stay keep admitting throughout; requests that arrive during
the move wait in their queue.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from .elastic import Topology, is_peer_failure, resize_problem
from .engine import RankEngine
from .eplb.channels import open_count, opened_count
from .idle import IdleWaker
from .membership import Membership
from .metrics import WorkerMetrics
from .server import WorkerStatus

log = logging.getLogger("moe_worker.service")
REBALANCE_POLL_S = 0.005  # idle step pace while only a background rebalance is in flight


@dataclass(frozen=True)
class Agreed:
    """The control flags as every rank sees them after one all-reduce."""

    resize_target: int  # 0: none
    any_work: bool  # requests on some rank (or a rebalance asked for)
    draining: bool  # a rank the pending resize leaves out still has requests
    rebalancing: bool = False  # an async rebalance in flight on some rank


class WorkerService:
    def __init__(
        self,
        engine: RankEngine,
        status: WorkerStatus,
        metrics: WorkerMetrics | None = None,
        update_interval: int = 10,
        membership: Membership | None = None,
    ) -> None:
        self.engine = engine
        self.status = status
        self.metrics = metrics
        self.update_interval = update_interval
        self.membership = membership
        self.world = engine.ep.size
        self.stopping = False
        self.recoveries = 0
        if membership is not None:
            membership.on_phase = self._on_phase
            with status.lock:
                status.resize_check = self._resize_check
                status.standby_ranks = self._standby_ranks
            if membership.last_switch is not None:  # it joined a running group: say how
                self._on_phase("committed", membership.last_switch)
        self._seen_rebalances = 0
        self._last_balancedness: list[float] = []  # the primary model's, per layer
        self._model_balancedness: dict[str, list[float]] = {}  # every registered model's
        self._pending_target = 0  # a resize agreed on, waiting for leaving ranks to drain
        self._drain_deadline = 0.0
        self._publish()

    def step(self) -> None:
        """One simulator step: forward, then the control flags agreed over all ranks."""
        self._timed_step()
        target = self._relay_control().resize_target
        if target and self.membership is not None and not self.stopping:
            self._resize(target)
            self._publish()
            return  # the next step is the new group's first, for joiners and survivors alike
        self._after_step()

    def _timed_step(self) -> None:
        started = time.perf_counter()
        layers = self.engine.all_moe_layers()
        routed_before = sum(layer.computed_pairs for layer in layers)
        tokens_before = self.engine.tokens_processed
        self.engine.step()
        seconds = time.perf_counter() - started
        routed = sum(layer.computed_pairs for layer in layers) - routed_before
        if self.metrics is not None:
            self.metrics.observe_step(seconds, self.engine.tokens_processed - tokens_before, routed)
        self._after_rebalances()

    def _after_step(self) -> None:
        if self.engine.step_index % self.update_interval == 0:
            self._update_balancedness()
        self._publish()

    def serve_iteration(self, waker: IdleWaker) -> None:
        """One lock-step iteration of a serving rank: agree on control flags and on whether any
        rank has work; then every rank steps (idle ranks run an empty forward), or, when none
        has work, all wait (without spinning) until work arrives somewhere."""
        engine = self.engine
        rebalancing = engine.eplb is not None and engine.eplb.rebalancing
        agreed = self._relay_control(engine.has_work(), self._draining(), rebalancing)
        if self.stopping:
            return
        target, any_work = agreed.resize_target, agreed.any_work
        if not any_work and agreed.rebalancing:
            # Only a background rebalance to commit: step (idle passes poll its layers) at a
            # bounded pace, not as fast as the loop spins (which starves its thread), and at
            # once when a request arrives here.
            waker.event.clear()
            if not engine.has_work():
                waker.event.wait(REBALANCE_POLL_S)
            any_work = True
        if target and self.membership is not None:
            if target != self._pending_target:  # agreed this step: the leaving ranks drain
                self._pending_target = target
                self._drain_deadline = time.monotonic() + engine.config.elastic.drain_timeout_s
                if engine.ep.rank >= target:  # new requests go to the ranks that stay
                    engine.stop_accepting()
                    with self.status.lock:
                        self.status.leaving = True
                any_work = True  # no idle wait: the next iteration sees the drain state
            elif not agreed.draining:
                self._pending_target = 0
                self._resize(target)
                self._publish()
                return
        if any_work:
            self._timed_step()
            self._after_step()
        else:
            waker.wait(engine.config.serving.idle_wait_s, engine.has_work)

    def _resize_check(self, target: int) -> tuple[int, str] | None:
        """Whether a resize to ``target`` can be accepted now (called by the control API)."""
        assert self.membership is not None
        config = self.engine.config
        problem = resize_problem(
            target,
            self.world,
            config.slots_per_rank,
            config.model.num_experts,
            config.num_nodes,
            has_draft=config.model.draft is not None,
        )
        if problem is not None:
            return 422, problem
        joining = range(self.world, target)
        waiting = self.membership.rendezvous.registered(joining)
        if len(waiting) < len(joining):
            missing = sorted(set(joining) - set(waiting))
            return 409, f"ranks {missing} have not registered to join yet"
        return None

    def _standby_ranks(self) -> list[int]:
        """Ranks above the group registered to join it (called by the control API)."""
        assert self.membership is not None
        return self.membership.rendezvous.registered(range(self.world, self.world + 64))

    def _resize(self, target: int) -> None:
        assert self.membership is not None
        with self.status.lock:
            reason = self.status.resize_reason
            self.status.resizing = True
        self.membership.resize(self.engine, target, reason)
        self.world = self.engine.ep.size
        self._seen_rebalances = 0
        with self.status.lock:
            self.status.resize_target = 0
            self.status.resizing = False
            self.status.leaving = self.membership.retired
        self._last_balancedness = []
        self._model_balancedness = {}

    def _on_phase(self, phase: str, topology: Topology | None) -> None:
        with self.status.lock:
            progress = dict(self.status.resize)
            progress["phase"] = phase
            if topology is not None:
                progress.update(
                    {
                        "kind": topology.kind,
                        "generation": topology.generation,
                        "fromEpSize": topology.previous_world,
                        "target": topology.world,
                        "startStep": topology.start_step,
                        "lostRanks": list(topology.lost_ranks),
                    }
                )
            self.status.resize = progress
            self.status.resizing = phase in ("moving", "recovering")

    def _after_rebalances(self) -> None:
        controller = self.engine.eplb
        if controller is None:
            return
        for result in controller.history[self._seen_rebalances :]:
            if self.metrics is not None:
                self.metrics.observe_rebalance(
                    result.trigger,
                    result.result,
                    result.duration_s,
                    result.bytes_received,
                    result.copies_moved,
                    result.model,
                    result.gain_per_moved_copy,
                )
        self._seen_rebalances = len(controller.history)
        with self.status.lock:
            self.status.rebalancing = controller.rebalancing
        if self.metrics is not None:
            self.metrics.set_rebalancing(controller.rebalancing)

    def _draining(self) -> bool:
        """Whether this rank is left out by the pending resize and still has requests to
        finish (before the drain deadline)."""
        return (
            bool(self._pending_target)
            and self.engine.ep.rank >= self._pending_target
            and self.engine.has_work()
            and time.monotonic() < self._drain_deadline
        )

    def _relay_control(
        self, has_work: bool = False, draining: bool = False, rebalancing: bool = False
    ) -> Agreed:
        """Combine the control flags (and whether this rank has work, requests to finish
        before it leaves, or a rebalance in flight) over all ranks."""
        with self.status.lock:
            flags = torch.tensor(
                [
                    int(self.status.stop_requested),
                    int(self.status.rebalance_requested),
                    self.status.resize_target,
                    int(has_work),
                    int(draining),
                    int(rebalancing),
                ]
            )
        if self.world > 1:
            flags = flags.to(self.engine.device)  # NCCL groups reduce device tensors only
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            flags = flags.cpu()
        stop, rebalance, target = bool(flags[0]), bool(flags[1]), int(flags[2])
        any_work, draining, any_rebalancing = bool(flags[3]), bool(flags[4]), bool(flags[5])
        if rebalance and self.engine.eplb is not None:
            self.engine.eplb.request_rebalance("manual")
            with self.status.lock:
                self.status.rebalance_requested = False
                self.status.rebalancing = True
            if self.metrics is not None:
                self.metrics.set_rebalancing(True)
        if stop:
            self.stopping = True
            if self.engine.eplb is not None:
                self.engine.eplb.shutdown()  # abandon an in-flight rebalance, same step everywhere
                self._after_rebalances()
        return Agreed(0 if stop else target, any_work or rebalance, draining, any_rebalancing)

    def _update_balancedness(self) -> None:
        controller = self.engine.eplb
        if controller is None:
            return
        for name in controller.models:  # collectives: every rank calls them, in this order
            per_layer = controller.measured_layer_balancedness(name)
            self._model_balancedness[name] = [float(v) for v in per_layer]
            if self.metrics is not None:
                self.metrics.set_balancedness(per_layer, name)
                if self.engine.config.metrics.per_expert:
                    self.metrics.set_expert_load(controller.window_logical_load(name), name)
        self._last_balancedness = self._model_balancedness[controller.primary]

    def _publish(self) -> None:
        controller = self.engine.eplb
        channels = self.engine.channels
        mapping_generation = self.engine.mapping_generation
        generation = 0 if self.membership is None else self.membership.generation
        last = None
        if controller is not None:
            if controller.history:
                r = controller.history[-1]
                last = {
                    "trigger": r.trigger,
                    "result": r.result,
                    "durationSeconds": r.duration_s,
                    "balancednessBefore": r.balancedness_before,
                    "balancednessAfter": r.balancedness_after,
                    "copiesMoved": r.copies_moved,
                    "gainPerMovedCopy": r.gain_per_moved_copy,
                    "error": r.error,
                }
        balancedness = float(np.mean(self._last_balancedness)) if self._last_balancedness else None
        state = {
            "deployment": self.engine.config.deployment,
            "epSize": self.world,
            "topologyGeneration": generation,
            "recoveries": self.recoveries,
            "outputsChecked": self.engine.outputs_checked,
            "outputMismatches": self.engine.output_mismatches,
            "mappingGeneration": mapping_generation,
            "step": self.engine.step_index,
            "balancedness": balancedness,
            "layerBalancedness": self._last_balancedness,
            "eplbChannels": {
                "backend": None if channels is None else channels.backend,
                "open": open_count(),
                "opened": opened_count(),
            },
            "lastRebalance": last,
            "models": {
                name: {
                    "mappingGeneration": registered.state.mapping_generation,
                    "layerBalancedness": self._model_balancedness.get(name),
                }
                for name, registered in (controller.models if controller else {}).items()
            },
            "speculative": {
                "proposedTokens": getattr(self.engine, "proposed_tokens", 0),
                "acceptedTokens": getattr(self.engine, "accepted_tokens", 0),
            },
        }
        with self.status.lock:
            self.status.state = state
        if self.metrics is not None:
            self.metrics.set_topology(self.world, generation, mapping_generation)

    def run(self, steps: int = 0) -> None:
        """Step until ``steps`` are done (0: no limit) or a stop is requested on any rank."""
        with self.status.lock:
            self.status.ready = True
        serving = self.engine.config.serving.enabled
        waker = IdleWaker(
            None if self.membership is None else self.membership.rendezvous.client,
            self.world,
            self.engine.ep.rank,
        )
        if serving:
            self.engine.on_work = waker.notify
            with self.status.lock:
                self.status.wake = waker.notify
        rate = None if serving else self.engine.config.workload.steps_per_second
        next_step_at = time.monotonic()
        while not self.stopping and (steps == 0 or self.engine.step_index < steps):
            if rate is not None:  # paced: a steady offered load, as from a request stream
                next_step_at = max(next_step_at + 1.0 / rate, time.monotonic() - 1.0)
                time.sleep(max(0.0, next_step_at - time.monotonic()))
            started_at = self.engine.step_index
            try:
                if serving:
                    waker.world = self.world
                    self.serve_iteration(waker)
                else:
                    self.step()
            except RuntimeError as exc:
                if self.membership is None or self.world == 1:
                    raise
                if not is_peer_failure(exc):
                    # This rank's own fault: exit (its pod restarts); the others find it gone
                    # at their next collective and recover with its replacement.
                    log.error(
                        "rank %d: step %d failed on this rank (%s: %s), not in communication; "
                        "exiting",
                        self.engine.ep.rank,
                        started_at,
                        type(exc).__name__,
                        exc,
                    )
                    raise
                self.membership.recover(self.engine, started_at, exc)
                self.world = self.engine.ep.size
                self.recoveries += 1
                self._seen_rebalances = 0
                with self.status.lock:
                    self.status.resizing = False
                self._publish()  # an idle serving group steps no more until work arrives
            if self.membership is not None and self.membership.retired:
                log.info("rank %d retired at step %d", self.engine.ep.rank, self.engine.step_index)
                return
        if self.engine.eplb is not None and not self.stopping:
            self.engine.eplb.shutdown()  # the step budget ran out: same step on every rank
            self._after_rebalances()
        log.info("rank %d stopped after %d steps", self.engine.ep.rank, self.engine.step_index)

"""The serving loop of one rank: steps the engine, feeds metrics and status, relays control.

Control flags (stop, rebalance) are combined over all ranks with one small all-reduce per step,
so a request made on the leader, or a SIGTERM on any rank, acts on every rank at the same step.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
import torch.distributed as dist

from .engine import Engine
from .metrics import WorkerMetrics
from .server import WorkerStatus

log = logging.getLogger("moe_worker.service")


class WorkerService:
    def __init__(
        self,
        engine: Engine,
        status: WorkerStatus,
        metrics: WorkerMetrics | None = None,
        update_interval: int = 10,
    ) -> None:
        self.engine = engine
        self.status = status
        self.metrics = metrics
        self.update_interval = update_interval
        self.world = engine.ep.size
        self.stopping = False
        self._seen_rebalances = 0
        self._last_balancedness: list[float] = []
        self._publish()

    def step(self) -> None:
        started = time.perf_counter()
        routed_before = sum(layer.computed_pairs for layer in self.engine.model.layers)
        self.engine.step()
        seconds = time.perf_counter() - started
        routed = sum(layer.computed_pairs for layer in self.engine.model.layers) - routed_before
        if self.metrics is not None:
            self.metrics.observe_step(seconds, self.engine.config.workload.tokens_per_step, routed)
        self._after_rebalances()
        self._relay_control()
        if self.engine.step_index % self.update_interval == 0:
            self._update_balancedness()
        self._publish()

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
                )
        self._seen_rebalances = len(controller.history)
        with self.status.lock:
            self.status.rebalancing = controller.rebalancing
        if self.metrics is not None:
            self.metrics.set_rebalancing(controller.rebalancing)

    def _relay_control(self) -> None:
        with self.status.lock:
            flags = torch.tensor(
                [int(self.status.stop_requested), int(self.status.rebalance_requested)]
            )
        if self.world > 1:
            flags = flags.to(self.engine.device)  # NCCL groups reduce device tensors only
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            flags = flags.cpu()
        stop, rebalance = bool(flags[0]), bool(flags[1])
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

    def _update_balancedness(self) -> None:
        controller = self.engine.eplb
        if controller is None:
            return
        per_layer = controller.measured_layer_balancedness()
        self._last_balancedness = [float(v) for v in per_layer]
        if self.metrics is not None:
            self.metrics.set_balancedness(per_layer)
            if self.engine.config.metrics.per_expert:
                load = controller.window_logical_load()  # collective: every rank calls it
                self.metrics.set_expert_load(load)

    def _publish(self) -> None:
        controller = self.engine.eplb
        mapping_generation = 0
        last = None
        if controller is not None:
            mapping_generation = controller.models["main"].state.mapping_generation
            if controller.history:
                r = controller.history[-1]
                last = {
                    "trigger": r.trigger,
                    "result": r.result,
                    "durationSeconds": r.duration_s,
                    "balancednessBefore": r.balancedness_before,
                    "balancednessAfter": r.balancedness_after,
                    "copiesMoved": r.copies_moved,
                    "error": r.error,
                }
        balancedness = float(np.mean(self._last_balancedness)) if self._last_balancedness else None
        state = {
            "deployment": self.engine.config.deployment,
            "epSize": self.world,
            "topologyGeneration": 0,
            "mappingGeneration": mapping_generation,
            "step": self.engine.step_index,
            "balancedness": balancedness,
            "layerBalancedness": self._last_balancedness,
            "lastRebalance": last,
        }
        with self.status.lock:
            self.status.state = state
        if self.metrics is not None:
            self.metrics.set_topology(self.world, 0, mapping_generation)

    def run(self, steps: int = 0) -> None:
        """Step until ``steps`` are done (0: no limit) or a stop is requested on any rank."""
        with self.status.lock:
            self.status.ready = True
        while not self.stopping and (steps == 0 or self.engine.step_index < steps):
            self.step()
        if self.engine.eplb is not None and not self.stopping:
            self.engine.eplb.shutdown()  # the step budget ran out: same step on every rank
            self._after_rebalances()
        log.info("rank %d stopped after %d steps", self.engine.ep.rank, self.engine.step_index)

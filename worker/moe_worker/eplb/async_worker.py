"""Asynchronous rebalancing: transfers run in the background, layers commit at step boundaries.

A background thread computes the new placement and, layer by layer, fetches this rank's new
expert weights into staging buffers (one layer at a time, so memory stays bounded), on its own
CUDA stream on GPUs, through a communicator with its own group. The step loop keeps using the
old mapping. After every step ``poll`` runs a cheap host-side agreement (one all-reduce of two
integers on a gloo group): when every rank has staged the next layer, all ranks copy it in and
commit its maps at that same step. If any rank failed or passed the deadline, all ranks abandon
the rebalance at the same step; layers already committed stay (a layer's maps and weights always
change together), the rest keep the old mapping.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .communicator import Communicator
from .executor import Staged, commit_staged, stage_layer_plan
from .layout import Layout
from .planner import plan_layer
from .policy import Placement, compute_placement
from .rebalance import HasSlots, RebalanceResult, summarize
from .state import EPLBState

log = logging.getLogger("moe_worker.eplb.async")

FaultHook = Callable[[int, int], None]  # (rank, layer) -> None; may raise, sleep or exit


class AsyncRebalance:
    """One asynchronous rebalance of one model on this rank."""

    def __init__(
        self,
        state: EPLBState,
        layers: list[HasSlots],
        policy: str,
        load: np.ndarray,
        rank: int,
        world: int,
        communicator: Communicator,
        control_group: dist.ProcessGroup | None,
        deadline_s: float,
        trigger: str,
        device: torch.device,
        fault_hook: FaultHook | None = None,
        target: Placement | None = None,
        layout: Layout = Layout(),
        options: Mapping[str, Any] | None = None,
    ) -> None:
        """``target``: move to this placement instead of computing one from ``load``;
        ``layout``: expert groups and nodes for node-aware placement; ``options``: the
        policy's."""
        self.layout = layout
        self.options = dict(options or {})
        self.state = state
        self.target = target
        self.layers = layers
        self.policy = policy
        self.load = load
        self.rank, self.world = rank, world
        self.communicator = communicator
        self.control_group = control_group
        self.deadline_s = deadline_s
        self.trigger = trigger
        self.device = device
        self.fault_hook = fault_hook
        self.current: Placement = state.placement()
        self.new: Placement | None = None
        self.committed = 0
        self.bytes_received = 0
        self.started = time.perf_counter()
        self.error = ""
        self._ready = 0  # layers staged by the thread
        self._failed = False
        self._staged: dict[int, Staged] = {}
        self._condition = threading.Condition()
        self._abort = threading.Event()
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.thread = threading.Thread(target=self._run, name=f"eplb-async-{rank}", daemon=True)
        self.thread.start()

    # Background thread -------------------------------------------------------------------

    def _run(self) -> None:
        try:
            if self.stream is not None:
                torch.cuda.set_device(self.device)
                with torch.cuda.stream(self.stream):
                    self._transfer_all()
            else:
                self._transfer_all()
        except BaseException as exc:  # noqa: BLE001 - any failure aborts the rebalance
            log.warning("rank %d: async rebalance failed in the background: %r", self.rank, exc)
            with self._condition:
                self.error = repr(exc)
                self._failed = True
                self._condition.notify_all()

    def _transfer_all(self) -> None:
        new = self.target or compute_placement(
            self.policy,
            self.load,
            num_physical=self.current.num_physical,
            num_gpus=self.world,
            num_groups=self.layout.num_groups,
            num_nodes=self.layout.num_nodes,
            previous=self.current,
            **self.options,
        )
        self.new = new
        slots_per_rank = self.current.num_physical // self.world
        # Every rank's thread exchanges layers 0 .. c, c being the layers committed when the
        # rebalance is abandoned (the same on every rank: commits are agreed at a step). So an
        # abandon never leaves one rank's exchange waiting on a peer that did not start it.
        for layer, module in enumerate(self.layers):
            plan = plan_layer(self.current.phy2log[layer], new.phy2log[layer], slots_per_rank)
            staged, received = stage_layer_plan(plan, self.rank, module.slots, self.communicator)
            if self.fault_hook is not None:
                self.fault_hook(self.rank, layer)
            if self.stream is not None:
                self.stream.synchronize()
            with self._condition:
                self._staged[layer] = staged
                self.bytes_received += received
                self._ready = layer + 1
                self._condition.notify_all()
                # Bounded memory: stage the next layer only once this one is committed.
                while self.committed <= layer and not self._abort.is_set():
                    self._condition.wait(timeout=0.5)
                if self.committed <= layer:  # abandoned before this layer committed
                    return

    # Step loop ---------------------------------------------------------------------------

    def poll(self) -> RebalanceResult | None:
        """Called by every rank after every step: commit the next layer, abort, or wait.

        Returns the result once the rebalance has finished or been abandoned, else None.
        """
        with self._condition:
            ready, failed = self._ready, self._failed
        overdue = time.perf_counter() - self.started > self.deadline_s
        flags = torch.tensor([-ready, int(failed or overdue)], dtype=torch.int64)
        if self.world > 1:
            try:
                dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.control_group)
            except RuntimeError as exc:  # a rank is gone or the agreement timed out
                with self._condition:
                    self._failed = True
                return self._abandon(f"agreement failed: {exc}")
        everywhere_ready, any_failed = -int(flags[0]), bool(flags[1])
        if any_failed:
            return self._abandon(
                "a rank failed or passed the deadline" if not self.error else self.error
            )
        if everywhere_ready > self.committed:
            self._commit_next()
        if self.committed == len(self.layers):
            return self._finish()
        return None

    def _commit_next(self) -> None:
        layer = self.committed
        assert self.new is not None
        with self._condition:
            staged = self._staged.pop(layer)
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
        commit_staged(self.layers[layer].slots, staged)
        self.state.commit(self.new, layers=[layer], new_generation=layer == 0)
        self.state.clear_layer_window(layer)  # slot meanings of this layer changed
        with self._condition:
            self.committed += 1
            self._condition.notify_all()

    def _result(self, result: str, error: str = "") -> RebalanceResult:
        """Figures for the layers committed so far (the others kept the old mapping)."""
        applied = self.current
        if self.new is not None and self.committed:
            partial = self.current.phy2log.copy()
            partial[: self.committed] = self.new.phy2log[: self.committed]
            applied = Placement.from_phy2log(partial, self.current.num_logical)
            if self.current.share is not None or self.new.share is not None:
                share = self.current.slot_share().copy()
                share[: self.committed] = self.new.slot_share()[: self.committed]
                applied = applied.with_share(share)
        return summarize(
            self.trigger,
            result,
            self.load,
            self.current,
            applied,
            self.world,
            self.started,
            self.bytes_received,
            self.state.mapping_generation,
            error,
        )

    def _finish(self) -> RebalanceResult:
        self.thread.join(timeout=5)
        return self._result("ok")

    def _abandon(self, reason: str) -> RebalanceResult:
        self._abort.set()
        with self._condition:
            self._condition.notify_all()
        log.warning(
            "rank %d: rebalance abandoned after %d of %d layers: %s",
            self.rank,
            self.committed,
            len(self.layers),
            reason,
        )
        return self._result("aborted" if not self._failed else "failed", reason)

    def wait_stopped(self, timeout: float) -> bool:
        """Wait for the background thread to end (after an abort it may sit in a transfer
        until the transfer group's timeout). True if it ended."""
        self.thread.join(timeout)
        return not self.thread.is_alive()

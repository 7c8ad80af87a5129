"""One rank's membership in the elastic group: join at start, resize, recover from a death.

The I/O layer over ``elastic`` (decisions, store, moves): every function here is called by the
ranks of a group at the same step, or by a joining rank waiting to be taken in.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from moe_worker.config import RankEnv, WorkerConfig
from moe_worker.elastic import (
    ElasticError,
    Rendezvous,
    Topology,
    adoption_topology,
    form_group,
    leave_group,
    move_experts,
    recovery_topology,
    resize_placement,
)
from moe_worker.engine import RankEngine, create_engine
from moe_worker.eplb.channels import open_channels
from moe_worker.eplb.executor import Reloader

log = logging.getLogger("moe_worker.membership")


@dataclass
class Membership:
    """This rank's view of the topology: the rendezvous and the generation it serves in."""

    rendezvous: Rendezvous
    rank: int
    config: WorkerConfig
    device: torch.device
    generation: int = 0
    retired: bool = False
    last_switch: Topology | None = None  # the last resize or recovery this rank took part in
    on_phase: Callable[[str, Topology | None], None] = lambda phase, topology: None

    @property
    def timeout_s(self) -> float:
        return self.config.elastic.collective_timeout_s

    def _channel_store(self, generation: int) -> dist.Store:
        return self.rendezvous.group_store(generation, "eplb")

    # --- start -----------------------------------------------------------------------------

    def start(
        self,
        env: RankEnv,
        on_standby: Callable[[], None] | None = None,
        stopped: Callable[[], bool] = lambda: False,
    ) -> RankEngine:
        """Join generation 0 as one of its WORLD_SIZE ranks, or wait to join a running group.

        The leader first waits ``leaderRejoinWindowS`` for survivors of a group it led (it died
        and restarted): if they report, it adopts them in their next generation instead. Else
        it publishes generation 0; a rank that finds it still forming is a member, one
        that finds it formed (a scale-up joiner or a dead rank's replacement) registers and
        waits (``on_standby`` is called then) until a generation takes it in, or until
        ``stopped()`` (StandbyStopped).
        """
        rendezvous = self.rendezvous
        elastic = self.config.elastic
        if self.rank == 0:
            survivors = rendezvous.wait_orphans(
                elastic.leader_rejoin_window_s, elastic.replacement_timeout_s
            )
            if survivors:
                return self._adopt(survivors)
            rendezvous.publish(Topology(0, env.world_size, 0, "start"))
            current = 0
        else:
            # Registered from the start: a leader that restarts after several ranks died takes
            # this rank as a replacement (publishing a generation clears the keys of its ranks).
            rendezvous.register_joiner(self.rank)
            current = self._wait_current()
        topology = rendezvous.topology(current)
        forming = topology.kind == "start" and not rendezvous.has_flag("formed/0")
        adopted = (
            topology.kind == "recover"
            and self.rank in topology.lost_ranks
            and not rendezvous.has_flag(f"committed/{current}")
        )
        if adopted:  # a restarted leader's generation already counts on this replacement
            return self._join(topology)
        if forming and topology.includes(self.rank):
            rendezvous.unregister_joiner(self.rank)  # a member, not a replacement-in-waiting
            form_group(rendezvous, 0, self.rank, topology.world, self.device, self.timeout_s)
            engine = create_engine(
                self.config.resized(topology.world),
                self.rank,
                topology.world,
                self.device,
                channel_store=self._channel_store(0),
            )
            if self.rank == 0:
                rendezvous.set_flag("formed/0")
            self.generation = 0
            return engine
        rendezvous.register_joiner(self.rank)
        log.info("rank %d: generation %d runs; waiting to join", self.rank, current)
        if on_standby is not None:
            on_standby()
        while True:
            topology = rendezvous.wait_topology(
                current, self.config.elastic.join_timeout_s, stopped
            )
            current = topology.generation
            if topology.kind in ("resize", "recover") and topology.includes(self.rank):
                break
        return self._join(topology)

    def _join(self, topology: Topology) -> RankEngine:
        """Enter ``topology`` (a resize or recovery) as a rank with empty slots."""
        num_logical = self.config.model.num_experts
        engine = create_engine(
            self.config.resized(topology.world),
            self.rank,
            topology.world,
            self.device,
            placement=topology.placement(num_logical),
            joining=True,
        )
        self.generation = topology.generation - 1
        self._switch(engine, topology)
        return engine

    def _adopt(self, survivors: dict[int, dict]) -> RankEngine:
        """The restarted leader: take the survivors of its group back (see ``elastic``)."""
        topology = adoption_topology(survivors, self.config.slots_per_rank)
        log.warning(
            "leader restarted: generation %d takes back ranks %s (lost: %s)",
            topology.generation,
            sorted(survivors),
            list(topology.lost_ranks),
        )
        self.rendezvous.publish(topology)
        return self._join(topology)

    def _wait_current(self) -> int:
        deadline = time.monotonic() + self.config.elastic.join_timeout_s
        while time.monotonic() < deadline:
            current = self.rendezvous.current_generation()
            if current is not None:
                return current
            time.sleep(0.05)
        raise ElasticError("the leader published no topology")

    # --- resize ----------------------------------------------------------------------------

    def resize(self, engine: RankEngine, target: int, reason: str = "") -> None:
        """All ranks of the current group, at the same step: move to ``target`` ranks.

        Sets ``retired`` on ranks the new group leaves out (they may exit afterwards).
        """
        world = engine.ep.size
        current = engine.current_placement()
        load = np.zeros((current.num_layers, current.num_logical))
        if engine.eplb is not None:
            engine.eplb.shutdown()  # an in-flight rebalance is abandoned: old mapping stays
            load = engine.eplb.window_logical_load()  # a collective on the old group
        if self.rank == 0:
            new = resize_placement(
                current,
                load,
                engine.config.slots_per_rank,
                target,
                engine.config.eplb.policy,
                engine.layout,
                engine.config.eplb.policy_options(),
            )
            self.rendezvous.publish(
                Topology(
                    generation=self.generation + 1,
                    world=target,
                    start_step=engine.step_index,
                    kind="resize",
                    previous_world=world,
                    mapping_generation=engine.mapping_generation + 1,
                    old_phy2log=current.phy2log.tolist(),
                    new_phy2log=new.phy2log.tolist(),
                    reason=reason,
                    new_share=None if new.share is None else new.share.tolist(),
                )
            )
        topology = self.rendezvous.wait_topology(self.generation, self.timeout_s)
        self._switch(engine, topology)

    # --- recovery --------------------------------------------------------------------------

    def recover(self, engine: RankEngine, resume_step: int, error: BaseException) -> None:
        """A collective failed: re-form with the survivors and the dead ranks' replacements.

        Every survivor reports the step it resumes at and what its slots hold; the leader waits
        for a replacement of every rank that did not report and publishes the next generation.
        Raises ElasticError when no replacement comes in time (or the leader is gone).
        """
        if engine.config.model.draft is not None:
            raise ElasticError(
                "model.draft: a dead rank's replacement is not supported with a speculative "
                f"draft model (the ranks exit and the deployment restarts); the error: {error}"
            )
        world, slots = engine.ep.size, engine.config.slots_per_rank
        log.warning("rank %d: generation %d failed (%s)", self.rank, self.generation, error)
        self.on_phase("recovering", None)
        mapped = engine.current_placement().phy2log
        if engine.eplb is not None:
            engine.eplb.shutdown(timeout=self.timeout_s)
            engine.eplb = None
        engine.close_channels(abort=True)  # a peer is gone: wait for nothing of it
        leave_group()
        held = mapped[:, self.rank * slots : (self.rank + 1) * slots]
        wait = self.config.elastic.replacement_timeout_s + self.timeout_s
        try:
            self.rendezvous.report_failure(self.generation, self.rank, resume_step, held)
            if self.rank == 0:
                self.rendezvous.publish(self._recovery_topology(engine, mapped, world, slots))
            topology = self.rendezvous.wait_topology(self.generation, wait)
        except dist.DistError as store_lost:  # the leader, and the store with it, died
            if self.rank == 0:
                raise
            log.warning("rank %d: the leader is gone (%s); waiting for it", self.rank, store_lost)
            self.rendezvous.reconnect(wait)
            report = {
                "generation": self.generation,
                "world": world,
                "step": resume_step,
                "mappingGeneration": engine.mapping_generation,
                "mapped": mapped.tolist(),
                "held": held.tolist(),
            }
            self.rendezvous.report_orphan(self.rank, report)
            topology = self.rendezvous.wait_adoption(self.generation, wait)
        if topology.kind == "failed":
            raise ElasticError(f"recovery failed: {topology.reason}")
        self._switch(engine, topology)

    def _recovery_topology(
        self, engine: RankEngine, mapped: np.ndarray, world: int, slots: int
    ) -> Topology:
        """The leader: wait until every rank reported or has a replacement, then decide."""
        deadline = time.monotonic() + self.config.elastic.replacement_timeout_s + self.timeout_s
        g = self.generation
        while True:
            reports = self.rendezvous.failure_reports(g, world)
            missing = [r for r in range(world) if r not in reports]
            replaced = self.rendezvous.registered(missing)
            if missing and len(replaced) == len(missing):
                break
            if time.monotonic() > deadline:
                return Topology(
                    g + 1,
                    world,
                    0,
                    "failed",
                    previous_world=world,
                    reason=f"ranks {missing} neither reported nor were replaced in time",
                )
            time.sleep(0.1)
        log.info("generation %d: ranks %s lost; their replacements join", g + 1, missing)
        return recovery_topology(
            g + 1, world, reports, mapped, slots, engine.mapping_generation + 1
        )

    # --- the switch ------------------------------------------------------------------------

    def _move(
        self,
        engine: RankEngine,
        old: np.ndarray,
        new: np.ndarray,
        slots: int,
        reloaders: list[Reloader],
        world: int,
        generation: int,
    ) -> None:
        """Move experts over the configured backend, on channels of their own (synchronous:
        nothing else runs) over the ``world`` ranks of the transfer group, closed after."""
        channels = open_channels(
            engine.config.eplb,
            self.rank,
            world,
            self.device,
            self.rendezvous.group_store(generation, "move"),
            use_async=False,
        )
        try:
            move_experts(
                engine.layer_slots(), old, new, slots, self.rank, channels.communicator, reloaders
            )
        finally:
            channels.close()

    def _switch(self, engine: RankEngine, topology: Topology) -> None:
        """Move experts for ``topology`` and install it (every rank of its transfer group)."""
        g = topology.generation
        self.on_phase("moving", topology)
        old = np.asarray(topology.old_phy2log, dtype=np.int64)
        new = np.asarray(topology.new_phy2log, dtype=np.int64)
        slots = engine.config.slots_per_rank
        engine.close_channels()  # the old generation's (members of it close them together)
        reloaders = [engine.reload_expert(layer) for layer in range(new.shape[0])]
        if topology.world >= topology.previous_world:
            # Scale-up or recovery: the new group (joiners and replacements included) moves.
            form_group(self.rendezvous, g, self.rank, topology.world, self.device, self.timeout_s)
            self._move(engine, old, new, slots, reloaders, topology.world, g)
        else:
            # Scale-down: retiring ranks send their experts over the old group, then leave.
            self._move(engine, old, new, slots, reloaders, topology.previous_world, g)
            if dist.is_initialized():
                dist.barrier()
            if not topology.includes(self.rank):
                leave_group()
                self.rendezvous.wait_flag(f"committed/{g}", self.timeout_s)
                self.generation = g
                self.retired = True
                self.on_phase("retired", topology)
                return
            form_group(self.rendezvous, g, self.rank, topology.world, self.device, self.timeout_s)
        engine.install(
            topology.world,
            topology.placement(engine.config.model.num_experts),
            topology.mapping_generation,
            self._channel_store(g),
        )
        engine.step_index = topology.start_step
        if dist.is_initialized():
            dist.barrier()  # every rank installed: the generation is committed
        self.generation = g
        if self.rank == 0:
            self.rendezvous.set_flag(f"committed/{g}")
        log.info(
            "rank %d: generation %d committed (%s, %d ranks, from step %d)",
            self.rank,
            g,
            topology.kind,
            topology.world,
            topology.start_step,
        )
        self.last_switch = topology
        self.on_phase("committed", topology)

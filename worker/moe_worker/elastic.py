"""Elastic expert parallelism: topology generations, the rendezvous, resize and recovery.

A topology generation ``g`` is one process group of ``world`` ranks that serves steps from
``start_step`` on. Rank 0 (the leader) hosts a TCPStore on MASTER_PORT for the deployment's
life; generation ``g``'s process group lives under the key prefix ``gen/<g>/``, so groups of
different generations never share keys. Rank ids are stable: a scale-up adds the next ranks, a
scale-down retires the highest ones, a replacement takes the id of the rank it replaces.

- Start: the leader publishes generation 0 (``kind="start"``) with WORLD_SIZE ranks; ranks that
  arrive before it has formed are its members.
- Resize to N': every serving rank learns the target at the same step (the control all-reduce);
  the leader publishes generation g+1 with the old and the new placement (``incremental``
  policy, slots per rank fixed); joiners (registered under ``joiners/<rank>``) wait for a
  generation that includes them. Scale-up moves experts over the new group, scale-down over the
  old one (retiring ranks send theirs away first); then all install the new maps at the same
  step, and retiring ranks exit only once the leader marks the generation committed.
- Recovery: a collective that fails (a peer died: gloo/NCCL raise) makes every survivor report
  its step and the experts it actually holds; the leader waits for the dead rank's replacement
  to register, and publishes generation g+1 with the lost slots marked -1, so the replacement
  receives every expert from a surviving replica or reloads it from the model source.
- Leader loss: the store dies with rank 0. The survivors reconnect to MASTER_ADDR:MASTER_PORT,
  where the restarted leader hosts a fresh store, and each reports its generation, step, map
  and held experts under ``orphans/<rank>``. A starting leader waits ``leaderRejoinWindowS`` for
  such reports before it starts a new group; if they come it publishes generation g+1
  (``adoption_topology``: its own slots and any other dead rank's marked lost) and joins it as
  the replacement of rank 0, so the survivors keep serving without a restart.

The decisions (``resize_placement``, ``recovery_topology``) are pure; ``Rendezvous`` is the
store I/O; ``move_experts`` and ``form_group`` touch torch.distributed.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist

from moe_worker.eplb.communicator import Communicator
from moe_worker.eplb.executor import Reloader, execute_layer_plan
from moe_worker.eplb.layout import Layout
from moe_worker.eplb.planner import plan_layer
from moe_worker.eplb.policy import Placement, compute_placement

log = logging.getLogger("moe_worker.elastic")
TopologyKind = Literal["start", "resize", "recover", "failed"]


class ElasticError(RuntimeError):
    """A resize or recovery could not complete (the process should exit non-zero)."""


class StandbyStopped(Exception):
    """A rank waiting to join was asked to stop (SIGTERM) before any generation took it in."""


# Where communication happens: torch.distributed (collectives, gloo and NCCL groups, stores)
# and this package's weight-exchange communicators (pynccl's own NCCL calls).
COMMUNICATION_PATHS = (
    os.path.join("torch", "distributed", ""),
    os.path.join("moe_worker", "eplb", "communicator", ""),
)


def is_peer_failure(error: BaseException) -> bool:
    """Whether ``error`` came out of communication (a peer died, a collective passed its
    deadline, the network failed), so the group should recover without the peers that are gone.

    Anything else (out of memory, a bug, a bad input) is this rank's own fault: recovery would
    wait for a replacement of a rank that is not missing. torch raises ``DistError`` for NCCL,
    store and network failures but a plain ``RuntimeError`` for gloo's, so the test is the type
    or where the error was raised (a frame in ``COMMUNICATION_PATHS``).
    """
    if isinstance(error, torch.OutOfMemoryError):
        return False
    if isinstance(error, dist.DistError):
        return True
    frames = traceback.extract_tb(error.__traceback__)
    return any(path in frame.filename for frame in frames for path in COMMUNICATION_PATHS)


@dataclass(frozen=True)
class Topology:
    """One generation: who serves, from which step, and how the experts get there.

    ``old_phy2log`` [L, previous_world x S] is what the slots held before (-1: lost),
    ``new_phy2log`` [L, world x S] the placement this generation serves with.
    """

    generation: int
    world: int
    start_step: int
    kind: TopologyKind
    previous_world: int = 0
    lost_ranks: tuple[int, ...] = ()
    mapping_generation: int = 0
    old_phy2log: list[list[int]] = field(default_factory=list)
    new_phy2log: list[list[int]] = field(default_factory=list)
    reason: str = ""
    new_share: list[list[float]] | None = None  # [L, world x S]: replica shares (None: equal)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> Topology:
        data = json.loads(text)
        data["lost_ranks"] = tuple(data.get("lost_ranks", ()))
        return cls(**data)

    @property
    def transfer_world(self) -> int:
        """Ranks taking part in the expert moves: the larger of the old and new groups."""
        return max(self.world, self.previous_world)

    def includes(self, rank: int) -> bool:
        return rank < self.world

    def placement(self, num_logical: int) -> Placement:
        placement = Placement.from_phy2log(
            np.asarray(self.new_phy2log, dtype=np.int64), num_logical
        )
        if self.new_share is None:
            return placement
        return placement.with_share(np.asarray(self.new_share, dtype=np.float64))


# --- decisions (pure) -------------------------------------------------------------------------


def resize_problem(
    target: int,
    world: int,
    slots_per_rank: int,
    num_logical: int,
    num_nodes: int = 1,
    has_draft: bool = False,
) -> str | None:
    """Why a resize to ``target`` ranks is invalid, or None. ``has_draft``: a speculative
    draft model is served (its experts are not resized: the deployment restarts instead)."""
    if has_draft:
        return (
            "model.draft: elastic resizes are not supported with a speculative draft model "
            "(restart the deployment at the new size)"
        )
    if target < 1:
        return f"epSize: must be >= 1, got {target}"
    if target % num_nodes:
        return f"epSize: must be a multiple of numNodes = {num_nodes}, got {target}"
    if target * slots_per_rank < num_logical:
        return (
            f"epSize: {target} ranks x {slots_per_rank} slots per rank = "
            f"{target * slots_per_rank} slots cannot hold all {num_logical} experts"
        )
    if target == world:
        return f"epSize: already {world}"
    return None


def resize_placement(
    current: Placement,
    load: np.ndarray,
    slots_per_rank: int,
    target: int,
    policy: str = "incremental",
    layout: Layout = Layout(),
    options: Mapping[str, Any] | None = None,
) -> Placement:
    """The placement for ``target`` ranks with the same slots per rank, close to ``current``.

    ``load`` [L, E] is the window's tokens per logical expert (uniform when it is empty);
    ``layout`` as declared (the new ranks' nodes are checked at the next rebalance).
    """
    weight = load if load.sum() > 0 else np.ones_like(load, dtype=np.float64)
    at = layout.at(target)
    return compute_placement(
        policy,
        weight,
        num_physical=target * slots_per_rank,
        num_gpus=target,
        num_groups=at.num_groups,
        num_nodes=at.num_nodes,
        previous=current,
        **(options or {}),
    )


def recovery_maps(
    held_rows: dict[int, np.ndarray], mapped: np.ndarray, world: int, slots_per_rank: int
) -> tuple[np.ndarray, np.ndarray]:
    """(old, new) phy2log [L, world x S] after the ranks missing from ``held_rows`` died.

    ``held_rows``: survivor rank -> what its slots hold [L, S]; ``mapped`` [L, world x S] is the
    leader's map. Old marks the lost ranks' slots -1; new keeps every survivor's contents and
    gives the replacements what the lost ranks held, so only the lost experts move.
    """
    old = np.full_like(mapped, -1)
    for rank, rows in held_rows.items():
        old[:, rank * slots_per_rank : (rank + 1) * slots_per_rank] = rows
    new = np.where(old >= 0, old, mapped)
    return old, new


def recovery_topology(
    generation: int,
    world: int,
    reports: dict[int, dict],
    mapped: np.ndarray,
    slots_per_rank: int,
    mapping_generation: int,
    reason_suffix: str = "",
) -> Topology:
    """Generation ``generation`` after ranks died: ``reports`` (survivor rank -> {"step",
    "held" [L, S]}) keep what they hold, every rank without a report is lost and its
    replacement restores its slots of ``mapped`` [L, world x S]. The reason reads "rank(s)
    [lost] died" plus ``reason_suffix``."""
    held = {rank: np.asarray(r["held"], dtype=np.int64) for rank, r in reports.items()}
    old, new = recovery_maps(held, mapped, world, slots_per_rank)
    lost = tuple(r for r in range(world) if r not in reports)
    return Topology(
        generation=generation,
        world=world,
        start_step=min(int(r["step"]) for r in reports.values()),
        kind="recover",
        previous_world=world,
        lost_ranks=lost,
        mapping_generation=mapping_generation,
        old_phy2log=old.tolist(),
        new_phy2log=new.tolist(),
        reason=f"rank(s) {list(lost)} died{reason_suffix}",
    )


def adoption_topology(reports: dict[int, dict], slots_per_rank: int) -> Topology:
    """Generation g+1 for a restarted leader from the survivors' ``orphans`` reports.

    ``reports``: survivor rank -> {"generation", "world", "step", "mappingGeneration",
    "mapped" [L, world x S] (its map), "held" [L, S] (what its slots hold)}. Ranks without a
    report (rank 0 and any other dead rank) are lost: their replacements restore their slots.
    """
    first = reports[min(reports)]
    generation, world = int(first["generation"]), int(first["world"])
    if any(
        int(r["generation"]) != generation or int(r["world"]) != world for r in reports.values()
    ):
        raise ElasticError("survivors report different generations: cannot take them back")
    return recovery_topology(
        generation + 1,
        world,
        reports,
        np.asarray(first["mapped"], dtype=np.int64),
        slots_per_rank,
        max(int(r["mappingGeneration"]) for r in reports.values()) + 1,
        ", the leader among them",
    )


# --- the store --------------------------------------------------------------------------------


class Rendezvous:
    """The deployment's TCPStore, hosted by the leader; every generation has its own prefix."""

    def __init__(self, host: str, port: int, is_leader: bool, timeout_s: float = 300.0) -> None:
        self.host, self.port = host, port
        self.timeout = timedelta(seconds=timeout_s)
        self.store = dist.TCPStore(
            host, port, None, is_leader, timeout=self.timeout, wait_for_workers=False
        )

    def client(self) -> dist.Store:
        """A new connection to the store (a blocking ``wait`` holds its connection: a thread
        that waits needs its own)."""
        return dist.TCPStore(self.host, self.port, None, False, timeout=self.timeout)

    def reconnect(self, timeout_s: float) -> None:
        """A survivor of the leader: connect to the store its restart hosts (same address)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with socket.create_connection((self.host, self.port), timeout=1.0):
                    pass
                self.store = dist.TCPStore(self.host, self.port, None, False, timeout=self.timeout)
                return
            except (OSError, dist.DistError) as exc:
                if time.monotonic() > deadline:
                    raise ElasticError(
                        f"no leader came back at {self.host}:{self.port} within {timeout_s:.0f} s"
                    ) from exc
                time.sleep(0.1)

    def report_orphan(self, rank: int, report: dict) -> None:
        """A survivor whose leader died: what ``adoption_topology`` needs from it."""
        self.store.set(f"orphans/{rank}", json.dumps(report))
        self.store.set("orphans/world", str(report["world"]))

    def wait_orphans(self, window_s: float, replacement_timeout_s: float) -> dict[int, dict]:
        """The leader at start: survivors' reports (rank -> report), or {} when none came within
        ``window_s``. Once one came, waits until every other rank reported or has a
        replacement registered (ElasticError past ``replacement_timeout_s``)."""
        if not self._wait_key("orphans/world", window_s):
            return {}
        world = int(self.store.get("orphans/world"))
        deadline = time.monotonic() + replacement_timeout_s
        while True:
            reports = {
                r: json.loads(self.store.get(f"orphans/{r}"))
                for r in range(1, world)
                if self._has(f"orphans/{r}")
            }
            missing = [r for r in range(1, world) if r not in reports]
            if reports and len(self.registered(missing)) == len(missing):
                return reports
            if time.monotonic() > deadline:
                raise ElasticError(f"ranks {missing} neither reported nor were replaced in time")
            time.sleep(0.05)

    def wait_adoption(self, after: int, timeout_s: float) -> Topology:
        """A survivor that reported: the restarted leader's generation ``after + 1``.
        ElasticError when the leader started a new group instead (its window had passed)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            current = self.current_generation()
            if current is not None:
                if self.topology(current).kind == "start":
                    raise ElasticError("the restarted leader started a new group")
                if current > after:
                    return self.topology(after + 1)
            time.sleep(0.05)
        raise ElasticError(f"the restarted leader published nothing within {timeout_s:.0f} s")

    def _has(self, key: str) -> bool:
        return bool(self.store.check([key]))

    def _wait_key(self, key: str, timeout_s: float) -> bool:
        """Block in the store until ``key`` is set (True) or ``timeout_s`` passes (False); a
        store that went away raises as before (``dist.DistError``)."""
        try:
            self.store.wait([key], timedelta(seconds=max(timeout_s, 0.001)))
        except dist.DistStoreError as exc:
            if "timeout" not in str(exc).lower():
                raise
            return False
        return True

    def publish(self, topology: Topology) -> None:
        for rank in range(topology.world):
            self.unregister_joiner(rank)
        self.store.set(f"topology/{topology.generation}", topology.to_json())
        self.store.set("topology/current", str(topology.generation))

    def current_generation(self) -> int | None:
        if not self._has("topology/current"):
            return None
        return int(self.store.get("topology/current"))

    def topology(self, generation: int) -> Topology:
        return Topology.from_json(self.store.get(f"topology/{generation}"))

    def wait_topology(
        self, after: int, timeout_s: float, stopped: Callable[[], bool] | None = None
    ) -> Topology:
        """The first generation newer than ``after``: waits in the store for its key
        (ElasticError past the deadline). With ``stopped`` (a rank on standby, which may wait
        long), looks at its key and at ``stopped()`` every 50 ms instead, raising
        StandbyStopped when it turns true (a store wait that times out logs a warning)."""
        key = f"topology/{after + 1}"
        if stopped is None:
            if not self._wait_key(key, timeout_s):
                raise ElasticError(f"no topology generation after {after} within {timeout_s:.0f} s")
            return self.topology(after + 1)
        deadline = time.monotonic() + timeout_s
        while not self._has(key):
            if stopped():
                raise StandbyStopped(f"stopped while waiting for generation {after + 1}")
            if time.monotonic() > deadline:
                raise ElasticError(f"no topology generation after {after} within {timeout_s:.0f} s")
            time.sleep(0.05)
        return self.topology(after + 1)

    def group_store(self, generation: int, name: str = "pg") -> dist.Store:
        return dist.PrefixStore(f"gen/{generation}/{name}/", self.store)

    def register_joiner(self, rank: int) -> None:
        self.store.set(f"joiners/{rank}", str(time.time()))

    def unregister_joiner(self, rank: int) -> None:
        if self._has(f"joiners/{rank}"):
            self.store.delete_key(f"joiners/{rank}")

    def registered(self, ranks: range | list[int]) -> list[int]:
        return [r for r in ranks if self._has(f"joiners/{r}")]

    def set_flag(self, name: str, value: str = "1") -> None:
        self.store.set(f"flags/{name}", value)

    def has_flag(self, name: str) -> bool:
        return self._has(f"flags/{name}")

    def wait_flag(self, name: str, timeout_s: float) -> str:
        if not self._wait_key(f"flags/{name}", timeout_s):
            raise ElasticError(f"flag {name} was not set within {timeout_s:.0f} s")
        return self.store.get(f"flags/{name}").decode()

    def report_failure(self, generation: int, rank: int, step: int, held: np.ndarray) -> None:
        """A survivor of ``generation``: the step it resumes at and its slots' experts [L, S]."""
        report = {"step": step, "held": held.tolist()}
        self.store.set(f"failed/{generation}/{rank}", json.dumps(report))

    def failure_reports(self, generation: int, world: int) -> dict[int, dict]:
        return {
            r: json.loads(self.store.get(f"failed/{generation}/{r}"))
            for r in range(world)
            if self._has(f"failed/{generation}/{r}")
        }


# --- torch.distributed ------------------------------------------------------------------------


def form_group(
    rendezvous: Rendezvous,
    generation: int,
    rank: int,
    world: int,
    device: torch.device,
    timeout_s: float,
) -> None:
    """Make generation ``generation``'s group of ``world`` ranks the default process group."""
    if dist.is_initialized():
        dist.destroy_process_group()
    if world == 1:
        return
    dist.init_process_group(
        backend="nccl" if device.type == "cuda" else "gloo",
        store=rendezvous.group_store(generation),
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=timeout_s),
    )


def leave_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def move_experts(
    layers_slots: list[dict[str, torch.Tensor]],
    old_phy2log: np.ndarray,
    new_phy2log: np.ndarray,
    slots_per_rank: int,
    rank: int,
    communicator: Communicator,
    reload_layer: list[Reloader] | None = None,
) -> int:
    """Fill this rank's slots [S, ...] per layer for ``new_phy2log`` [L, P'] from ``old`` [L, P].

    Every rank of the transfer group calls it with the same maps. Returns bytes received.
    """
    received = 0
    for layer, slots in enumerate(layers_slots):
        plan = plan_layer(old_phy2log[layer], new_phy2log[layer], slots_per_rank)
        reload = None if reload_layer is None else reload_layer[layer]
        received += execute_layer_plan(plan, rank, slots, communicator, reload)
    return received

"""The EPLB's communication channels: the one place that picks the weight-exchange backend for
a topology generation, opens what it needs, and closes it when the generation ends.

``backend_for`` resolves ``eplb.communicator`` (``auto``: ``resolve_auto``, by platform and
mode); ``open_channels`` builds the communicator and the groups it runs on for a group of
``world`` ranks (async rebalances get their own groups, or pynccl its own NCCL communicator,
never the forward pass's); ``Channels.close`` destroys them. The engine opens one set per
generation and closes it before the next; a resize's expert moves open and close their own.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from moe_worker.config import EPLBConfig, RankEnv

from .communicator import Communicator, create_communicator, resolve_auto

log = logging.getLogger("moe_worker.eplb.channels")
_open: set[int] = set()  # id() of every channel set not closed yet
_opened = [0]


def open_count() -> int:
    """Channel sets open in this process (one per live generation; more is a leak)."""
    return len(_open)


def opened_count() -> int:
    """Channel sets opened in this process so far."""
    return _opened[0]


def backend_for(eplb: EPLBConfig, device: torch.device | str, use_async: bool | None = None) -> str:
    """The communicator that runs for ``eplb.communicator`` on ``device``."""
    mode = eplb.use_async if use_async is None else use_async
    return resolve_auto(device, mode) if eplb.communicator == "auto" else eplb.communicator


@dataclass(eq=False)
class Channels:
    """One generation's weight-exchange communicator, the process groups opened for it, and
    the gloo group async rebalances agree on (None for synchronous rebalances)."""

    backend: str
    communicator: Communicator
    control_group: dist.ProcessGroup | None = None
    groups: list[dist.ProcessGroup] = field(default_factory=list)
    closed: bool = False

    def close(self, abort: bool = False) -> None:
        """Release everything; ``abort`` when a peer may be gone (nothing waits for it)."""
        if self.closed:
            return
        self.closed = True
        _open.discard(id(self))
        self.communicator.close(abort=abort)
        for group in [*self.groups, *([self.control_group] if self.control_group else [])]:
            try:
                dist.destroy_process_group(group)
            except (ValueError, RuntimeError):
                pass  # went with the default group (destroyed first after a failure)


def open_channels(
    eplb: EPLBConfig,
    rank: int,
    world: int,
    device: torch.device,
    store: dist.Store | None = None,
    use_async: bool | None = None,
) -> Channels:
    """The channels for this rank of a ``world``-rank group (every rank calls it at the same
    point, so groups are created in the same order everywhere). ``store`` carries pynccl's
    id (the generation's; without one, a TCPStore on MASTER_PORT + 1); ``use_async``
    overrides the config's mode (a resize's moves run synchronously)."""
    asynchronous = eplb.use_async if use_async is None else use_async
    name = backend_for(eplb, device, asynchronous)
    timeout = timedelta(seconds=eplb.rebalance_timeout_s)
    channels: Channels
    if world == 1:
        single = create_communicator(name, device=device, rank=0, world=1, store=dist.HashStore())
        channels = Channels(name, single)
    else:
        control = dist.new_group(backend="gloo", timeout=timeout) if asynchronous else None
        if name == "torch_gloo" and (asynchronous or device.type == "cuda"):
            group = dist.new_group(backend="gloo", timeout=timeout)
            communicator = create_communicator(name, group=group, device=device)
            channels = Channels(name, communicator, control, [group])
        elif name == "torch_nccl" and asynchronous:
            group = dist.new_group(backend="nccl", timeout=timeout)
            communicator = create_communicator(name, group=group, device=device)
            channels = Channels(name, communicator, control, [group])
        elif name == "pynccl":
            if store is None:
                env = RankEnv.from_environ(dict(os.environ))
                store = dist.TCPStore(
                    env.master_addr, env.master_port + 1, world, rank == 0, timeout=timeout
                )
            communicator = create_communicator(
                name, rank=rank, world=world, store=store, device=device
            )
            channels = Channels(name, communicator, control)
        else:  # the default group's own backend, between steps
            channels = Channels(name, create_communicator(name, device=device), control)
    _open.add(id(channels))
    _opened[0] += 1
    log.debug("rank %d: %s channels open for %d ranks", rank, name, world)
    return channels

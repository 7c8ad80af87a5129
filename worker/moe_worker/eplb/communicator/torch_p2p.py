"""torch.distributed point-to-point backends.

- ``torch_nccl``: batched isend/irecv of GPU tensors on an NCCL group.
- ``torch_gloo``: gloo on separate gloo groups ("lanes"). Tensors are cut into chunks spread
  over the lanes; CPU chunks go directly; GPU chunks are staged through pinned host buffers,
  pipelined: while one chunk is on the wire the next is copied device->host (a chunk's copy is
  complete before its send starts), and a received chunk is copied host->device while the next
  one arrives. Each (direction, lane) runs in the queued order, which every rank shares, so
  they cannot deadlock.
  Between ranks that can map one file under /dev/shm (one pod, one machine), the bytes go
  through shared memory instead and gloo carries only small messages (``shm_link``); a pair
  that cannot falls back to gloo. Each (direction, lane) moves its gloo pairs' chunks first,
  then its shared-memory pairs', both in the queued order, so every rank still runs one
  order.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
import torch.distributed as dist

from . import shm_link
from .base import Communicator, register

CHUNK_BYTES = 64 << 20


def _wait(work: Any) -> None:
    if work is None:
        raise RuntimeError("this rank is not in the communicator's group")
    work.wait()


def _global(group: dist.ProcessGroup | None, rank: int) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)


@register("torch_nccl")
class TorchNcclCommunicator(Communicator):
    def __init__(self, group: dist.ProcessGroup | None = None, **_: Any) -> None:
        self.group = group
        self._ops: list[dist.P2POp] = []

    def add_send(self, tensor: torch.Tensor, dst_rank: int) -> None:
        self._ops.append(
            dist.P2POp(dist.isend, tensor.contiguous(), _global(self.group, dst_rank), self.group)
        )

    def add_recv(self, tensor: torch.Tensor, src_rank: int) -> None:
        if not tensor.is_contiguous():
            raise ValueError("receive buffers must be contiguous")
        self._ops.append(dist.P2POp(dist.irecv, tensor, _global(self.group, src_rank), self.group))

    def execute(self) -> None:
        ops, self._ops = self._ops, []
        if ops:
            for request in dist.batch_isend_irecv(ops):
                request.wait()


@register("torch_gloo")
class TorchGlooCommunicator(Communicator):
    """gloo point-to-point over one or more lanes (gloo groups, each its own connection).

    Every tensor is cut into chunks; chunk j travels on lane j mod lanes. Each (direction, lane)
    runs on its own thread in the queued order, so sends and receives, and the lanes, overlap,
    while per lane both sides still post in the same order.
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None = None,
        device: torch.device | str | None = None,
        chunk_bytes: int = CHUNK_BYTES,
        groups: list[dist.ProcessGroup] | None = None,
        shared_memory: bool = True,
        shm_slot_bytes: int = shm_link.SLOT_BYTES,
        **_: Any,
    ) -> None:
        """``shared_memory``: offer same-host peers a /dev/shm link of two ``shm_slot_bytes``
        slots (every rank of a group must pass the same value)."""
        self.groups: list[dist.ProcessGroup | None] = list(groups) if groups else [group]
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.chunk_bytes = chunk_bytes
        self.shared_memory = shared_memory
        self.shm_slot_bytes = shm_slot_bytes
        self._ops: list[tuple[str, torch.Tensor, int]] = []
        self._pinned: dict[tuple[str, int], list[torch.Tensor]] = {}
        self._streams: dict[tuple[str, int], Any] = {}
        # (direction, lane, peer) -> the pair's shared slots, or None: gloo for that pair
        self._links: dict[tuple[str, int, int], shm_link.SharedSlots | None] = {}
        # One execute at a time: an abandoned rebalance's execute may still sit in a transfer
        # (until the group's timeout) when the next one starts; they share buffers and links.
        self._executing = threading.Lock()

    @property
    def stream(self) -> Any | None:
        return None  # copies run on per-lane streams and are complete when execute returns

    def add_send(self, tensor: torch.Tensor, dst_rank: int) -> None:
        self._ops.append(("send", tensor.contiguous(), _global(self.groups[0], dst_rank)))

    def add_recv(self, tensor: torch.Tensor, src_rank: int) -> None:
        if not tensor.is_contiguous():
            raise ValueError("receive buffers must be contiguous")
        self._ops.append(("recv", tensor, _global(self.groups[0], src_rank)))

    def _buffers(self, key: tuple[str, int]) -> list[torch.Tensor]:
        """Two pinned chunk buffers per (direction, lane), allocated once."""
        if key not in self._pinned:
            self._pinned[key] = [
                torch.empty(self.chunk_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(2)
            ]
        return self._pinned[key]

    def _stream(self, key: tuple[str, int]) -> Any:
        if key not in self._streams:
            self._streams[key] = torch.cuda.Stream(self.device)
        return self._streams[key]

    def execute(self) -> None:
        with self._executing:
            self._execute()

    def _execute(self) -> None:
        ops, self._ops = self._ops, []
        lanes = len(self.groups)
        work: dict[tuple[str, int], list[tuple[torch.Tensor, int]]] = {}
        for kind, tensor, peer in ops:
            flat = tensor.view(-1).view(torch.uint8)
            for index, start in enumerate(range(0, flat.numel(), self.chunk_bytes)):
                chunk = flat[start : start + self.chunk_bytes]
                work.setdefault((kind, index % lanes), []).append((chunk, peer))
        if not work:
            return
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # inputs are written
        errors: list[BaseException] = []
        threads = [
            threading.Thread(target=self._run_lane, args=(key, items, errors), daemon=True)
            for key, items in work.items()
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]

    def _run_lane(
        self,
        key: tuple[str, int],
        items: list[tuple[torch.Tensor, int]],
        errors: list[BaseException],
    ) -> None:
        kind, lane = key
        group = self.groups[lane]
        try:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            links = self._open_links(kind, lane, [peer for _, peer in items])
            for link in links.values():
                if link is not None:
                    link.begin()  # before anything can fail, so both sides count it
            by_gloo = [(chunk, peer) for chunk, peer in items if links[peer] is None]
            if by_gloo and not by_gloo[0][0].is_cuda:
                operation = dist.isend if kind == "send" else dist.irecv
                for chunk, peer in by_gloo:
                    _wait(operation(chunk, peer, group=group))
            elif by_gloo and kind == "send":
                self._send_staged(by_gloo, group, self._buffers(key), self._stream(key))
            elif by_gloo:
                self._recv_staged(by_gloo, group, self._buffers(key), self._stream(key))
            self._move_shared(kind, key, items, links, group)
        except BaseException as exc:  # noqa: BLE001 - re-raised by execute
            errors.append(exc)

    def _open_links(
        self, kind: str, lane: int, peers: list[int]
    ) -> dict[int, shm_link.SharedSlots | None]:
        """Each peer's link on this (direction, lane), offered or accepted at the first
        chunk between the two (the peers in the order their first chunks are queued)."""
        group = self.groups[lane]
        links: dict[int, shm_link.SharedSlots | None] = {}
        for peer in dict.fromkeys(peers):
            if (kind, lane, peer) not in self._links:
                link = None
                if self.shared_memory:
                    if kind == "send":
                        link = shm_link.offer(peer, group, self.shm_slot_bytes)
                    else:
                        link = shm_link.accept(peer, group)
                    if link is not None and self.device.type == "cuda":
                        link.pin()
                self._links[(kind, lane, peer)] = link
            links[peer] = self._links[(kind, lane, peer)]
        return links

    def _move_shared(
        self,
        kind: str,
        key: tuple[str, int],
        items: list[tuple[torch.Tensor, int]],
        links: dict[int, shm_link.SharedSlots | None],
        group: Any,
    ) -> None:
        """The chunks of this lane's shared-memory pairs, in the queued order."""
        stream = self._stream(key) if self.device.type == "cuda" else None
        move = shm_link.send_through if kind == "send" else shm_link.receive_through
        for chunk, peer in items:
            link = links[peer]
            if link is not None:
                move(link, chunk, peer, group, stream)
        for link in links.values():
            if link is not None:
                shm_link.finish(link)

    def close(self, abort: bool = False) -> None:
        """Drop the shared-memory links, never waiting: while an execute still runs (an
        abandoned transfer, until the group's timeout) its links are dropped still
        page-locked (the registration ends with the process), not unregistered under a
        copy."""
        if not self._executing.acquire(blocking=False):
            self._links = {}
            return
        try:
            for link in self._links.values():
                if link is not None:
                    link.close()
            self._links = {}
        finally:
            self._executing.release()

    @staticmethod
    def _send_staged(
        items: list[tuple[torch.Tensor, int]], group: Any, buffers: list[torch.Tensor], stream: Any
    ) -> None:
        pending: list[Any] = [None, None]
        for index, (chunk, peer) in enumerate(items):
            slot = index % 2
            if pending[slot] is not None:
                pending[slot].wait()  # the buffer is free once its previous send completed
            host = buffers[slot][: chunk.numel()]
            with torch.cuda.stream(stream):
                host.copy_(chunk, non_blocking=True)
            stream.synchronize()  # device->host copy complete before the send starts
            pending[slot] = dist.isend(host, peer, group=group)
        for work in pending:
            if work is not None:
                work.wait()

    @staticmethod
    def _recv_staged(
        items: list[tuple[torch.Tensor, int]], group: Any, buffers: list[torch.Tensor], stream: Any
    ) -> None:
        copies: list[Any] = [None, None]
        for index, (chunk, peer) in enumerate(items):
            slot = index % 2
            if copies[slot] is not None:
                copies[slot].synchronize()  # the previous host->device copy left this buffer
            host = buffers[slot][: chunk.numel()]
            _wait(dist.irecv(host, peer, group=group))
            with torch.cuda.stream(stream):
                chunk.copy_(host, non_blocking=True)
                event = torch.cuda.Event()
                event.record(stream)
            copies[slot] = event
        stream.synchronize()

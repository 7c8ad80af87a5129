"""torch.distributed point-to-point backends.

- ``torch_nccl``: batched isend/irecv of GPU tensors on an NCCL group.
- ``torch_gloo``: gloo on separate gloo groups ("lanes"). Tensors are cut into chunks spread
  over the lanes; CPU chunks go directly; GPU chunks are staged through pinned host buffers,
  pipelined: while one chunk is on the wire the next is copied device->host (a chunk's copy is
  complete before its send starts), and a received chunk is copied host->device while the next
  one arrives. Each (direction, lane) runs in the queued order, which every rank shares, so
  they cannot deadlock.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
import torch.distributed as dist

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
        **_: Any,
    ) -> None:
        self.groups: list[dist.ProcessGroup | None] = list(groups) if groups else [group]
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.chunk_bytes = chunk_bytes
        self._ops: list[tuple[str, torch.Tensor, int]] = []
        self._pinned: dict[tuple[str, int], list[torch.Tensor]] = {}
        self._streams: dict[tuple[str, int], Any] = {}

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
            if not items[0][0].is_cuda:
                operation = dist.isend if kind == "send" else dist.irecv
                for chunk, peer in items:
                    _wait(operation(chunk, peer, group=group))
            elif kind == "send":
                self._send_staged(items, group, self._buffers(key), self._stream(key))
            else:
                self._recv_staged(items, group, self._buffers(key), self._stream(key))
        except BaseException as exc:  # noqa: BLE001 - re-raised by execute
            errors.append(exc)

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

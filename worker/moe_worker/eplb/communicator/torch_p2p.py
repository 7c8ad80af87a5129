"""torch.distributed point-to-point backends.

- ``torch_nccl``: batched isend/irecv of GPU tensors on an NCCL group.
- ``torch_gloo``: gloo on a (separate) gloo group. CPU tensors go directly; GPU tensors are
  staged through pinned host buffers in chunks, pipelined: while one chunk is on the wire the
  next is copied device->host (a chunk's copy is complete before its send starts), and a
  received chunk is copied host->device while the next one arrives. Sends (on a helper thread)
  and receives each run in the queued order, which every rank shares, so they cannot deadlock.
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
    def __init__(
        self,
        group: dist.ProcessGroup | None = None,
        device: torch.device | str | None = None,
        chunk_bytes: int = CHUNK_BYTES,
        **_: Any,
    ) -> None:
        self.group = group
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.chunk_bytes = chunk_bytes
        self._ops: list[tuple[str, torch.Tensor, int]] = []
        self._pinned: dict[str, list[torch.Tensor]] = {}
        cuda = self.device.type == "cuda"
        # One copy stream per direction, so device->host and host->device copies overlap.
        self._streams = (
            {d: torch.cuda.Stream(self.device) for d in ("send", "recv")} if cuda else {}
        )

    @property
    def stream(self) -> Any | None:
        return self._streams.get("recv")

    def add_send(self, tensor: torch.Tensor, dst_rank: int) -> None:
        self._ops.append(("send", tensor.contiguous(), _global(self.group, dst_rank)))

    def add_recv(self, tensor: torch.Tensor, src_rank: int) -> None:
        if not tensor.is_contiguous():
            raise ValueError("receive buffers must be contiguous")
        self._ops.append(("recv", tensor, _global(self.group, src_rank)))

    def _buffers(self, direction: str) -> list[torch.Tensor]:
        """Two pinned chunk buffers per direction, allocated once."""
        if direction not in self._pinned:
            self._pinned[direction] = [
                torch.empty(self.chunk_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(2)
            ]
        return self._pinned[direction]

    def execute(self) -> None:
        """Sends run on a helper thread, receives on this one, each in the queued order: the
        two directions overlap, and per peer both sides still post in the same order."""
        ops, self._ops = self._ops, []
        sends = [(tensor, peer) for kind, tensor, peer in ops if kind == "send"]
        recvs = [(tensor, peer) for kind, tensor, peer in ops if kind == "recv"]
        errors: list[BaseException] = []

        def run_sends() -> None:
            try:
                for tensor, peer in sends:
                    if tensor.is_cuda:
                        self._send_staged(tensor, peer, self._buffers("send"))
                    else:
                        _wait(dist.isend(tensor, peer, group=self.group))
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                errors.append(exc)

        sender = threading.Thread(target=run_sends, name="gloo-send", daemon=True)
        sender.start()
        try:
            for tensor, peer in recvs:
                if tensor.is_cuda:
                    self._recv_staged(tensor, peer, self._buffers("recv"))
                else:
                    _wait(dist.irecv(tensor, peer, group=self.group))
        finally:
            sender.join()
        if errors:
            raise errors[0]

    def _chunks(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        flat = tensor.view(-1).view(torch.uint8)
        return [flat[i : i + self.chunk_bytes] for i in range(0, flat.numel(), self.chunk_bytes)]

    def _send_staged(self, tensor: torch.Tensor, peer: int, buffers: list[torch.Tensor]) -> None:
        stream = self._streams["send"]
        chunks = self._chunks(tensor)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        pending: list[Any] = [None, None]
        events: list[torch.cuda.Event] = []
        for index, chunk in enumerate(chunks):
            slot = index % 2
            if pending[slot] is not None:
                pending[slot].wait()  # the buffer is free once its previous send completed
            host = buffers[slot][: chunk.numel()]
            with torch.cuda.stream(stream):
                host.copy_(chunk, non_blocking=True)
                event = torch.cuda.Event()
                event.record(stream)
            events.append(event)
            event.synchronize()  # device->host copy complete before the send starts
            pending[slot] = dist.isend(host, peer, group=self.group)
        for work in pending:
            if work is not None:
                work.wait()

    def _recv_staged(self, tensor: torch.Tensor, peer: int, buffers: list[torch.Tensor]) -> None:
        stream = self._streams["recv"]
        chunks = self._chunks(tensor)
        copies: list[Any] = [None, None]
        for index, chunk in enumerate(chunks):
            slot = index % 2
            if copies[slot] is not None:
                copies[slot].synchronize()  # the previous host->device copy left this buffer
            host = buffers[slot][: chunk.numel()]
            _wait(dist.irecv(host, peer, group=self.group))
            with torch.cuda.stream(stream):
                chunk.copy_(host, non_blocking=True)
                event = torch.cuda.Event()
                event.record(stream)
            copies[slot] = event
        stream.synchronize()

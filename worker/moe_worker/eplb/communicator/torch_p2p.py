"""torch.distributed point-to-point: batched isend/irecv on the EP process group.

Registered as ``torch_gloo`` (CPU tensors over gloo) and ``torch_nccl`` (GPU tensors over
NCCL): the same calls, the group's backend decides the transport.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from .base import Communicator, register


class TorchP2PCommunicator(Communicator):
    def __init__(self, group: dist.ProcessGroup | None = None, **_: Any) -> None:
        self.group = group
        self._ops: list[dist.P2POp] = []

    def _global(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def add_send(self, tensor: torch.Tensor, dst_rank: int) -> None:
        self._ops.append(
            dist.P2POp(dist.isend, tensor.contiguous(), self._global(dst_rank), self.group)
        )

    def add_recv(self, tensor: torch.Tensor, src_rank: int) -> None:
        if not tensor.is_contiguous():
            raise ValueError("receive buffers must be contiguous")
        self._ops.append(dist.P2POp(dist.irecv, tensor, self._global(src_rank), self.group))

    def execute(self) -> None:
        ops, self._ops = self._ops, []
        if not ops:
            return
        for request in dist.batch_isend_irecv(ops):
            request.wait()


register("torch_gloo")(TorchP2PCommunicator)
register("torch_nccl")(TorchP2PCommunicator)

"""A shared-memory link between two ranks on one host, for ``torch_gloo``'s bulk bytes.

gloo moves bytes over TCP, even between two processes of one host (1-1.5 GB/s over the
loopback, measured; memory copies run several times faster). When a sender and its receiver can
map the same file under ``/dev/shm`` (ranks of one pod, or of one machine), the bytes go through
two slots of that file instead, and gloo carries only small messages:

- once per (sender, receiver, lane): the sender creates the file and sends its path (tag
  ``HELLO``); the receiver maps it, or cannot (another pod's ``/dev/shm``), and answers 1 or 0
  (``ACCEPT``); the sender then unlinks the file (both keep their mappings), so nothing is left
  behind. A refused offer means gloo as before, for that pair and lane.
- per piece of at most ``slot_bytes``: the sender fills slot ``k mod 2`` (after the receiver
  freed it) and sends its length (``READY``); the receiver copies it out and answers ``FREE``.

A gloo send completes only once its receive is posted, so every receive of a small message is
posted before the matching send can wait on it: the sender posts the receive of a piece's
``FREE`` as soon as its ``READY`` went out, the receiver does not wait for its ``FREE`` sends
until the end. Both sides count pieces from 0 in every ``execute`` (the sender waits for every
``FREE`` before returning), so the slot of a piece is known to both without saying it.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

HELLO, ACCEPT, READY, FREE = 7101, 7102, 7103, 7104  # gloo tags of the link's messages
SLOT_BYTES = 16 << 20
HEADER_BYTES = 512
SHM_DIRECTORY = "/dev/shm"


def _wait(work: Any) -> None:
    if work is None:
        raise RuntimeError("this rank is not in the communicator's group")
    work.wait()


@dataclass
class SharedSlots:
    """Two slots of ``slot_bytes`` in a file both ranks map ([2, slot_bytes] uint8 views)."""

    memory: torch.Tensor  # [2 * slot_bytes] uint8, shared with the peer
    slot_bytes: int
    registered: bool = False  # page-locked for CUDA copies (cudaHostRegister)
    pieces: int = 0  # pieces moved in this execute
    # posted receives of FREE (sender) or FREE sends not yet complete (receiver), oldest first
    pending: deque[tuple[Any, torch.Tensor]] = field(default_factory=deque)

    def slot(self, piece: int) -> torch.Tensor:
        start = (piece % 2) * self.slot_bytes
        return self.memory[start : start + self.slot_bytes]

    def pin(self) -> None:
        """Page-lock the mapping, so device copies to and from it run at pinned speed (left
        pageable where the platform refuses: slower copies, same bytes)."""
        if torch.cuda.is_available() and not self.registered:
            result = torch.cuda.cudart().cudaHostRegister(
                self.memory.data_ptr(), self.memory.numel(), 0
            )
            self.registered = int(result) == 0

    def close(self) -> None:
        if self.registered:
            torch.cuda.cudart().cudaHostUnregister(self.memory.data_ptr())
            self.registered = False


def offer(peer: int, group: Any, slot_bytes: int = SLOT_BYTES) -> SharedSlots | None:
    """Sender side: offer ``peer`` a fresh shared file; the slots if it mapped them."""
    header = torch.zeros(HEADER_BYTES, dtype=torch.uint8)
    path = os.path.join(SHM_DIRECTORY, f"moe-eplb-{uuid.uuid4().hex}")
    memory = None
    try:
        with open(path, "xb") as handle:
            # Reserve the pages now: a full /dev/shm (a container's default is 64 MB) refuses
            # here, and the pair uses gloo, instead of a SIGBUS at the first write.
            os.posix_fallocate(handle.fileno(), 0, 2 * slot_bytes)
        memory = torch.from_file(path, shared=True, size=2 * slot_bytes, dtype=torch.uint8)
        text = f"{path}\n{2 * slot_bytes}".encode()
        header[: len(text)] = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    except (OSError, RuntimeError):  # no /dev/shm here: offer nothing (an empty header)
        memory = None
    try:
        answer = torch.zeros(1, dtype=torch.uint8)
        answered = dist.irecv(answer, peer, group=group, tag=ACCEPT)
        _wait(dist.isend(header, peer, group=group, tag=HELLO))
        _wait(answered)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
    if memory is None or int(answer.item()) != 1:
        return None
    return SharedSlots(memory, slot_bytes)


def accept(peer: int, group: Any) -> SharedSlots | None:
    """Receiver side: map what ``peer`` offers, and say whether it could."""
    header = torch.zeros(HEADER_BYTES, dtype=torch.uint8)
    _wait(dist.irecv(header, peer, group=group, tag=HELLO))
    text = bytes(header.tolist()).rstrip(b"\0").decode()
    slots = None
    if text:
        path, size = text.split("\n")
        try:
            memory = torch.from_file(path, shared=True, size=int(size), dtype=torch.uint8)
            slots = SharedSlots(memory, int(size) // 2)
        except (OSError, RuntimeError, ValueError):  # another pod's /dev/shm: not visible here
            slots = None
    answer = torch.tensor([1 if slots is not None else 0], dtype=torch.uint8)
    _wait(dist.isend(answer, peer, group=group, tag=ACCEPT))
    return slots


def send_through(
    slots: SharedSlots, chunk: torch.Tensor, peer: int, group: Any, stream: Any
) -> None:
    """Put ``chunk`` ([N] uint8, CPU or CUDA) through ``slots`` to ``peer``, piece by piece."""
    length = torch.zeros(1, dtype=torch.int64)
    for start in range(0, chunk.numel(), slots.slot_bytes):
        piece = chunk[start : start + slots.slot_bytes]
        if len(slots.pending) == 2:  # both slots hold unread pieces: wait for the older
            _wait(slots.pending.popleft()[0])
        target = slots.slot(slots.pieces)[: piece.numel()]
        if piece.is_cuda:
            with torch.cuda.stream(stream):
                target.copy_(piece, non_blocking=slots.registered)
            stream.synchronize()
        else:
            target.copy_(piece)
        length[0] = piece.numel()
        _wait(dist.isend(length, peer, group=group, tag=READY))
        freed = torch.zeros(1, dtype=torch.uint8)
        slots.pending.append((dist.irecv(freed, peer, group=group, tag=FREE), freed))
        slots.pieces += 1


def receive_through(
    slots: SharedSlots, chunk: torch.Tensor, peer: int, group: Any, stream: Any
) -> None:
    """Fill ``chunk`` ([N] uint8, CPU or CUDA) from ``peer`` through ``slots``."""
    length = torch.zeros(1, dtype=torch.int64)
    start = 0
    while start < chunk.numel():
        _wait(dist.irecv(length, peer, group=group, tag=READY))
        size = int(length.item())
        source = slots.slot(slots.pieces)[:size]
        target = chunk[start : start + size]
        if target.is_cuda:
            with torch.cuda.stream(stream):
                target.copy_(source, non_blocking=slots.registered)
            stream.synchronize()
        else:
            target.copy_(source)
        freed = torch.ones(1, dtype=torch.uint8)
        slots.pending.append((dist.isend(freed, peer, group=group, tag=FREE), freed))
        slots.pieces += 1
        start += size


def finish(slots: SharedSlots) -> None:
    """End this execute on ``slots``: the sender's last pieces freed by the receiver, the
    receiver's ``FREE`` messages delivered; the next execute counts from piece 0."""
    while slots.pending:
        _wait(slots.pending.popleft()[0])
    slots.pieces = 0

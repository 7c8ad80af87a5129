"""A shared-memory link between two ranks on one host, for ``torch_gloo``'s bulk bytes.

gloo moves bytes over TCP, even between two processes of one host (1-1.5 GB/s over the
loopback, measured; memory copies run several times faster). When a sender and its receiver can
map the same file under ``/dev/shm`` (ranks of one pod, or of one machine), the bytes go through
two slots of that file instead, and gloo carries only small messages:

- once per (sender, receiver, lane): the sender creates the file, writes a random nonce at its
  start and sends path, size and nonce (tag ``HELLO``); the receiver maps the file if it exists
  there with that size and nonce (never creating one: another pod's ``/dev/shm`` has no such
  file) and answers 1 or 0 (``ACCEPT``); the sender then unlinks the file (both keep their
  mappings). A refused offer means gloo as before, for that pair and lane.
- per ``execute`` (an "epoch", counted alike on both sides): the receiver says ``GO`` before
  the sender writes anything, so a slot is never written while the receiver's previous,
  failed execute could still be reading it; the epoch is in every tag of that execute, so a
  message or a posted receive left over from a failed one never matches a later one.
- per piece of at most ``slot_bytes``: the sender fills slot ``k mod 2`` (after the receiver
  freed it) and sends its length (``READY``); the receiver copies it out and answers ``FREE``.

A gloo send completes only once its receive is posted, so every receive of a small message is
posted before the matching send can wait on it: the sender posts the receive of a piece's
``FREE`` as soon as its ``READY`` went out, the receiver does not wait for its ``FREE`` sends
until the end. Both sides count pieces from 0 in every execute, so the slot of a piece is known
to both without saying it.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import secrets
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

HELLO, ACCEPT = 7101, 7102  # handshake tags (once per link)
EPOCH_TAG_BASE, EPOCHS = 7200, 4096  # per-execute tags: base + 4 * (epoch mod EPOCHS) + kind
GO, READY, FREE = 0, 1, 2
SLOT_BYTES = 16 << 20
HEADER_BYTES = 512
NONCE_BYTES = 16
SHM_DIRECTORY = "/dev/shm"


def _wait(work: Any) -> None:
    if work is None:
        raise RuntimeError("this rank is not in the communicator's group")
    work.wait()


@dataclass
class SharedSlots:
    """Two slots of ``slot_bytes`` in a file both ranks map."""

    mapping: mmap.mmap
    memory: torch.Tensor  # [2 * slot_bytes] uint8 over ``mapping``, shared with the peer
    slot_bytes: int
    registered: bool = False  # page-locked for CUDA copies (cudaHostRegister)
    epoch: int = 0  # executes this link took part in (the same count on both sides)
    pieces: int = 0  # pieces moved in this execute
    started: bool = False  # GO sent (receiver) or received (sender) in this execute
    # posted receives of FREE (sender) or FREE/GO sends not yet complete (receiver)
    pending: deque[tuple[Any, torch.Tensor]] = field(default_factory=deque)

    def slot(self, piece: int) -> torch.Tensor:
        start = (piece % 2) * self.slot_bytes
        return self.memory[start : start + self.slot_bytes]

    def tag(self, kind: int) -> int:
        return EPOCH_TAG_BASE + 4 * (self.epoch % EPOCHS) + kind

    def begin(self) -> None:
        """A new execute: a new epoch; what a failed earlier one left behind is dropped."""
        self.epoch += 1
        self.pieces, self.started = 0, False
        self.pending.clear()

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


def _copy(target: torch.Tensor, source: torch.Tensor, stream: Any, pinned: bool) -> None:
    """Copy ``source`` into ``target`` (either on the GPU or both on the host), complete on
    return: on the GPU on ``stream``, asynchronously only when the host side is page-locked."""
    if target.is_cuda or source.is_cuda:
        with torch.cuda.stream(stream):
            target.copy_(source, non_blocking=pinned)
        stream.synchronize()
    else:
        target.copy_(source)


def map_existing(path: str, size: int, nonce: bytes) -> SharedSlots | None:
    """Map the file at ``path`` if it exists here with ``size`` bytes and starts with ``nonce``
    (None otherwise); never creates a file."""
    try:
        descriptor = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        if os.fstat(descriptor).st_size != size:
            return None
        mapping = mmap.mmap(descriptor, size)
    except (OSError, ValueError):
        return None
    finally:
        os.close(descriptor)
    if mapping[:NONCE_BYTES] != nonce:
        mapping.close()
        return None
    memory = torch.frombuffer(mapping, dtype=torch.uint8)
    return SharedSlots(mapping, memory, size // 2)


def offer(peer: int, group: Any, slot_bytes: int = SLOT_BYTES) -> SharedSlots | None:
    """Sender side: offer ``peer`` a fresh shared file; the slots if it mapped them."""
    header = torch.zeros(HEADER_BYTES, dtype=torch.uint8)
    path = os.path.join(SHM_DIRECTORY, f"moe-eplb-{uuid.uuid4().hex}")
    size, nonce = 2 * slot_bytes, secrets.token_bytes(NONCE_BYTES)
    slots = None
    try:
        with open(path, "xb") as handle:
            # Reserve the pages now: a full /dev/shm (a container's default is 64 MB) refuses
            # here, and the pair uses gloo, instead of a SIGBUS at the first write.
            os.posix_fallocate(handle.fileno(), 0, size)
            handle.write(nonce)
        slots = map_existing(path, size, nonce)
        if slots is not None:
            text = f"{path}\n{size}\n{nonce.hex()}".encode()
            header[: len(text)] = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    except OSError:  # no /dev/shm here, or no room: offer nothing (an empty header)
        slots = None
    try:
        answer = torch.zeros(1, dtype=torch.uint8)
        answered = dist.irecv(answer, peer, group=group, tag=ACCEPT)
        _wait(dist.isend(header, peer, group=group, tag=HELLO))
        _wait(answered)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
    return slots if slots is not None and int(answer.item()) == 1 else None


def accept(peer: int, group: Any) -> SharedSlots | None:
    """Receiver side: map what ``peer`` offers, and say whether it could."""
    header = torch.zeros(HEADER_BYTES, dtype=torch.uint8)
    _wait(dist.irecv(header, peer, group=group, tag=HELLO))
    text = bytes(header.tolist()).rstrip(b"\0").decode()
    slots = None
    if text:
        path, size, nonce = text.split("\n")
        slots = map_existing(path, int(size), bytes.fromhex(nonce))
    answer = torch.tensor([1 if slots is not None else 0], dtype=torch.uint8)
    _wait(dist.isend(answer, peer, group=group, tag=ACCEPT))
    return slots


def send_through(
    slots: SharedSlots, chunk: torch.Tensor, peer: int, group: Any, stream: Any
) -> None:
    """Put ``chunk`` ([N] uint8, CPU or CUDA) through ``slots`` to ``peer``, piece by piece."""
    if not slots.started:  # the receiver's earlier executes are over: the slots are free
        _wait(dist.irecv(torch.zeros(1, dtype=torch.uint8), peer, group=group, tag=slots.tag(GO)))
        slots.started = True
    length = torch.zeros(1, dtype=torch.int64)
    for start in range(0, chunk.numel(), slots.slot_bytes):
        piece = chunk[start : start + slots.slot_bytes]
        if len(slots.pending) == 2:  # both slots hold unread pieces: wait for the older
            _wait(slots.pending.popleft()[0])
        _copy(slots.slot(slots.pieces)[: piece.numel()], piece, stream, slots.registered)
        length[0] = piece.numel()
        _wait(dist.isend(length, peer, group=group, tag=slots.tag(READY)))
        freed = torch.zeros(1, dtype=torch.uint8)
        slots.pending.append((dist.irecv(freed, peer, group=group, tag=slots.tag(FREE)), freed))
        slots.pieces += 1


def receive_through(
    slots: SharedSlots, chunk: torch.Tensor, peer: int, group: Any, stream: Any
) -> None:
    """Fill ``chunk`` ([N] uint8, CPU or CUDA) from ``peer`` through ``slots``."""
    if not slots.started:
        go = torch.ones(1, dtype=torch.uint8)
        slots.pending.append((dist.isend(go, peer, group=group, tag=slots.tag(GO)), go))
        slots.started = True
    length = torch.zeros(1, dtype=torch.int64)
    start = 0
    while start < chunk.numel():
        _wait(dist.irecv(length, peer, group=group, tag=slots.tag(READY)))
        size = int(length.item())
        source = slots.slot(slots.pieces)[:size]
        _copy(chunk[start : start + size], source, stream, slots.registered)
        freed = torch.ones(1, dtype=torch.uint8)
        slots.pending.append((dist.isend(freed, peer, group=group, tag=slots.tag(FREE)), freed))
        slots.pieces += 1
        start += size


def finish(slots: SharedSlots) -> None:
    """End this execute on ``slots``: the sender's last pieces freed by the receiver, the
    receiver's ``GO``/``FREE`` messages delivered."""
    while slots.pending:
        _wait(slots.pending.popleft()[0])

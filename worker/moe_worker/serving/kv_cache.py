"""Paged KV storage and the layout of a packed step: many sequences' tokens in one forward.

A step runs the scheduled chunks of several sequences as one row of T tokens (batch size 1);
each token carries its own position (``position_ids``) and sees only its own sequence's earlier
tokens. Keys and values live in a ``KVArena``: per decoder layer one pool of keys and one of
values, [heads, slots, head_dim], handed out in blocks of ``BLOCK_TOKENS`` token slots; a
sequence's ``SequenceKV`` holds its blocks (returned to the arena when it is dropped).

``StepLayout`` is computed once per step on the host (numpy) and copied to the device in one
transfer: the token positions [T], the slot each new token is written to [T], and the two
attention groups the packed attention (``moe_worker.serving.packed_attention``) runs:

- decodes: sequences with one new token, batched as [D, heads, 1, head_dim] queries against
  their own keys gathered to [D, heads, Lmax, head_dim] (a padding mask per sequence), in
  buckets of similar lengths (``decode_buckets``: a bucket's shortest sequence sees more than
  half its longest one's keys), so one long sequence does not pad every short one;
- the rest (prefill chunks, speculative verifications): their rows packed as one sequence of
  T_p queries against K_p keys (every such sequence's cached keys then its new ones), with a
  mask letting a token see only its own sequence's keys at positions <= its own.

``PackedKVCache`` is what transformers' attention modules see as their cache: ``update`` writes
the step's new keys/values into the arena and returns the keys/values the step reads, gathered
in one copy each: [1, heads, N, D] with N = each decode bucket's D x Lmax, then K_p (the
packed rows').
Whatever a model does to cached states between the cache and its attention (DeepSeek's MLA
caches a compressed latent and expands it per token) then applies to exactly those tokens.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

BLOCK_TOKENS = 16
INITIAL_BLOCKS = 64


class KVArena:
    """One model's paged KV pools on ``device``: ``keys[layer]`` and ``values[layer]``
    [heads, blocks x BLOCK_TOKENS, head_dim], allocated at a layer's first write (its heads,
    head size and dtype) and grown by doubling the block count."""

    def __init__(self, device: torch.device, initial_blocks: int = INITIAL_BLOCKS) -> None:
        self.device = device
        self.capacity = initial_blocks  # blocks every layer's pool holds (after its next write)
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self._free: list[int] = list(range(initial_blocks - 1, -1, -1))
        self._lock = threading.Lock()  # blocks come back from whichever thread drops a sequence

    @property
    def free_blocks(self) -> int:
        with self._lock:
            return len(self._free)

    def allocate(self, count: int) -> list[int]:
        """``count`` free blocks (the arena grows when it has too few)."""
        with self._lock:
            if len(self._free) < count:
                grown = max(2 * self.capacity, self.capacity + count - len(self._free))
                self._free[:0] = range(grown - 1, self.capacity - 1, -1)
                self.capacity = grown
            taken = self._free[-count:] if count else []
            del self._free[len(self._free) - count :]
        return taken

    def release(self, blocks: list[int]) -> None:
        with self._lock:
            self._free.extend(blocks)
            blocks.clear()

    def _pool(self, pools: dict[int, torch.Tensor], layer: int, like: torch.Tensor) -> torch.Tensor:
        """Layer ``layer``'s pool shaped for ``like`` [heads, T, D], grown to the capacity."""
        slots = self.capacity * BLOCK_TOKENS
        pool = pools.get(layer)
        if pool is None or pool.shape[1] < slots:
            fresh = torch.empty(
                (like.shape[0], slots, like.shape[2]), dtype=like.dtype, device=self.device
            )
            if pool is not None:
                fresh[:, : pool.shape[1]] = pool
            pools[layer] = pool = fresh
        return pool

    def store(
        self, layer: int, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write a step's new ``keys``/``values`` [heads, T, D] at token ``slots`` [T]; return
        the layer's pools [heads, slots, D]."""
        key_pool = self._pool(self.keys, layer, keys)
        value_pool = self._pool(self.values, layer, values)
        key_pool.index_copy_(1, slots, keys.to(key_pool.dtype))
        value_pool.index_copy_(1, slots, values.to(value_pool.dtype))
        return key_pool, value_pool


@dataclass
class SequenceKV:
    """One sequence's cached tokens: ``length`` of them, at the token slots of its ``blocks``
    (in its arena, bound at its first step)."""

    length: int = 0  # tokens cached in every layer after the last completed step
    blocks: list[int] = field(default_factory=list)
    arena: KVArena | None = None

    def reserve(self, arena: KVArena, tokens: int) -> None:
        """Blocks for ``tokens`` tokens in ``arena`` (the blocks go back when this is dropped)."""
        if self.arena is None:
            self.arena = arena
            weakref.finalize(self, arena.release, self.blocks)
        elif self.arena is not arena:
            raise ValueError("a sequence's cache belongs to one model's arena")
        missing = -(-tokens // BLOCK_TOKENS) - len(self.blocks)
        if missing > 0:
            self.blocks.extend(arena.allocate(missing))

    def slots(self, positions: np.ndarray) -> np.ndarray:
        """Token slots of ``positions`` (int64 array) in the arena's pools."""
        table = np.asarray(self.blocks, dtype=np.int64)
        return table[positions // BLOCK_TOKENS] * BLOCK_TOKENS + positions % BLOCK_TOKENS


@dataclass(frozen=True)
class PackedStep:
    """The layout of one step: for each scheduled sequence, its cache and new-token count."""

    caches: list[SequenceKV]
    new_tokens: list[int]


class StepLayout:
    """A packed step's positions, write slots and attention groups, on the device.

    Attributes (device tensors, int64 unless noted): ``positions`` [1, T]; ``write_slots`` [T];
    ``read_slots`` [N]: the slots the step reads, each decode bucket's [D_b x Lmax_b] then the
    packed rows' [K_p]; decodes: ``decode_buckets`` [(D_b, Lmax_b)] (each decode's keys padded
    with its first), ``decode_rows`` [D] (their rows in the step, bucket after bucket),
    ``decode_lengths`` [D] (keys each sees);
    the rest: ``packed_rows`` [T_p], and for its mask the sequence and position of every query
    (``query_seq``, ``query_pos`` [T_p]) and key (``key_seq``, ``key_pos`` [K_p]).
    ``in_order``: the step is one attention group (all decodes in one bucket, or no decode)
    whose rows are the step's rows in order. ``arena``: where the step's caches live.
    """

    def __init__(self, step: PackedStep, arena: KVArena, device: torch.device) -> None:
        self.step = step
        self.arena = arena
        counts = np.asarray(step.new_tokens, dtype=np.int64)
        lengths = np.asarray([cache.length for cache in step.caches], dtype=np.int64)
        for cache, length, count in zip(step.caches, lengths, counts, strict=True):
            cache.reserve(arena, int(length + count))
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        total = int(counts.sum())
        seq_of_row = np.repeat(np.arange(len(counts)), counts)
        positions = np.arange(total) - starts[seq_of_row] + lengths[seq_of_row]
        write = np.concatenate(
            [
                cache.slots(positions[start : start + count])
                for cache, start, count in zip(step.caches, starts, counts, strict=True)
            ]
        )
        decode = np.flatnonzero(counts == 1)
        rest = np.flatnonzero(counts != 1)
        parts: dict[str, np.ndarray] = {"positions": positions, "write_slots": write}
        reads: list[np.ndarray] = []
        self.decode_buckets: list[tuple[int, int]] = []
        self.in_order = len(decode) == 0
        if len(decode):
            buckets = length_buckets(lengths[decode] + 1)
            self.in_order = len(rest) == 0 and len(buckets) == 1
            decode = np.concatenate([decode[bucket] for bucket in buckets])
            seen = lengths[decode] + 1
            first = 0
            for bucket in buckets:
                bucket_seen = seen[first : first + len(bucket)]
                width = int(bucket_seen.max())
                columns = np.minimum(np.arange(width)[None, :], (bucket_seen - 1)[:, None])
                members = decode[first : first + len(bucket)]
                reads.extend(step.caches[i].slots(columns[r]) for r, i in enumerate(members))
                self.decode_buckets.append((len(bucket), width))
                first += len(bucket)
            parts["decode_rows"] = starts[decode]
            parts["decode_lengths"] = seen
        if len(rest):
            rows = np.concatenate([np.arange(starts[i], starts[i] + counts[i]) for i in rest])
            keys = [np.arange(lengths[i] + counts[i]) for i in rest]
            parts["packed_rows"] = rows
            reads.extend(step.caches[i].slots(k) for i, k in zip(rest, keys, strict=True))
            parts["query_seq"] = seq_of_row[rows]
            parts["query_pos"] = positions[rows]
            parts["key_seq"] = np.concatenate(
                [np.full(len(k), i) for i, k in zip(rest, keys, strict=True)]
            )
            parts["key_pos"] = np.concatenate(keys)
        parts["read_slots"] = np.concatenate(reads)
        # one host-to-device copy for every index of the step
        names = list(parts)
        flat = torch.from_numpy(np.concatenate([parts[n].reshape(-1) for n in names]))
        on_device = flat.to(device, non_blocking=False)
        offset = 0
        tensors: dict[str, torch.Tensor] = {}
        for name in names:
            size = parts[name].size
            tensors[name] = on_device[offset : offset + size].view(parts[name].shape)
            offset += size
        self.positions = tensors["positions"].unsqueeze(0)
        self.write_slots = tensors["write_slots"]
        self.read_slots = tensors["read_slots"]
        self.decode_rows = tensors.get("decode_rows")
        self.decode_lengths = tensors.get("decode_lengths")
        self.packed_rows = tensors.get("packed_rows")
        self.query_seq = tensors.get("query_seq")
        self.query_pos = tensors.get("query_pos")
        self.key_seq = tensors.get("key_seq")
        self.key_pos = tensors.get("key_pos")
        self.total = total
        self._masks: dict[tuple[str, int | None, torch.dtype], torch.Tensor] = {}

    def decode_mask(
        self, first: int, count: int, width: int, window: int | None, dtype: torch.dtype
    ) -> torch.Tensor:
        """Additive mask [count, 1, 1, width] of the decode bucket of decodes first..first +
        count - 1: 0 on a sequence's own keys (within ``window`` of its new token when set),
        dtype's min elsewhere (the padding)."""
        key = (f"decode-{first}", window, dtype)
        if key not in self._masks:
            assert self.decode_lengths is not None
            lengths = self.decode_lengths[first : first + count, None]
            column = torch.arange(width, device=lengths.device)[None, :]
            allowed = column < lengths
            if window is not None:
                allowed &= column > (lengths - 1) - window
            self._masks[key] = _additive(allowed, dtype)[:, None, None, :]
        return self._masks[key]

    def packed_mask(self, window: int | None, dtype: torch.dtype) -> torch.Tensor:
        """Additive mask [1, 1, T_p, K_p] of the packed rows: a token sees its own sequence's
        keys at positions <= its own (and > its own - ``window`` when set)."""
        key = ("packed", window, dtype)
        if key not in self._masks:
            assert self.query_seq is not None and self.key_seq is not None
            assert self.query_pos is not None and self.key_pos is not None
            query_pos, key_pos = self.query_pos[:, None], self.key_pos[None, :]
            allowed = (self.query_seq[:, None] == self.key_seq[None, :]) & (key_pos <= query_pos)
            if window is not None:
                allowed &= key_pos > query_pos - window
            self._masks[key] = _additive(allowed, dtype)[None, None]
        return self._masks[key]


def length_buckets(lengths: np.ndarray) -> list[np.ndarray]:
    """Indices of ``lengths`` [D] in buckets of similar length: longest first, a bucket ends
    before the first length at most half its longest (padding to the longest then at most
    doubles a bucket's keys). One bucket, in the given order, when all lengths fit one."""
    order = np.argsort(-lengths, kind="stable")
    buckets: list[list[int]] = []
    longest = 0
    for index in order:
        if not buckets or 2 * int(lengths[index]) <= longest:
            buckets.append([])
            longest = int(lengths[index])
        buckets[-1].append(int(index))
    if len(buckets) == 1:
        return [np.arange(len(lengths))]
    return [np.asarray(bucket, dtype=np.int64) for bucket in buckets]


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


class PackedKVCache:
    """The cache object handed to transformers' model for one packed step.

    ``update(key, value, layer_idx, ...)`` gets the step's new keys/values [1, heads, T, D],
    writes them at the step's slots in the arena and returns what the step reads, [1, heads,
    N, D] in the layout's ``read_slots`` order. ``commit`` marks the step's tokens as cached.
    Nothing else of transformers' cache interface is needed: positions are given, and the
    packed attention needs no mask from the model.
    """

    def __init__(self, layout: StepLayout) -> None:
        self.layout = layout

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *_: Any,
        **__: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.layout.arena.store(
            layer_idx, key_states[0], value_states[0], self.layout.write_slots
        )
        reads = self.layout.read_slots
        return keys.index_select(1, reads)[None], values.index_select(1, reads)[None]

    def commit(self) -> None:
        """The step completed: every scheduled sequence now has its new tokens cached."""
        step = self.layout.step
        for cache, count in zip(step.caches, step.new_tokens, strict=True):
            cache.length += count

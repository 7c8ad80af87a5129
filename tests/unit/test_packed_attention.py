"""The paged KV arena and the packed attention against a per-sequence dense reference.

The reference is plain softmax attention written here, one sequence at a time, over that
sequence's whole key history (causal, optional sliding window, grouped-query heads); the
packed attention runs decodes batched and prefill chunks packed, from the arena's pools.
"""

from __future__ import annotations

import gc
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_worker.serving.kv_cache import (
    BLOCK_TOKENS,
    KVArena,
    PackedKVCache,
    PackedStep,
    SequenceKV,
    StepLayout,
    length_buckets,
)
from moe_worker.serving.packed_attention import LAYOUT_KWARG, WINDOWS_KWARG, packed_attention

HEADS, KV_HEADS, DIM = 4, 2, 8


class Attention(torch.nn.Module):
    """What transformers' attention modules expose to an attention function."""

    def __init__(self) -> None:
        super().__init__()
        self.layer_idx = 0
        self.num_key_value_groups = HEADS // KV_HEADS
        self.is_causal = True


def reference(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, first: int, window: int | None
) -> torch.Tensor:
    """One sequence: queries [H, n, D] at positions first.., keys/values [KV, first + n, D]."""
    keys = keys.repeat_interleave(HEADS // KV_HEADS, dim=0)
    values = values.repeat_interleave(HEADS // KV_HEADS, dim=0)
    scores = query @ keys.transpose(1, 2) / math.sqrt(DIM)  # [H, n, K]
    q_pos = torch.arange(first, first + query.shape[1])[:, None]
    k_pos = torch.arange(keys.shape[1])[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) @ values).transpose(0, 1)  # [n, H, D]


def run_steps(
    steps: list[list[tuple[int, int]]], window: int | None, seed: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Run ``steps`` (each a list of (sequence, new tokens)) through the arena and the packed
    attention; return per step (packed output [T, H, D], reference output [T, H, D])."""
    generator = torch.Generator().manual_seed(seed)
    arena = KVArena(torch.device("cpu"), initial_blocks=1)
    module = Attention()
    caches: dict[int, SequenceKV] = {}
    history: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    got, want = [], []
    for step in steps:
        kvs = [caches.setdefault(s, SequenceKV()) for s, _ in step]
        counts = [n for _, n in step]
        total = sum(counts)
        query = torch.randn((1, HEADS, total, DIM), generator=generator, dtype=torch.float64)
        keys = torch.randn((1, KV_HEADS, total, DIM), generator=generator, dtype=torch.float64)
        values = torch.randn((1, KV_HEADS, total, DIM), generator=generator, dtype=torch.float64)
        layout = StepLayout(PackedStep(kvs, counts), arena, torch.device("cpu"))
        cache = PackedKVCache(layout)
        key_pool, value_pool = cache.update(keys, values, 0)
        out, _ = packed_attention(
            module,
            query,
            key_pool,
            value_pool,
            None,
            scaling=1 / math.sqrt(DIM),
            dropout=0.0,
            sliding_window=window,
            **{LAYOUT_KWARG: layout, WINDOWS_KWARG: lambda layer: window},
        )
        expected = []
        row = 0
        for (sequence, count), kv in zip(step, kvs, strict=True):
            old_k, old_v = history.get(sequence, (keys[0, :, :0], values[0, :, :0]))
            all_k = torch.cat([old_k, keys[0, :, row : row + count]], dim=1)
            all_v = torch.cat([old_v, values[0, :, row : row + count]], dim=1)
            history[sequence] = (all_k, all_v)
            q = query[0, :, row : row + count]
            expected.append(reference(q, all_k, all_v, kv.length, window))
            row += count
        cache.commit()
        got.append(out[0])
        want.append(torch.cat(expected))
    return got, want


def test_decodes_and_prefill_chunks_equal_the_per_sequence_reference() -> None:
    # a prompt in two chunks next to a decoding sequence, then decodes of three sequences
    # (one of them new: one token of history), then a two-token verification beside a decode
    steps = [
        [(0, 5)],
        [(0, 3), (1, 7)],
        [(0, 1), (1, 1), (2, 1)],
        [(1, 2), (0, 1), (2, 20)],
        [(2, 1), (1, 1)],
    ]
    for window in (None, 4):
        got, want = run_steps(steps, window, seed=1)
        for step_got, step_want in zip(got, want, strict=True):
            torch.testing.assert_close(step_got, step_want)


@settings(max_examples=25, deadline=None)
@given(
    st.lists(
        st.lists(st.integers(1, 40), min_size=1, max_size=5),  # new tokens of each sequence
        min_size=1,
        max_size=6,
    ),
    st.one_of(st.none(), st.integers(1, 12)),
    st.integers(0, 1000),
)
def test_any_schedule_equals_the_reference(
    shape: list[list[int]], window: int | None, seed: int
) -> None:
    # step k schedules sequences 0..len-1 (a sequence joins at the step it first appears);
    # the order within a step is shuffled so decodes and chunks interleave
    rng = np.random.default_rng(seed)
    steps = []
    for counts in shape:
        order = rng.permutation(len(counts))
        steps.append([(int(s), counts[s]) for s in order])
    got, want = run_steps(steps, window, seed)
    for step_got, step_want in zip(got, want, strict=True):
        torch.testing.assert_close(step_got, step_want)


def test_decodes_of_very_different_lengths_run_in_length_buckets() -> None:
    # 41, 4 and 20 keys: three buckets (each at most doubles its keys by padding)
    steps = [[(0, 40), (1, 3), (2, 19)], [(1, 1), (0, 1), (2, 1)], [(2, 1), (0, 1), (1, 1)]]
    arena = KVArena(torch.device("cpu"))
    kvs = [SequenceKV(length=n) for n in (40, 3, 19)]
    layout = StepLayout(PackedStep(kvs, [1, 1, 1]), arena, torch.device("cpu"))
    assert layout.decode_buckets == [(1, 41), (1, 20), (1, 4)] and not layout.in_order
    for window in (None, 6):
        got, want = run_steps(steps, window, seed=2)
        for step_got, step_want in zip(got, want, strict=True):
            torch.testing.assert_close(step_got, step_want)


def test_length_buckets_keep_padding_under_double() -> None:
    buckets = length_buckets(np.asarray([100, 10, 60, 45, 5]))
    assert [b.tolist() for b in buckets] == [[0, 2], [3], [1], [4]]
    assert [b.tolist() for b in length_buckets(np.asarray([5, 7, 6]))] == [[0, 1, 2]]


def test_the_arena_grows_keeps_what_it_holds_and_gets_blocks_back() -> None:
    arena = KVArena(torch.device("cpu"), initial_blocks=2)
    sequence = SequenceKV()
    sequence.reserve(arena, BLOCK_TOKENS + 1)  # two blocks: the arena is full
    assert arena.free_blocks == 0
    slots = torch.from_numpy(sequence.slots(np.arange(BLOCK_TOKENS + 1)))
    keys = torch.arange(float(BLOCK_TOKENS + 1)).view(1, -1, 1)
    pool, _ = arena.store(0, keys, keys, slots)
    other = SequenceKV()
    other.reserve(arena, 3 * BLOCK_TOKENS)  # grows the arena
    assert arena.capacity >= 5
    grown, _ = arena.store(
        0, keys[:, :1], keys[:, :1], torch.from_numpy(other.slots(np.zeros(1, dtype=np.int64)))
    )
    assert grown.shape[1] == arena.capacity * BLOCK_TOKENS > pool.shape[1]
    torch.testing.assert_close(grown[0, slots, 0], keys[0, :, 0])  # copied on growth
    free = arena.free_blocks
    del sequence
    gc.collect()
    assert arena.free_blocks == free + 2  # a dropped sequence's blocks come back
    with pytest.raises(ValueError, match="one model's arena"):
        other.reserve(KVArena(torch.device("cpu")), 1)


def test_without_a_layout_the_attention_refuses() -> None:
    tensor = torch.zeros((1, HEADS, 1, DIM))
    with pytest.raises(RuntimeError, match="packed_layout"):
        packed_attention(Attention(), tensor, tensor, tensor, None)

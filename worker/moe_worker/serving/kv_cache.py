"""Per-sequence KV caches for a packed batch: many sequences' tokens in one forward.

A step runs the scheduled chunks of several sequences as one row of T tokens (batch size 1);
each token carries its own position (``position_ids``) and sees only its own sequence's earlier
tokens, through a 4D additive mask [1, 1, T, K] over the K keys returned by the cache (every
scheduled sequence's cached keys followed by its new ones, sequence after sequence).
``PackedKVCache`` is what transformers' attention modules see as their cache: ``update`` stores
each sequence's new keys/values and returns the packed keys/values of the step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class SequenceKV:
    """One sequence's cached keys and values per decoder layer: [heads, length, head_dim]."""

    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    values: dict[int, torch.Tensor] = field(default_factory=dict)
    length: int = 0  # tokens cached in every layer after the last completed step


@dataclass(frozen=True)
class PackedStep:
    """The layout of one step: for each scheduled sequence, its cache and new-token count."""

    caches: list[SequenceKV]
    new_tokens: list[int]

    @property
    def total_new(self) -> int:
        return sum(self.new_tokens)


def packed_positions(step: PackedStep, device: torch.device) -> torch.Tensor:
    """Position of every new token in its own sequence: [1, T] int64."""
    parts = [
        torch.arange(cache.length, cache.length + count, device=device)
        for cache, count in zip(step.caches, step.new_tokens, strict=True)
    ]
    return torch.cat(parts).unsqueeze(0)


def packed_mask(
    step: PackedStep,
    dtype: torch.dtype,
    device: torch.device,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Additive attention mask [1, 1, T, K]: 0 where a new token may attend, dtype's min else.

    Keys are laid out sequence after sequence (cached then new); a new token at position p of
    sequence s sees the keys of s at positions <= p (and > p - ``sliding_window`` when set).
    """
    total_new = step.total_new
    total_keys = sum(c.length + n for c, n in zip(step.caches, step.new_tokens, strict=True))
    allowed = torch.zeros((total_new, total_keys), dtype=torch.bool, device=device)
    row = col = 0
    for cache, count in zip(step.caches, step.new_tokens, strict=True):
        keys = cache.length + count
        query_pos = torch.arange(cache.length, keys, device=device)[:, None]
        key_pos = torch.arange(keys, device=device)[None, :]
        block = key_pos <= query_pos
        if sliding_window is not None:
            block &= key_pos > query_pos - sliding_window
        allowed[row : row + count, col : col + keys] = block
        row, col = row + count, col + keys
    mask = torch.zeros((total_new, total_keys), dtype=dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


class PackedKVCache:
    """The cache object handed to transformers' model for one packed step.

    ``update(key, value, layer_idx, ...)`` gets the step's new keys/values [1, heads, T, D],
    appends each sequence's share to its ``SequenceKV`` and returns the packed keys/values
    [1, heads, K, D] in the mask's layout. ``commit`` marks the step's tokens as cached. Nothing
    else of transformers' cache interface is needed: positions and the 4D mask are given.
    """

    def __init__(self, step: PackedStep) -> None:
        self.step = step

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *_: Any,
        **__: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        key_parts, value_parts = [], []
        start = 0
        for cache, count in zip(self.step.caches, self.step.new_tokens, strict=True):
            new_k = key_states[0, :, start : start + count]
            new_v = value_states[0, :, start : start + count]
            start += count
            old_k, old_v = cache.keys.get(layer_idx), cache.values.get(layer_idx)
            if old_k is not None and old_v is not None and cache.length:
                new_k = torch.cat([old_k[:, : cache.length], new_k], dim=1)
                new_v = torch.cat([old_v[:, : cache.length], new_v], dim=1)
            else:  # a copy: a view would keep the whole step's keys alive
                new_k, new_v = new_k.clone(), new_v.clone()
            cache.keys[layer_idx], cache.values[layer_idx] = new_k, new_v
            key_parts.append(new_k)
            value_parts.append(new_v)
        return torch.cat(key_parts, dim=1)[None], torch.cat(value_parts, dim=1)[None]

    def commit(self) -> None:
        """The step completed: every scheduled sequence now has its new tokens cached."""
        for cache, count in zip(self.step.caches, self.step.new_tokens, strict=True):
            cache.length += count

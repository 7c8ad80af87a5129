"""The serving engine's attention: a packed step's tokens against the paged KV arena.

Registered with transformers' ``AttentionInterface`` as ``moe_eplb_packed`` (the model is built
with it; transformers then builds no mask of its own). The attention modules call it with the
step's queries [1, heads, T, D] and the keys/values the step reads [1, kv_heads, N, D] (what
``PackedKVCache.update`` returned, after whatever the model does to them), and the step's
``StepLayout`` as the ``packed_layout``
keyword (``EPCausalLM.logits`` passes it through the model). The attention is torch's
``scaled_dot_product_attention`` (the module's ``scaling``), run on two groups:

- the decodes (one new token each) batched: queries [D, heads, 1, D_h] against their own keys
  gathered to [D, kv_heads, Lmax, D_h] with a padding mask, linear in the keys they attend to;
- the other rows packed: [1, heads, T_p, D_h] against every such sequence's keys [1, kv_heads,
  K_p, D_h] with a block-causal mask.

Output [1, T, heads, D_v], rows in the step's order. A layer's sliding window (``windows``)
is applied in the masks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .kv_cache import StepLayout

NAME = "moe_eplb_packed"
# Not cuDNN's backend: it builds an execution plan per new shape (~10 ms on an H200), and the
# key length of a serving step changes every step.
BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
LAYOUT_KWARG = "packed_layout"
WINDOWS_KWARG = "packed_windows"


def attend(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    scaling: float | None,
) -> torch.Tensor:
    """Scaled dot-product attention with grouped-query heads: ``query`` [B, heads, q, D],
    ``keys`` [B, kv_heads, K, D], ``values`` [B, kv_heads, K, D_v], additive ``mask``
    [B or 1, 1, q, K]. Query head h reads key head h // (heads / kv_heads). Out [B, q, heads,
    D_v]. One-token queries fold their head group into the query length (no key copies);
    longer ones expand the keys."""
    batch, heads, length, _ = query.shape
    kv_heads = keys.shape[1]
    groups = heads // kv_heads
    if groups > 1 and length == 1:
        folded = query.reshape(batch, kv_heads, groups, query.shape[-1])
        with sdpa_kernel(BACKENDS):
            out = F.scaled_dot_product_attention(
                folded, keys, values, attn_mask=mask, scale=scaling
            )
        return out.reshape(batch, heads, 1, -1).transpose(1, 2)
    if groups > 1:
        keys = keys.repeat_interleave(groups, dim=1)
        values = values.repeat_interleave(groups, dim=1)
    with sdpa_kernel(BACKENDS):
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2)


def packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature; see the module docstring."""
    layout: StepLayout | None = kwargs.get(LAYOUT_KWARG)
    windows: Callable[[int], int | None] | None = kwargs.get(WINDOWS_KWARG)
    if layout is None or windows is None:
        raise RuntimeError(
            f"attention {NAME!r} runs the serving engine's packed steps only "
            f"(no {LAYOUT_KWARG!r} was passed)"
        )
    if kwargs.get("softcap") is not None:
        raise ValueError(f"attention {NAME!r}: logit soft-capping is not supported")
    scaling: float | None = kwargs.get("scaling")
    window = windows(int(getattr(module, "layer_idx", 0)))
    read_keys, read_values = key[0], value[0]  # [kv_heads, N, D]: decodes' then packed
    heads, value_dim = query.shape[1], read_values.shape[-1]
    parts: list[tuple[torch.Tensor, torch.Tensor]] = []  # (rows, output [rows, heads, D_v])
    decoded = first = 0  # keys read and decodes done so far
    for batch, width in layout.decode_buckets:
        assert layout.decode_rows is not None
        rows = layout.decode_rows[first : first + batch]
        keys = read_keys[:, decoded : decoded + batch * width].unflatten(1, (batch, width))
        values = read_values[:, decoded : decoded + batch * width].unflatten(1, (batch, width))
        queries = query[0].index_select(1, rows).transpose(0, 1).unsqueeze(2)
        out = attend(
            queries,  # [D_b, heads, 1, D_h]
            keys.transpose(0, 1),  # [D_b, kv_heads, Lmax_b, D_h]
            values.transpose(0, 1),
            layout.decode_mask(first, batch, width, window, query.dtype),
            scaling,
        )
        parts.append((rows, out[:, 0]))  # out [D_b, 1, heads, D_v]
        decoded += batch * width
        first += batch
    if layout.packed_rows is not None:
        keys = read_keys[None, :, decoded:]
        values = read_values[None, :, decoded:]
        queries = query if layout.in_order else query.index_select(2, layout.packed_rows)
        out = attend(
            queries,  # [1, heads, T_p, D_h]
            keys,  # [1, kv_heads, K_p, D_h]
            values,
            layout.packed_mask(window, query.dtype),
            scaling,
        )
        parts.append((layout.packed_rows, out[0]))  # out [1, T_p, heads, D_v]
    if layout.in_order:  # one group, its rows the step's rows in order
        return parts[0][1][None], None
    output = query.new_empty((layout.total, heads, value_dim))
    for rows, rows_out in parts:
        output.index_copy_(0, rows, rows_out.to(output.dtype))
    return output[None], None


def register() -> str:
    """Register ``packed_attention`` with transformers (idempotent); returns its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, packed_attention)
    return NAME

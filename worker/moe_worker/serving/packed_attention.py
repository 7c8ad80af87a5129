"""The serving engine's attention: a packed step's tokens against the paged KV arena.

Registered with transformers' ``AttentionInterface`` as ``moe_eplb_packed`` (the model is built
with it; transformers then builds no mask of its own). The attention modules call it with the
step's queries [1, heads, T, D] and the layer's pools [1, kv_heads, slots, D] (what
``PackedKVCache.update`` returned), and the step's ``StepLayout`` as the ``packed_layout``
keyword (``EPCausalLM.logits`` passes it through the model). The attention itself is
transformers' ``sdpa`` function, run on two groups:

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

from .kv_cache import StepLayout

NAME = "moe_eplb_packed"
LAYOUT_KWARG = "packed_layout"
WINDOWS_KWARG = "packed_windows"


def _sdpa() -> Callable[..., tuple[torch.Tensor, Any]]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature; see the module docstring."""
    layout: StepLayout | None = kwargs.pop(LAYOUT_KWARG, None)
    windows: Callable[[int], int | None] | None = kwargs.pop(WINDOWS_KWARG, None)
    if layout is None or windows is None:
        raise RuntimeError(
            f"attention {NAME!r} runs the serving engine's packed steps only "
            f"(no {LAYOUT_KWARG!r} was passed)"
        )
    kwargs.pop("sliding_window", None)  # applied in the masks
    kwargs.pop("is_causal", None)
    window = windows(int(getattr(module, "layer_idx", 0)))
    sdpa = _sdpa()
    key_pool, value_pool = key[0], value[0]  # [kv_heads, slots, D]
    heads, value_dim = query.shape[1], value_pool.shape[-1]
    parts: list[tuple[torch.Tensor, torch.Tensor]] = []  # (rows, output [rows, heads, D_v])
    if layout.decode_slots is not None:
        assert layout.decode_rows is not None
        batch, width = layout.decode_slots.shape
        flat = layout.decode_slots.reshape(-1)
        keys = key_pool.index_select(1, flat).view(key_pool.shape[0], batch, width, -1)
        values = value_pool.index_select(1, flat).view(value_pool.shape[0], batch, width, -1)
        queries = query[0].index_select(1, layout.decode_rows).transpose(0, 1).unsqueeze(2)
        out, _ = sdpa(
            module,
            queries,  # [D, heads, 1, D_h]
            keys.transpose(0, 1),  # [D, kv_heads, Lmax, D_h]
            values.transpose(0, 1),
            layout.decode_mask(window, query.dtype),
            is_causal=False,
            **kwargs,
        )
        parts.append((layout.decode_rows, out[:, 0]))  # out [D, 1, heads, D_v]
    if layout.packed_slots is not None:
        assert layout.packed_rows is not None
        keys = key_pool.index_select(1, layout.packed_slots)[None]
        values = value_pool.index_select(1, layout.packed_slots)[None]
        queries = query if layout.num_decodes == 0 else query.index_select(2, layout.packed_rows)
        out, _ = sdpa(
            module,
            queries,  # [1, heads, T_p, D_h]
            keys,  # [1, kv_heads, K_p, D_h]
            values,
            layout.packed_mask(window, query.dtype),
            is_causal=False,
            **kwargs,
        )
        parts.append((layout.packed_rows, out[0]))  # out [1, T_p, heads, D_v]
    if len(parts) == 1 and (layout.in_order or layout.num_decodes == 0):
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

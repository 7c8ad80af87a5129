"""Grouped GEMM over a rank's stacked expert weights: one kernel for every slot's rows at once.

Rows arrive sorted by slot; ``group_ends`` gives each slot's end offset (int32, on the device,
no host synchronisation) and ``grouped_linear`` runs ``rows @ weight[slot].T`` for every group
with torch's grouped GEMM (``torch.nn.functional.grouped_mm``; CUTLASS on CUDA, a native kernel
on recent CPU builds), or, on a GPU with few rows per group (decode), with the Triton kernel of
``triton_grouped``, which streams the weights faster there. Where torch's kernel does not take
the inputs (an older torch, a dtype or alignment it refuses) a per-group loop computes the same
product; a refusal is remembered per device, dtype and weight shape, so it costs one call.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import triton_grouped

_GroupedMM = Callable[..., torch.Tensor]


def _grouped_mm_op() -> _GroupedMM | None:
    op = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    return op


_GROUPED_MM = _grouped_mm_op()
# (device type, device index, dtype, weight shape[1:]) whose grouped GEMM call raised
_UNSUPPORTED: set[tuple[str, int | None, torch.dtype, tuple[int, ...]]] = set()


def group_ends(sorted_group: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """End offset (int32 [G]) of each group in ``sorted_group`` [N] (ascending group ids);
    ``group_ids`` [G] = 0..G-1 on the same device. Empty groups repeat the previous end."""
    return torch.searchsorted(sorted_group, group_ids, right=True, out_int32=True)


def grouped_linear(rows: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """``rows`` [N, K] sorted by group, ``weight`` [G, O, K] (one nn.Linear weight per group),
    ``ends`` int32 [G] from ``group_ends`` -> [N, O]: row n times the weight of its group."""
    if rows.shape[0] == 0:
        return rows.new_empty((0, weight.shape[1]))
    if _few_rows_on_gpu(rows, weight):
        return triton_grouped.grouped_rows_linear(rows, weight, ends)
    key = (rows.device.type, rows.device.index, rows.dtype, tuple(weight.shape[1:]))
    if _GROUPED_MM is not None and key not in _UNSUPPORTED:
        try:
            return _GROUPED_MM(rows, weight.transpose(1, 2), offs=ends)
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, NotImplementedError, TypeError):
            _UNSUPPORTED.add(key)
    return looped_linear(rows, weight, ends)


def grouped_gated(
    rows: torch.Tensor,
    gate_up: torch.Tensor,
    ends: torch.Tensor,
    act: Callable[[torch.Tensor], torch.Tensor],
    act_is_silu: bool,
) -> torch.Tensor:
    """``rows`` [N, H] sorted by group, ``gate_up`` [G, 2I, H] -> act(gate) * up [N, I]; one
    fused kernel for silu on a GPU with few rows per group."""
    if act_is_silu and rows.shape[0] and _few_rows_on_gpu(rows, gate_up):
        return triton_grouped.grouped_rows_linear(rows, gate_up, ends, gated=True)
    gate, up = grouped_linear(rows, gate_up, ends).chunk(2, dim=-1)
    return act(gate) * up


def _few_rows_on_gpu(rows: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        triton_grouped.available(rows)
        and rows.shape[0] <= triton_grouped.MAX_ROWS_PER_GROUP * weight.shape[0]
    )


def looped_linear(rows: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """The same product as ``grouped_linear``, one matmul per non-empty group (the fallback;
    reads the group sizes on the host)."""
    out = rows.new_empty((rows.shape[0], weight.shape[1]))
    start = 0
    for group, end in enumerate(ends.tolist()):
        if end > start:
            out[start:end] = rows[start:end] @ weight[group].t()
            start = end
    return out


def grouped_mm_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch's grouped GEMM runs for ``dtype`` on ``device`` (a tiny trial call)."""
    if _GROUPED_MM is None:
        return False
    rows = torch.ones((3, 16), dtype=dtype, device=device)
    weight = torch.ones((2, 16, 16), dtype=dtype, device=device)
    try:
        _GROUPED_MM(rows, weight.transpose(1, 2), offs=torch.tensor([1, 3], device=device).int())
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    return True

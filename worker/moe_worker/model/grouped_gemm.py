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


def grouped_linear(
    rows: torch.Tensor,
    weight: torch.Tensor,
    ends: torch.Tensor,
    target_row: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``rows`` [N, K] sorted by group, ``weight`` [G, O, K] (one nn.Linear weight per group),
    ``ends`` int32 [G] from ``group_ends`` -> [N, O]: row n times the weight of its group.
    With ``target_row`` [N] (a permutation of 0..N-1): result n is output row
    ``target_row[n]`` (undoing the sort), multiplied by ``scale`` [N] of that output row if
    given (the pair's routing weight)."""
    if rows.shape[0] and _few_rows_on_gpu(rows.shape[0], rows, weight):
        return triton_grouped.grouped_rows_linear(
            rows, weight, ends, target_row=target_row, scale=scale
        )
    out = _grouped_product(rows, weight, ends)
    if target_row is None:
        return out
    inverse = torch.empty_like(target_row)
    inverse[target_row] = torch.arange(target_row.shape[0], device=target_row.device)
    out = out.index_select(0, inverse)
    return out if scale is None else out * scale.to(out.dtype).unsqueeze(1)


def grouped_gated(
    rows: torch.Tensor,
    gate_up: torch.Tensor,
    ends: torch.Tensor,
    act: Callable[[torch.Tensor], torch.Tensor],
    act_is_silu: bool,
    source_row: torch.Tensor | None = None,
) -> torch.Tensor:
    """act(gate) * up [N, I] of ``gate_up`` [G, 2I, H] (gate rows, then up rows) for ``rows``
    [N, H] sorted by group, or, with ``source_row`` [N], for ``rows[source_row]`` (``rows`` any
    length). One fused kernel for silu on a GPU with few rows per group."""
    count = rows.shape[0] if source_row is None else source_row.shape[0]
    if act_is_silu and count and _few_rows_on_gpu(count, rows, gate_up):
        return triton_grouped.grouped_rows_linear(
            rows, gate_up, ends, gated=True, source_row=source_row
        )
    picked = rows if source_row is None else rows.index_select(0, source_row)
    gate, up = _grouped_product(picked, gate_up, ends).chunk(2, dim=-1)
    return act(gate) * up


def _grouped_product(rows: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """torch's grouped GEMM, or the loop where it refuses the inputs."""
    if rows.shape[0] == 0:
        return rows.new_empty((0, weight.shape[1]))
    key = (rows.device.type, rows.device.index, rows.dtype, tuple(weight.shape[1:]))
    if _GROUPED_MM is not None and key not in _UNSUPPORTED:
        try:
            return _GROUPED_MM(rows, weight.transpose(1, 2), offs=ends)
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, NotImplementedError, TypeError):
            _UNSUPPORTED.add(key)
    return looped_linear(rows, weight, ends)


def _few_rows_on_gpu(count: int, rows: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the Triton kernel takes ``count`` pairs over ``weight``'s groups."""
    return (
        triton_grouped.available(rows)
        and count <= triton_grouped.MAX_ROWS_PER_GROUP * weight.shape[0]
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

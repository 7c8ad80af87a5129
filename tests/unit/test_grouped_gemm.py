"""Grouped GEMM over stacked slot weights equals one matmul per group (CPU; both paths)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_worker.model import grouped_gemm
from moe_worker.model.grouped_gemm import group_ends, grouped_linear, looped_linear


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 7), min_size=1, max_size=9),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_grouped_linear_is_each_rows_group_matmul(
    sizes: list[int], dtype: torch.dtype, seed: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    groups = len(sizes)
    group_of = torch.repeat_interleave(torch.arange(groups), torch.tensor(sizes))
    rows = torch.randn((len(group_of), 16), generator=generator).to(dtype)
    weight = torch.randn((groups, 24, 16), generator=generator).to(dtype)
    ends = group_ends(group_of, torch.arange(groups))
    assert ends.dtype == torch.int32
    assert ends.tolist() == torch.cumsum(torch.tensor(sizes), 0).tolist()
    want = torch.zeros((len(group_of), 24))
    for n, g in enumerate(group_of.tolist()):
        want[n] = rows[n].float() @ weight[g].float().t()
    tolerance = (
        {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 5e-2}
    )
    for got in (grouped_linear(rows, weight, ends), looped_linear(rows, weight, ends)):
        assert got.shape == (len(group_of), 24) and got.dtype == dtype
        torch.testing.assert_close(got.float(), want, **tolerance)


def test_a_refused_kernel_falls_back_to_the_loop_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def refusing(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        raise RuntimeError("grouped gemm: unsupported dtype")

    monkeypatch.setattr(grouped_gemm, "_GROUPED_MM", refusing)
    monkeypatch.setattr(grouped_gemm, "_UNSUPPORTED", set())
    rows = torch.randn(5, 8)
    weight = torch.randn(2, 4, 8)
    ends = torch.tensor([2, 5], dtype=torch.int32)
    want = torch.cat([rows[:2] @ weight[0].t(), rows[2:] @ weight[1].t()])
    for _ in range(3):
        torch.testing.assert_close(grouped_linear(rows, weight, ends), want)
    assert calls == [1]  # probed once, then the loop directly

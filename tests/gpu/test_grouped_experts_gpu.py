"""The grouped-GEMM expert path on a CUDA GPU in bfloat16 against a float32 dense reference of the
same layer (Qwen3-30B-A3B's expert shape, replicated slots, 1 to 512 tokens), with no host
synchronisation in the layer (EP 1). Skips without a GPU.

Tolerance: the output's relative error (Frobenius norm of the difference over the reference's)
stays below 1e-2; bfloat16 keeps 8 mantissa bits, so each rounding contributes ~2e-3.
"""

from __future__ import annotations

import pytest
import torch

from moe_worker.model import grouped_gemm
from moe_worker.model.ep_experts import EPGroup, ExpertParallelExperts, SlotWeights

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

HIDDEN, EXPERTS, TOP_K, INTER = 2048, 128, 8, 768
REPLICATED = 32  # experts 0..31 get a second slot at the end


def dense(hidden, ids, weights, gate_up, down):  # type: ignore[no-untyped-def]
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    for expert in torch.unique(ids).tolist():
        token, k = torch.nonzero(ids == expert, as_tuple=True)
        gate, up = (hidden[token].float() @ gate_up[expert].float().t()).chunk(2, dim=-1)
        y = (torch.nn.functional.silu(gate) * up) @ down[expert].float().t()
        out.index_add_(0, token, y * weights[token, k, None].float())
    return out


@pytest.mark.parametrize("tokens", [1, 16, 512])
def test_grouped_bf16_experts_match_the_dense_reference(
    tokens: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_fallback(*args: object) -> torch.Tensor:
        raise AssertionError("the per-group fallback ran instead of the grouped GEMM")

    monkeypatch.setattr(grouped_gemm, "looped_linear", no_fallback)
    device = torch.device("cuda")
    generator = torch.Generator().manual_seed(tokens)
    gate_up = (torch.randn((EXPERTS, 2 * INTER, HIDDEN), generator=generator) * HIDDEN**-0.5).to(
        device, torch.bfloat16
    )
    down = (torch.randn((EXPERTS, HIDDEN, INTER), generator=generator) * INTER**-0.5).to(
        device, torch.bfloat16
    )
    slot_expert = list(range(EXPERTS)) + list(range(REPLICATED))
    log2phy = torch.full((EXPERTS, 2), -1, dtype=torch.long)
    log2phy[:, 0] = torch.arange(EXPERTS)
    log2phy[:REPLICATED, 1] = torch.arange(EXPERTS, EXPERTS + REPLICATED)
    weights = SlotWeights(gate_up=gate_up[slot_expert].clone(), down=down[slot_expert].clone())
    layer = ExpertParallelExperts(0, weights, EPGroup(device=device), log2phy)

    hidden = torch.randn((tokens, HIDDEN), generator=generator).to(device, torch.bfloat16)
    scores = torch.randn((tokens, EXPERTS), generator=generator).to(device)
    top, ids = torch.topk(torch.softmax(scores, dim=-1), TOP_K, dim=-1)
    top = (top / top.sum(dim=-1, keepdim=True)).to(torch.bfloat16)
    want = dense(hidden, ids, top, gate_up, down)
    with torch.inference_mode():
        layer(hidden, ids, top)  # compiles the kernels
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any host synchronisation now raises
        try:
            got = layer(hidden, ids, top)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert got.dtype == torch.bfloat16 and got.shape == (tokens, HIDDEN)
    error = ((got.float() - want).norm() / want.norm()).item()
    print(f"tokens={tokens} relative error {error:.2e}")
    assert error < 1e-2
    assert layer.computed_pairs == 2 * tokens * TOP_K
    if tokens >= 16:  # replicas taken in turn: some pairs went to the second copies
        assert bool((layer.physical_slots(ids, 0) >= EXPERTS).any())


@pytest.mark.parametrize("rows_per_group", [1, 5, 33])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_kernel_equals_torch_grouped_gemm(rows_per_group: int, dtype: torch.dtype) -> None:
    """Both tile shapes, empty groups, ragged group sizes, plain and gated (silu * up)."""
    triton_grouped = pytest.importorskip("moe_worker.model.triton_grouped")
    generator = torch.Generator().manual_seed(rows_per_group)
    groups, in_features, out_features = 48, 512, 384
    sizes = torch.randint(0, 2 * rows_per_group + 1, (groups,), generator=generator)
    sizes[::7] = 0
    group_of = torch.repeat_interleave(torch.arange(groups), sizes).cuda()
    rows = torch.randn((len(group_of), in_features), generator=generator).to("cuda", dtype)
    weight = (torch.randn((groups, out_features, in_features), generator=generator) / 20).to(
        "cuda", dtype
    )
    ends = grouped_gemm.group_ends(group_of, torch.arange(groups, device="cuda"))
    want = torch.zeros((len(group_of), out_features), device="cuda")
    for g in range(groups):
        picked = group_of == g
        want[picked] = rows[picked].float() @ weight[g].float().t()
    for config in (
        triton_grouped.tile_config(1, groups),
        triton_grouped.tile_config(10**6, groups),
    ):
        got = triton_grouped.grouped_rows_linear(rows, weight, ends, config)
        torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)
        gated = triton_grouped.grouped_rows_linear(rows, weight, ends, config, gated=True)
        gate, up = want.chunk(2, dim=-1)
        torch.testing.assert_close(
            gated.float(), torch.nn.functional.silu(gate) * up, rtol=3e-2, atol=3e-2
        )


def test_triton_kernel_gathers_scatters_and_scales_rows() -> None:
    """source_row reads rows out of order; target_row + scale write each result, weighted, to
    its output row: as index_select before and a weighted permutation after the product."""
    triton_grouped = pytest.importorskip("moe_worker.model.triton_grouped")
    generator = torch.Generator().manual_seed(3)
    groups, in_features, out_features, count = 16, 256, 192, 300
    group_of = torch.randint(0, groups, (count,), generator=generator).sort().values.cuda()
    ends = grouped_gemm.group_ends(group_of, torch.arange(groups, device="cuda"))
    rows = torch.randn((count // 2, in_features), generator=generator).to("cuda", torch.bfloat16)
    source_row = torch.randint(0, count // 2, (count,), generator=generator).cuda()
    target_row = torch.randperm(count, generator=generator).cuda()
    scale = torch.rand(count, generator=generator).cuda()
    weight = (torch.randn((groups, 2 * out_features, in_features), generator=generator) / 16).to(
        "cuda", torch.bfloat16
    )
    picked = rows[source_row]
    gated = triton_grouped.grouped_rows_linear(
        rows, weight, ends, gated=True, source_row=source_row
    )
    want_gated = triton_grouped.grouped_rows_linear(picked, weight, ends, gated=True)
    torch.testing.assert_close(gated, want_gated)
    plain = triton_grouped.grouped_rows_linear(picked, weight, ends)
    moved = triton_grouped.grouped_rows_linear(
        picked, weight, ends, target_row=target_row, scale=scale
    )
    want = torch.empty_like(plain.float())
    want[target_row] = plain.float()
    want *= scale[:, None]
    torch.testing.assert_close(moved.float(), want, rtol=1e-2, atol=1e-2)

"""Tile sweep of the Triton grouped GEMM (``triton_grouped``) against torch's grouped GEMM.

For each token count, the two projections of one Qwen3-30B-A3B MoE layer (gate/up: [E, 2I, H],
down: [E, H, I]; 128 experts, top-8, bf16) run over rows sorted by expert, once per tile
configuration; prints one JSON line per (tokens, projection): the best configuration, its time,
torch's grouped GEMM time (gate/up: without the activation) and the weight-read bound of that
projection. The gate/up projection runs the fused silu(gate) * up kernel. GPU only.

    python bench/grouped_gemm_sweep.py --tokens 16 64 512 4096
"""

from __future__ import annotations

import argparse
import itertools
import json
from typing import Any

import torch
import triton.testing

from moe_worker.model import grouped_gemm, triton_grouped

HIDDEN, EXPERTS, TOP_K, INTER = 2048, 128, 8, 768


def sorted_rows(tokens: int, in_features: int, generator: torch.Generator) -> tuple:  # type: ignore[type-arg]
    scores = torch.randn((tokens, EXPERTS), generator=generator)
    ids = torch.topk(scores, TOP_K, dim=-1).indices.flatten().sort().values.cuda()
    rows = torch.randn((ids.numel(), in_features), generator=generator).cuda().bfloat16()
    ends = grouped_gemm.group_ends(ids, torch.arange(EXPERTS, device="cuda"))
    return rows, ends, int(torch.unique(ids).numel())


def copy_rate() -> float:
    """HBM bytes per second of a 4 GiB device copy (read + write)."""
    source = torch.empty(1 << 32, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    return 2 * source.numel() / (triton.testing.do_bench(lambda: target.copy_(source)) / 1e3)


def configs(tokens: int) -> list[dict[str, Any]]:
    per_group = tokens * TOP_K / EXPERTS
    block_ms = [16] if per_group <= 8 else [16, 32, 64] if per_group <= 32 else [32, 64, 128]
    return [
        {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "num_warps": w, "num_stages": s}
        for m, n, k, w, s in itertools.product(
            block_ms, [32, 64, 128], [64, 128, 256], [4, 8], [3, 4]
        )
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[16, 64, 512, 4096])
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    rate = copy_rate()
    projections = {
        "gate_up": torch.randn((EXPERTS, 2 * INTER, HIDDEN), generator=generator).cuda().bfloat16(),
        "down": torch.randn((EXPERTS, HIDDEN, INTER), generator=generator).cuda().bfloat16(),
    }
    for tokens in args.tokens:
        for name, weight in projections.items():
            rows, ends, touched = sorted_rows(tokens, weight.shape[2], generator)
            want = torch._grouped_mm(rows, weight.transpose(1, 2), offs=ends)
            gated = name == "gate_up"  # the fused silu(gate) * up kernel, as the layer runs it
            if gated:
                gate, up = want.float().chunk(2, dim=-1)
                want = torch.nn.functional.silu(gate) * up
            torch_ms = triton.testing.do_bench(
                lambda: torch._grouped_mm(rows, weight.transpose(1, 2), offs=ends)  # noqa: B023
            )
            timings = []
            for config in configs(tokens):
                try:
                    got = triton_grouped.grouped_rows_linear(rows, weight, ends, config, gated)
                except Exception as error:  # a tile too large for shared memory
                    timings.append((float("inf"), config, repr(error)[:80]))
                    continue
                error = ((got.float() - want.float()).norm() / want.float().norm()).item()
                ms = triton.testing.do_bench(
                    lambda c=config: triton_grouped.grouped_rows_linear(  # type: ignore[misc]
                        rows,  # noqa: B023
                        weight,  # noqa: B023
                        ends,  # noqa: B023
                        c,
                        gated,  # noqa: B023
                    )
                )
                timings.append((ms, config, error))
            timings.sort(key=lambda t: t[0])
            bound = touched * weight[0].numel() * 2 / rate * 1e3
            default = triton_grouped.tile_config(rows.shape[0], EXPERTS, gated)
            default_ms = next((t[0] for t in timings if t[1] == default), None)
            print(
                json.dumps(
                    {
                        "bench": "grouped_gemm_sweep",
                        "device": torch.cuda.get_device_name(),
                        "torch": torch.__version__,
                        "tokens": tokens,
                        "projection": name,
                        "kernel": "gated silu(gate)*up" if gated else "plain",
                        "bound_ms": bound,
                        "torch_grouped_mm_ms": torch_ms,
                        "default_config": default,
                        "default_ms": default_ms,
                        "best": [
                            {"ms": t[0], "config": t[1], "rel_error": t[2]} for t in timings[:4]
                        ],
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()

"""One MoE layer's routed experts: this project's layer against transformers' own experts.

The same weights (fused gate/up [E, 2I, H], down [E, H, I]), tokens and routing go through this
project's ``ExpertParallelExperts`` (EP 1, every expert in its own slot, EPLB off) and through
transformers' ``Qwen3MoeExperts`` with each ``experts_implementation`` (``grouped_mm``,
``batched_mm``, ``eager``); the weight-read bound is the bytes of the experts the tokens touch
over the HBM rate measured here (a device-to-device copy of 4 GiB: bytes read + written / time).
Every implementation's output is compared with a float32 dense computation of the same layer.
Times: ``*_ms`` per call in a back-to-back stream (as a model's layers run), ``*_ms_synced`` one
call alone. Prints one JSON line per token count.

    python bench/moe_layer.py --shape qwen3 --device cuda --tokens 16 64 512 4096   # one H200
    python bench/moe_layer.py --shape tiny                                         # CPU

``--label`` names the code under test; the same script runs against an older checkout (its
``worker/`` on PYTHONPATH) to compare with earlier code on the same machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from moe_worker.model import ep_experts
from moe_worker.model.ep_experts import EPGroup, ExpertParallelExperts

SHAPES: dict[str, dict[str, Any]] = {
    # Qwen3-30B-A3B's MoE layer
    "qwen3": {"hidden": 2048, "experts": 128, "top_k": 8, "inter": 768, "dtype": "bfloat16"},
    # the engine benchmark's tiny CPU stack (bench/engine.py --shape tiny)
    "tiny": {"hidden": 64, "experts": 16, "top_k": 2, "inter": 64, "dtype": "float32"},
}
BASELINES = ("grouped_mm", "batched_mm", "eager")


def project_layer(
    gate_up: torch.Tensor, down: torch.Tensor, device: torch.device
) -> Callable[..., torch.Tensor]:
    """This project's experts over ``gate_up`` [E, 2I, H], ``down`` [E, H, I]; slot e: expert e."""
    experts = gate_up.shape[0]
    identity = torch.arange(experts)[:, None]
    if hasattr(ep_experts, "SlotWeights"):
        weights: Any = ep_experts.SlotWeights(gate_up=gate_up, down=down)
    else:  # the per-slot layout of earlier code (w_gate, w_up, w_down), for --label before
        inter = gate_up.shape[1] // 2
        weights = {
            "w_gate": gate_up[:, :inter].contiguous(),
            "w_up": gate_up[:, inter:].contiguous(),
            "w_down": down,
        }
    return ExpertParallelExperts(0, weights, EPGroup(device=device), identity)


def transformers_layer(
    implementation: str, gate_up: torch.Tensor, down: torch.Tensor, spec: dict[str, Any]
) -> torch.nn.Module:
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    config = Qwen3MoeConfig(
        hidden_size=spec["hidden"],
        moe_intermediate_size=spec["inter"],
        num_experts=spec["experts"],
        num_experts_per_tok=spec["top_k"],
    )
    config._experts_implementation = implementation
    with torch.device("meta"):
        module = Qwen3MoeExperts(config)
    module.gate_up_proj = torch.nn.Parameter(gate_up, requires_grad=False)
    module.down_proj = torch.nn.Parameter(down, requires_grad=False)
    return module.eval()


def dense(
    hidden: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
) -> torch.Tensor:
    """float32 reference: every token through each of its experts, weighted and summed."""
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    x = hidden.float()
    for expert in torch.unique(ids).tolist():
        token, k = torch.nonzero(ids == expert, as_tuple=True)
        gate, up = (x[token] @ gate_up[expert].float().t()).chunk(2, dim=-1)
        y = (torch.nn.functional.silu(gate) * up) @ down[expert].float().t()
        out.index_add_(0, token, y * weights[token, k, None].float())
    return out


def timed_ms(call: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Time of one call in a back-to-back stream of ``repeats`` calls, ms (median of 5 streams;
    the device synchronised around each stream): how the layers of a model run."""
    for _ in range(3):
        call()
    samples = []
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        for _ in range(repeats):
            call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        samples.append((time.perf_counter() - started) / repeats)
    return statistics.median(samples) * 1e3


def synced_ms(call: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Median time of one call alone (synchronised before and after), ms: its latency."""
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1e3


def profile(call: Callable[[], Any], device: torch.device) -> str:
    """torch.profiler's table of the ops of 20 calls (by device time, else CPU time)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as run_profiler

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with run_profiler(activities=activities) as prof:
        for _ in range(20):
            call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    return str(prof.key_averages().table(sort_by=sort, row_limit=25))


def hbm_copy_rate(device: torch.device) -> float:
    """Bytes per second moved by a device-to-device copy of 4 GiB (read + write)."""
    source = torch.empty(4 << 30, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    seconds = timed_ms(lambda: target.copy_(source), device, 10) / 1e3
    return 2 * (4 << 30) / seconds


def run(
    spec: dict[str, Any], tokens: int, device: torch.device, repeats: int, show_profile: bool
) -> dict[str, Any]:
    generator = torch.Generator(device="cpu").manual_seed(tokens)
    dtype = getattr(torch, spec["dtype"])
    experts, hidden_size, inter, top_k = (
        spec["experts"],
        spec["hidden"],
        spec["inter"],
        spec["top_k"],
    )

    def draw(*shape: int, scale: float) -> torch.Tensor:
        return (torch.randn(shape, generator=generator) * scale).to(device, dtype)

    gate_up = draw(experts, 2 * inter, hidden_size, scale=hidden_size**-0.5)
    down = draw(experts, hidden_size, inter, scale=inter**-0.5)
    hidden = draw(tokens, hidden_size, scale=1.0)
    router = torch.randn((hidden_size, experts), generator=generator).to(device)
    probs = torch.softmax(hidden.float() @ router, dim=-1)
    top_weights, ids = torch.topk(probs, top_k, dim=-1)
    top_weights = (top_weights / top_weights.sum(dim=-1, keepdim=True)).to(dtype)
    reference = dense(hidden, ids, top_weights, gate_up, down)
    scale = reference.norm().item()

    layers: dict[str, Callable[[], torch.Tensor]] = {}
    ours = project_layer(gate_up, down, device)
    layers["project"] = lambda: ours(hidden, ids, top_weights)
    for implementation in BASELINES:
        module = transformers_layer(implementation, gate_up, down, spec)
        layers[f"transformers_{implementation}"] = (
            lambda m=module: m(hidden, ids, top_weights)  # type: ignore[misc]
        )
    result: dict[str, Any] = {"tokens": tokens}
    with torch.inference_mode():
        for name, call in layers.items():
            try:
                result[f"{name}_ms"] = timed_ms(call, device, repeats)
            except torch.OutOfMemoryError as oom:  # batched_mm gathers [T*k, 2I, H] weights
                result[f"{name}_ms"] = None
                result[f"{name}_error"] = str(oom).split(".")[0]
                torch.cuda.empty_cache()
                continue
            result[f"{name}_ms_synced"] = synced_ms(call, device, repeats)
            error = (call().float() - reference).norm().item() / scale
            result[f"{name}_rel_error"] = error
        if show_profile:
            print(f"--- this project's layer, {tokens} tokens", file=sys.stderr)
            print(profile(layers["project"], device), file=sys.stderr)
    touched = int(torch.unique(ids).numel())
    expert_bytes = (gate_up[0].numel() + down[0].numel()) * gate_up.element_size()
    result["experts_touched"] = touched
    result["touched_bytes"] = touched * expert_bytes
    for name in BASELINES:
        theirs = result[f"transformers_{name}_ms"]
        result[f"ratio_to_transformers_{name}"] = (
            None if theirs is None else result["project_ms"] / theirs
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, nargs="+", default=[16, 64, 256, 512])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--label", default="this checkout")
    parser.add_argument("--profile", action="store_true", help="op profile of our layer (stderr)")
    args = parser.parse_args()
    device = torch.device(args.device)
    spec = SHAPES[args.shape]
    rate = hbm_copy_rate(device) if device.type == "cuda" else None
    machine = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu"
    )
    run(spec, args.tokens[0], device, 5, False)  # warm-up: kernels compiled, clocks up
    for tokens in args.tokens:
        result = run(spec, tokens, device, args.repeats, args.profile)
        line: dict[str, Any] = {
            "bench": "moe_layer",
            "shape": args.shape,
            **spec,
            "label": args.label,
            "device": machine,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            **result,
        }
        if rate is not None:
            bound_ms = result["touched_bytes"] / rate * 1e3
            line["hbm_copy_rate_TBps"] = rate / 1e12
            line["weight_read_bound_ms"] = bound_ms
            line["ratio_to_bound"] = result["project_ms"] / bound_ms
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()

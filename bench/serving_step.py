"""Serving-step benchmark: the serving engine's decode step in-process, against transformers.

No HTTP, no router, no client: what one step of ``moe_worker.serving.engine.ServingEngine``
costs with B sequences decoding (each after a prompt of --prompt-tokens), against transformers'
own model (same checkpoint, dtype and device) decoding the same batch with its ``DynamicCache``
(one forward of B new tokens after a batched prefill). A random Qwen3-MoE checkpoint of
``bench/serve.py``'s shapes. One JSON line per batch size: medians of --steps timed steps
(device synchronised), tokens/s, and the ratio of the two step times. ``--profile`` prints
torch's profiler table of a few engine steps to stderr (where the time goes).

    python bench/serving_step.py [--shape tiny] [--device cpu] [--batch 8 64]
    python bench/serving_step.py --shape qwen3-30b-a3b --device cuda --batch 8 64 256
"""

from __future__ import annotations

import argparse
import inspect
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_layer import synced_ms  # noqa: E402
from serve import DTYPES, SHAPES, machine_facts, make_checkpoint, write_line  # noqa: E402


def engine_step_s(
    model_dir: Path,
    num_experts: int,
    dtype: str,
    device: torch.device,
    batch: int,
    prompt_tokens: int,
    steps: int,
    profile: bool,
) -> float:
    """The serving engine's median decode step with ``batch`` sequences decoding."""
    from moe_worker.config import WorkerConfig
    from moe_worker.engine import create_engine
    from moe_worker.serving.backend import SamplingParams

    config = WorkerConfig.model_validate(
        {
            "model": {
                "source": "checkpoint",
                "path": str(model_dir),
                "numExperts": num_experts,
                "dtype": dtype,
            },
            "serving": {
                "enabled": True,
                "maxBatchTokens": max(2048, batch * prompt_tokens),
                "maxRunningRequests": batch,
                "maxWaitingRequests": batch,
            },
            "eplb": {"enabled": False},
            "device": device.type,
        }
    )
    engine = create_engine(config, device=device)
    params = SamplingParams(max_new_tokens=1_000_000, temperature=0, ignore_eos=True)
    generator = torch.Generator().manual_seed(batch)
    for index in range(batch):
        prompt = torch.randint(0, 256, (prompt_tokens,), generator=generator).tolist()
        engine.submit(str(index), prompt, params, lambda _: None)
    while any(engine.scheduler.sequence(str(i)).state != "decode" for i in range(batch)):
        engine.step()  # admission and prefill
    for _ in range(3):
        engine.step()  # warm up the decode shapes
    seconds = synced_ms(engine.step, device, steps) / 1e3
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as profiler

        activities = [ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        with profiler(activities=activities) as run:
            for _ in range(5):
                engine.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        key = "cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(f"--- engine, batch {batch}, by {key}", file=sys.stderr)
        print(run.key_averages().table(sort_by=key, row_limit=20), file=sys.stderr)
        print(f"--- engine, batch {batch}, by cpu_time_total", file=sys.stderr)
        print(run.key_averages().table(sort_by="cpu_time_total", row_limit=20), file=sys.stderr)
    del engine
    return seconds


def transformers_step_s(
    model: Any, device: torch.device, batch: int, prompt_tokens: int, steps: int
) -> float:
    """transformers' median decode forward (B new tokens, ``DynamicCache``) after a batched
    prefill of ``batch`` prompts of ``prompt_tokens``."""
    from transformers import DynamicCache

    generator = torch.Generator().manual_seed(batch)
    ids = torch.randint(0, 256, (batch, prompt_tokens), generator=generator).to(device)
    # transformers renamed the cache argument (past_key_values -> cache) during 5.x
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    cache = {name: DynamicCache(config=model.config)}
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **cache)
        position = [prompt_tokens]

        def step() -> None:
            nonlocal out
            token = out.logits[:, -1].argmax(dim=-1, keepdim=True)
            positions = torch.full((batch, 1), position[0], device=device)
            out = model(
                input_ids=token,
                position_ids=positions,
                **cache,
                use_cache=True,
                logits_to_keep=1,
            )
            token.tolist()  # the host reads the tokens, as a server does
            position[0] += 1

        for _ in range(3):
            step()
        return synced_ms(step, device, steps) / 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    parser.add_argument("--batch", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--prompt-tokens", type=int, default=160)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--machine", default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    shape = {**SHAPES[args.shape], "num_hidden_layers": args.layers}
    facts = machine_facts(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_checkpoint(Path(tmp) / "model", shape, dtype, args.device)
        from transformers import AutoModelForCausalLM

        for batch in args.batch:
            ours = engine_step_s(
                model_dir,
                shape["num_experts"],
                dtype,
                device,
                batch,
                args.prompt_tokens,
                args.steps,
                args.profile,
            )
            model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dtype])
            model = model.to(device).eval()
            theirs = transformers_step_s(model, device, batch, args.prompt_tokens, args.steps)
            del model
            line = {
                "bench": "serving_step",
                "shape": args.shape,
                "layers": args.layers,
                "dtype": dtype,
                "batch": batch,
                "prompt_tokens": args.prompt_tokens,
                "engine_step_ms": round(ours * 1e3, 3),
                "transformers_step_ms": round(theirs * 1e3, 3),
                "engine_tokens_per_s": round(batch / ours, 1),
                "transformers_tokens_per_s": round(batch / theirs, 1),
                "speedup_vs_transformers": round(theirs / ours, 3),
                **({"machine_name": args.machine} if args.machine else {}),
                **facts,
            }
            write_line(line, args.out)


if __name__ == "__main__":
    main()

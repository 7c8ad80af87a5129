"""Serving benchmark: `moe-eplb serve` against transformers' own batched generation.

A tiny random Qwen3-MoE checkpoint (saved by transformers, byte-level tokenizer beside it) is
served by `moe-eplb serve` (its own process, EPLB on); a load generator keeps C streamed
completion requests in flight (prompt of --prompt-tokens ids, --output-tokens generated,
end of sequence ignored) and measures requests/s, output tokens/s, time to first token (TTFT)
and inter-token latency (ITL) p50/p99. In the same run, transformers' `generate` on the same
model and machine serves the same requests in static batches of C (its TTFT: the batch's first
step; its ITL: the gaps between the batch's steps). One JSON line per (system, concurrency).

    python bench/serve.py [--ep-size 1] [--concurrency 1 8 32] [--out bench/results/x.jsonl]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import torch

ROOT = Path(__file__).resolve().parent.parent
SHAPE = {
    "vocab_size": 320,
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 16,
    "num_experts": 16,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 64,
    "intermediate_size": 256,
    "max_position_embeddings": 1024,
    "norm_topk_prob": True,
    "tie_word_embeddings": False,
    "bos_token_id": 256,
    "eos_token_id": 257,
}


def make_checkpoint(directory: Path) -> Path:
    """A random Qwen3-MoE of SHAPE, saved by transformers, with a byte-level tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from moe_worker.model.tokenizer import byte_level_tokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen3_moe", **SHAPE))
    model.save_pretrained(directory)
    byte_level_tokenizer().save_pretrained(directory)
    return directory


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def summary(
    system: str,
    concurrency: int,
    requests: int,
    seconds: float,
    tokens: int,
    ttft: list[float],
    itl: list[float],
) -> dict[str, Any]:
    return {
        "bench": "serve",
        "system": system,
        "concurrency": concurrency,
        "requests": requests,
        "seconds": round(seconds, 3),
        "requests_per_s": round(requests / seconds, 3),
        "output_tokens_per_s": round(tokens / seconds, 1),
        "ttft_p50_ms": round(1000 * percentile(ttft, 50), 2),
        "ttft_p99_ms": round(1000 * percentile(ttft, 99), 2),
        "itl_p50_ms": round(1000 * percentile(itl, 50), 2),
        "itl_p99_ms": round(1000 * percentile(itl, 99), 2),
    }


def prompts(count: int, length: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (length,), generator=generator).tolist() for _ in range(count)]


async def one_request(
    client: httpx.AsyncClient,
    url: str,
    prompt: list[int],
    output: int,
    ttft: list[float],
    itl: list[float],
) -> int:
    body = {
        "prompt": prompt,
        "max_tokens": output,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "return_token_ids": True,
    }
    started = time.perf_counter()
    last = None
    tokens = 0
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ids = sum((c.get("token_ids") or [] for c in json.loads(line[6:])["choices"]), [])
            if not ids:
                continue
            now = time.perf_counter()
            if last is None:
                ttft.append(now - started)
            else:
                itl.append((now - last) / len(ids))
            last = now
            tokens += len(ids)
    return tokens


async def load(
    url: str, concurrency: int, requests: int, prompt_tokens: int, output_tokens: int
) -> dict[str, Any]:
    """``requests`` requests, ``concurrency`` in flight at any time."""
    queue = prompts(requests, prompt_tokens, seed=concurrency)
    ttft: list[float] = []
    itl: list[float] = []
    total = [0]

    async def client_loop(client: httpx.AsyncClient) -> None:
        while queue:
            prompt = queue.pop()
            tokens = await one_request(client, url, prompt, output_tokens, ttft, itl)
            total[0] += tokens  # after the await: a += across it would lose other tasks' counts

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits, trust_env=False) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    return summary("moe-eplb serve", concurrency, requests, seconds, total[0], ttft, itl)


def transformers_batched(
    model_dir: Path, concurrency: int, requests: int, prompt_tokens: int, output_tokens: int
) -> dict[str, Any]:
    """The same requests through transformers' generate in static batches of ``concurrency``."""
    from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    config = model.generation_config
    config.eos_token_id = [1 << 30]  # ignore end of sequence, as the served requests do
    config.pad_token_id = 0
    config.do_sample = False
    config.max_new_tokens = output_tokens

    class StepClock(LogitsProcessor):
        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            self.times.append(time.perf_counter())
            return scores

    batch_prompts = prompts(requests, prompt_tokens, seed=concurrency)
    ttft: list[float] = []
    itl: list[float] = []
    started = time.perf_counter()
    for first in range(0, requests, concurrency):
        batch = torch.tensor(batch_prompts[first : first + concurrency])
        clock = StepClock()
        batch_start = time.perf_counter()
        with torch.no_grad():
            model.generate(
                batch,
                attention_mask=torch.ones_like(batch),
                generation_config=config,
                logits_processor=LogitsProcessorList([clock]),
            )
        ttft += [clock.times[0] - batch_start] * len(batch)
        itl += [b - a for a, b in zip(clock.times, clock.times[1:], strict=False)] * len(batch)
    seconds = time.perf_counter() - started
    return summary(
        "transformers generate (static batches)",
        concurrency,
        requests,
        seconds,
        requests * output_tokens,
        ttft,
        itl,
    )


class Server:
    def __init__(self, model_dir: Path, ep_size: int) -> None:
        paths = [str(ROOT / "operator"), str(ROOT / "worker"), os.environ.get("PYTHONPATH", "")]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "moe_operator.cli",
                "serve",
                str(model_dir),
                "--ep-size",
                str(ep_size),
                "--port",
                "0",
                "--device",
                "cpu",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.url = ""
        ready = threading.Event()

        def read() -> None:
            assert self.process.stdout is not None
            for line in self.process.stdout:
                match = re.search(r"serving \S+ at (http://\S+)/v1", line)
                if match:
                    self.url = match.group(1)
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(300) or not self.url:
            self.stop()
            raise SystemExit("moe-eplb serve did not start")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        self.process.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ep-size", type=int, default=1)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=None, help="Append the JSON lines here.")
    args = parser.parse_args()
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or 'cpu'}"
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_checkpoint(Path(tmp) / "qwen3-moe-tiny")
        server = Server(model_dir, args.ep_size)
        try:
            # warm up: the first requests compile and allocate
            asyncio.run(load(server.url, 2, 4, args.prompt_tokens, 4))
            for concurrency in args.concurrency:
                requests = max(2 * concurrency, 16)
                ours = asyncio.run(
                    load(server.url, concurrency, requests, args.prompt_tokens, args.output_tokens)
                )
                ours["ep_size"] = args.ep_size
                lines.append(ours)
        finally:
            server.stop()
        for concurrency in args.concurrency:
            requests = max(2 * concurrency, 16)
            lines.append(
                transformers_batched(
                    model_dir, concurrency, requests, args.prompt_tokens, args.output_tokens
                )
            )
    by_key = {(line["system"], line["concurrency"]): line for line in lines}
    for line in lines:
        line.update(
            {
                "machine": machine,
                "torch": torch.__version__,
                "prompt_tokens": args.prompt_tokens,
                "output_tokens": args.output_tokens,
            }
        )
        if line["system"] == "moe-eplb serve":
            base = by_key[("transformers generate (static batches)", line["concurrency"])]
            line["tokens_per_s_vs_transformers"] = round(
                line["output_tokens_per_s"] / base["output_tokens_per_s"], 3
            )
        text = json.dumps(line)
        print(text, flush=True)
        if args.out is not None:
            with args.out.open("a") as handle:
                handle.write(text + "\n")


if __name__ == "__main__":
    main()

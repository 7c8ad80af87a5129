"""Serving benchmark: `moe-eplb serve` against transformers' own batched generation.

A random Qwen3-MoE checkpoint (saved by transformers, byte-level tokenizer beside it) is served
by `moe-eplb serve` (its own process, EPLB on) and driven by the project's load generator
(`moe_operator.loadgen`: a closed loop of C clients, each sending its next streamed completion
when the last one ends; prompts of --prompt-words words, --output-tokens generated, end of
sequence ignored). In the same run, transformers' `generate` on the same weights, machine and
dtype serves the same requests (the same prompts, tokenized by the same tokenizer, left-padded)
in static batches of C. Both are summarized by `moe_operator.loadgen.stats.summarize`:
requests/s, output tokens/s, time to first token (TTFT), inter-token latency (ITL) and end to
end p50/p90/p99 (transformers: a request's TTFT is its batch's first step, its ITL the gaps
between the batch's steps). One JSON line per (system, concurrency); serve's lines carry the
ratios serve / transformers.

EPLB modes (``--eplb``, each its own server in the same run): ``off`` (no load recording, no
redundant slots), ``on`` (periodic rebalances as configured) and ``rebalancing`` (a rebalance
asked for through the control API every ``--rebalance-every`` seconds; ITL of the tokens that
arrived during a rebalance vs the others: ``during_rebalance``). The prompts come from a skewed
topic mix (``--topics``, ``--topic-skew``, ``--drift-period-s``). ``--check-prompts N``: N greedy
completions from each mode and transformers' ``generate`` (batch 1) compared token by token;
``--loads-out``: the leader's per-expert load window of mode ``on`` (for ``bench/placement.py``).

Shapes: ``tiny`` (CPU-friendly) and ``qwen3-30b-a3b`` (Qwen3-30B-A3B's layer shape: hidden 2048,
32 query / 4 KV heads of 128, 128 experts, top-8, expert FFN 768; --layers of them).

    python bench/serve.py [--shape tiny] [--device cpu] [--concurrency 1 8 32] [--out x.jsonl]
    python bench/serve.py --shape qwen3-30b-a3b --device cuda --concurrency 1 8 32 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import torch
import yaml

from moe_operator.loadgen.runner import run_traffic
from moe_operator.loadgen.stats import RequestRecord, summarize, window_itl_summary
from moe_operator.loadgen.traffic import TrafficPlan
from moe_worker.config import TrafficConfig

ROOT = Path(__file__).resolve().parent.parent

SERVE = "moe-eplb serve"
MODES = ("off", "on", "rebalancing")
TRANSFORMERS = "transformers generate (static batches)"
BYTE_VOCAB = {"vocab_size": 320, "bos_token_id": 256, "eos_token_id": 257}
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {
        **BYTE_VOCAB,
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
    },
    # Qwen3-30B-A3B's decoder layer (every layer MoE); layers from --layers, a byte-level vocab.
    "qwen3-30b-a3b": {
        **BYTE_VOCAB,
        "hidden_size": 2048,
        "num_hidden_layers": 4,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "moe_intermediate_size": 768,
        "intermediate_size": 6144,
        "max_position_embeddings": 4096,
        "rope_theta": 1_000_000.0,
        "rms_norm_eps": 1e-6,
        "norm_topk_prob": True,
        "tie_word_embeddings": False,
    },
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_checkpoint(directory: Path, shape: dict[str, Any], dtype: str, device: str) -> Path:
    """A random Qwen3-MoE of ``shape``, saved by transformers in ``dtype``, with a byte-level
    tokenizer (weights drawn on ``device``: a GPU draws Qwen3-sized layers in seconds)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from moe_worker.model.tokenizer import byte_level_tokenizer

    torch.manual_seed(0)
    config = AutoConfig.for_model("qwen3_moe", **shape)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
    model.save_pretrained(directory)
    byte_level_tokenizer().save_pretrained(directory)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return directory


def traffic(
    concurrency: int,
    requests: int,
    prompt_words: int,
    output_tokens: int,
    seed: int,
    mix: dict[str, Any] | None = None,
) -> TrafficConfig:
    """A closed loop of ``concurrency`` clients sending ``requests`` fixed-length requests whose
    prompts come from ``mix`` (TrafficConfig's topics / topicSkew / driftPeriodS; its defaults:
    8 topics of zipf 1.2 popularity)."""
    return TrafficConfig.model_validate(
        {
            "durationS": 24 * 3600.0,  # ended by maxRequests
            "maxRequests": requests,
            "concurrency": concurrency,
            "promptWords": {"mean": prompt_words, "kind": "fixed"},
            "outputTokens": {"mean": output_tokens, "kind": "fixed"},
            "ignoreEos": True,
            "seed": seed,
            **(mix or {}),
        }
    )


def request_count(concurrency: int, minimum: int, rounds: int) -> int:
    """At least ``minimum`` and ``rounds`` per client, in whole static batches of
    ``concurrency``."""
    return concurrency * math.ceil(max(minimum, rounds * concurrency) / concurrency)


def serve_load(
    url: str, config: TrafficConfig
) -> tuple[dict[str, Any], list[RequestRecord], float]:
    """Run ``config`` against ``url``: its summary, its records, and the ``time.perf_counter()``
    of the records' time 0 (read from the runner's progress clock)."""
    origin: list[float] = []

    def progress(records: list[RequestRecord], elapsed: float) -> None:
        if not origin:
            origin.append(time.perf_counter() - elapsed)

    result = asyncio.run(run_traffic(url, config, on_progress=progress))
    failed = [r for r in result.records if r.error is not None]
    if failed:
        print(
            f"{len(failed)} requests failed, e.g. {failed[0].error}: {failed[0].detail}",
            file=sys.stderr,
        )
    return result.summary(), result.records, origin[0]


class Rebalancer:
    """Asks ``server`` for a rebalance every ``every_s`` seconds (the control API) and records
    each one's window on the ``time.perf_counter()`` clock: from the request to its end (the
    request time plus the rebalance's own duration and one 50 ms poll slack, or when its
    result was seen, whichever is first)."""

    def __init__(self, server: Server, every_s: float) -> None:
        self.server, self.every_s = server, every_s
        self.windows: list[tuple[float, float]] = []
        self.results: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Rebalancer:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=600)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            before = self.server.state().get("lastRebalance")
            asked = time.perf_counter()
            if self.server.rebalance() != 202:
                continue
            deadline = asked + 600.0
            while time.perf_counter() < deadline:
                last = self.server.state().get("lastRebalance")
                if last is not None and last != before:
                    seen = time.perf_counter()
                    end = min(seen, asked + float(last["durationSeconds"] or 0.0) + 0.05)
                    self.windows.append((asked, end))
                    self.results.append(last)
                    break
                time.sleep(0.05)  # a poll interval of the control API, not a synchronisation


def greedy_ids(url: str, prompt: list[int], max_tokens: int) -> list[int]:
    """The greedy token ids of one completion (token-id prompt, ``return_token_ids``)."""
    import httpx

    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "return_token_ids": True,
    }
    with httpx.Client(timeout=600, trust_env=False) as client:
        response = client.post(url + "/v1/completions", json=body)
        response.raise_for_status()
        return [int(t) for t in response.json()["choices"][0]["token_ids"]]


def expert_loads(metrics_url: str, model: str = "main") -> list[list[float]]:
    """``moe_expert_load_tokens`` of ``model`` scraped from the leader: [layers, experts]."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(metrics_url, timeout=30, trust_env=False).text
    cells: dict[tuple[int, int], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "moe_expert_load_tokens" and sample.labels.get("model") == model:
                cells[int(sample.labels["layer"]), int(sample.labels["expert"])] = sample.value
    if not cells:
        raise SystemExit(f"{metrics_url}: no moe_expert_load_tokens series (metrics.perExpert?)")
    layers = 1 + max(layer for layer, _ in cells)
    experts = 1 + max(expert for _, expert in cells)
    return [[cells.get((layer, e), 0.0) for e in range(experts)] for layer in range(layers)]


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first position where two token lists differ (or their shorter length); None if equal."""
    for index, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return index
    return None if len(a) == len(b) else min(len(a), len(b))


def greedy_reference(model: Any, prompt: list[int], tokens: int, device: torch.device) -> list[int]:
    """transformers' greedy ``generate`` of one prompt (batch 1, end of sequence ignored)."""
    from transformers import GenerationConfig

    generation = GenerationConfig(
        do_sample=False, eos_token_id=[1 << 30], pad_token_id=0, max_new_tokens=tokens
    )
    ids = torch.tensor([prompt], device=device)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=generation)
    return [int(t) for t in out[0, len(prompt) :]]


def transformers_batched(
    model: Any, tokenizer: Any, config: TrafficConfig, device: torch.device
) -> dict[str, Any]:
    """``config``'s requests (same prompts as the load generator sends) through transformers'
    generate in static batches of ``config.concurrency``, summarized like the load generator's
    records: every request of a batch is sent at the batch's start, has its first token at the
    batch's first step and its next tokens at the batch's next steps."""
    from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

    assert config.concurrency is not None and config.max_requests is not None
    plan = TrafficPlan(config)
    planned = [plan.request(index, 0.0) for index in range(config.max_requests)]
    prompts = [[int(t) for t in tokenizer.encode(p.prompt)] for p in planned]
    pad = int(tokenizer.eos_token_id)

    class StepClock(LogitsProcessor):
        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.times.append(time.perf_counter())
            return scores

    def batch_tensors(batch: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(ids) for ids in batch)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        return ids, mask

    def generate(batch: list[list[int]], clock: StepClock | None, tokens: int) -> torch.Tensor:
        ids, mask = batch_tensors(batch)
        processors = LogitsProcessorList([clock] if clock is not None else [])
        generation = GenerationConfig(
            do_sample=False,
            eos_token_id=[1 << 30],  # ignore end of sequence, as the served requests do
            pad_token_id=pad,
            max_new_tokens=tokens,
        )
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=mask,
                generation_config=generation,
                logits_processor=processors,
            )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out

    generate(prompts[: config.concurrency], None, 8)  # warm up this batch size
    records: list[RequestRecord] = []
    padded = 0
    start = time.perf_counter()
    for first in range(0, len(prompts), config.concurrency):
        batch = prompts[first : first + config.concurrency]
        padded += len(batch) * max(len(p) for p in batch)
        clock = StepClock()
        sent = time.perf_counter() - start
        out = generate(batch, clock, planned[0].max_tokens)
        finished = time.perf_counter() - start
        steps = [t - start for t in clock.times]
        gaps = [b - a for a, b in zip(steps, steps[1:], strict=False)]
        new_tokens = out.shape[1] - max(len(p) for p in batch)
        for offset, prompt in enumerate(batch):
            records.append(
                RequestRecord(
                    index=first + offset,
                    topic=planned[first + offset].topic,
                    sent_at=sent,
                    first_token_at=steps[0],
                    finished_at=finished,
                    chunk_gaps=list(gaps),
                    output_tokens=new_tokens,
                    prompt_tokens=len(prompt),
                    finish_reason="length",
                )
            )
    elapsed = time.perf_counter() - start
    return {**summarize(records, elapsed), "padded_prompt_tokens": padded}


class Server:
    """`moe-eplb serve MODEL_DIR` as a subprocess (``python -m moe_operator.cli serve``)."""

    def __init__(
        self, model_dir: Path, ep_size: int, device: str, config_file: Path, timeout_s: float
    ) -> None:
        paths = [str(ROOT / "operator"), str(ROOT / "worker"), os.environ.get("PYTHONPATH", "")]
        self.token = secrets.token_urlsafe(16)
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(p for p in paths if p),
            "MOE_CONTROL_TOKEN": self.token,
        }
        env.setdefault("COLUMNS", "400")  # rich wraps console lines at 80 columns otherwise
        command = [
            sys.executable, "-m", "moe_operator.cli", "serve", str(model_dir),
            "--ep-size", str(ep_size), "--port", "0", "--device", device,
            "--config", str(config_file),
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.url = ""
        self.metrics_url = ""
        self.logs: Path | None = None
        self.output: deque[str] = deque(maxlen=40)
        ready = threading.Event()

        def read() -> None:
            assert self.process.stdout is not None
            for line in self.process.stdout:
                self.output.append(line.rstrip())
                if (logs := re.search(r"logs in (\S+?)\)", line)) is not None:
                    self.logs = Path(logs.group(1))
                match = re.search(r"serving \S+ at (http://\S+)/v1", line)
                if match:
                    self.url = match.group(1)
                if (metrics := re.search(r"leader metrics at (http://\S+)", line)) is not None:
                    self.metrics_url = metrics.group(1)
                    ready.set()  # printed after the API's line
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(timeout_s) or not self.url:
            self.dump()
            self.stop()
            raise SystemExit(f"{SERVE} did not start")

    def _control(self, method: str, path: str) -> Any:
        import httpx

        headers = {"Authorization": f"Bearer {self.token}"}
        body = {"reason": "bench"} if method == "POST" else None
        return httpx.request(
            method, self.url + path, headers=headers, json=body, timeout=30, trust_env=False
        )

    def state(self) -> dict[str, Any]:
        """The leader's ``/v1/state`` (through the router)."""
        response = self._control("GET", "/v1/state")
        response.raise_for_status()
        return dict(response.json())

    def kernels_settled(self, timeout_s: float = 300.0) -> str:
        """Wait (up to ``timeout_s``) until the leader's placement kernels are no longer
        compiling (a compile holds the GIL for seconds: measured, it would slow the serving
        loop); returns how placements run there (``placementKernels`` of ``/v1/state``)."""
        deadline = time.monotonic() + timeout_s
        while (build := self.state().get("placementKernels")) in (None, "compiling"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"placement kernels still {build} after {timeout_s} s")
            time.sleep(0.2)
        return str(build)

    def rebalance(self) -> int:
        """Ask for a rebalance; the status code (202 accepted, 409 one is pending)."""
        return int(self._control("POST", "/v1/eplb/rebalance").status_code)

    def dump(self) -> None:
        """The server's last lines and its ranks' log tails, on stderr (for failed runs)."""
        print("\n".join(["--- serve output:", *self.output]), file=sys.stderr)
        for log in sorted(self.logs.glob("rank-*.log")) if self.logs else []:
            tail = log.read_text(errors="replace").splitlines()[-30:]
            print("\n".join([f"--- {log}:", *tail]), file=sys.stderr)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def write_line(line: dict[str, Any], out: Path | None) -> None:
    """Print ``line`` as one JSON line, and append it to ``out`` when given."""
    text = json.dumps(line)
    print(text, flush=True)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as handle:
            handle.write(text + "\n")


def machine_facts(device: str) -> dict[str, Any]:
    import transformers

    facts: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"{platform.processor() or platform.system()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    from moe_worker.eplb.policy import HAVE_NUMBA, aot_available

    # how the placement kernels run here (pure Python without numba: rebalances plan slower)
    facts["placement_kernels"] = (
        "numba-aot" if aot_available() else "numba-jit" if HAVE_NUMBA else "python"
    )
    if device == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(0)
        facts["cuda"] = torch.version.cuda
    return facts


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--layers", type=int, default=4, help="Decoder layers (every one MoE).")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="Default: bfloat16 on cuda, else fp32.",
    )
    parser.add_argument("--ep-size", type=int, default=1)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument(
        "--requests",
        type=int,
        default=16,
        help="Requests per concurrency at least (and --rounds per client, whole batches of C).",
    )
    parser.add_argument("--rounds", type=int, default=2, help="Requests per client at least.")
    parser.add_argument("--prompt-words", type=int, default=8)
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--max-batch-tokens", type=int, default=2048, help="serving budget/step.")
    parser.add_argument(
        "--eplb",
        nargs="+",
        choices=MODES,
        default=["on"],
        help="Serve once per mode, one run: off (eplb.enabled false, no redundant slots), on "
        "(its periodic rebalances), rebalancing (on, a rebalance asked for every "
        "--rebalance-every seconds, ITL inside vs outside them).",
    )
    parser.add_argument(
        "--redundant", type=int, default=None, help="eplb.numRedundantExperts with EPLB on."
    )
    parser.add_argument("--policy", default=None, help="eplb.policy with EPLB on.")
    parser.add_argument(
        "--rebalance-every",
        type=float,
        default=2.0,
        help="Mode rebalancing: seconds between the rebalances asked for (periodic ones off).",
    )
    parser.add_argument("--topics", type=int, default=8, help="Topics in the prompt mix.")
    parser.add_argument("--topic-skew", type=float, default=1.2, help="Zipf s of topics.")
    parser.add_argument("--drift-period-s", type=float, default=None, help="Hot topic rotation.")
    parser.add_argument(
        "--check-prompts",
        type=int,
        default=0,
        help="Greedy completions of N prompts, one at a time after the loads, compared "
        "between the EPLB modes and with transformers' generate (batch 1).",
    )
    parser.add_argument(
        "--loads-out",
        type=Path,
        default=None,
        help="With EPLB on: write the leader's per-expert load window here ({counts: [L][E]}).",
    )
    parser.add_argument(
        "--no-transformers", action="store_true", help="Skip the transformers baseline."
    )
    parser.add_argument("--machine", default=None, help="A name for the machine (e.g. h200).")
    parser.add_argument("--out", type=Path, default=None, help="Append the JSON lines here.")
    args = parser.parse_args()
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    shape = {**SHAPES[args.shape], "num_hidden_layers": args.layers}
    running = max(64, *args.concurrency)
    serving = {
        "maxRunningRequests": running,
        "maxBatchTokens": max(args.max_batch_tokens, running),
        "maxWaitingRequests": max(256, 2 * running),
    }
    mix: dict[str, Any] = {"topics": args.topics, "topicSkew": args.topic_skew}
    if args.drift_period_s is not None:
        mix["driftPeriodS"] = args.drift_period_s
    common = {
        "bench": "serve",
        "shape": args.shape,
        "layers": args.layers,
        "device": args.device,
        "dtype": dtype,
        "prompt_words": args.prompt_words,
        "output_tokens_per_request": args.output_tokens,
        "prompt_mix": mix,
        **({"machine_name": args.machine} if args.machine else {}),
        **machine_facts(args.device),
    }
    plans = {c: request_count(c, args.requests, args.rounds) for c in args.concurrency}

    def closed_loop(concurrency: int, requests: int) -> TrafficConfig:
        """The measured requests at ``concurrency`` (the same for both systems)."""
        return traffic(
            concurrency, requests, args.prompt_words, args.output_tokens, concurrency, mix
        )

    def worker_config(mode: str) -> dict[str, Any]:
        eplb: dict[str, Any] = {"enabled": mode != "off"}
        if mode == "off":
            eplb["numRedundantExperts"] = 0
        else:
            if args.redundant is not None:
                eplb["numRedundantExperts"] = args.redundant
            if args.policy is not None:
                eplb["policy"] = args.policy
            if mode == "rebalancing":
                eplb["stepInterval"] = 1_000_000_000  # only the asked-for rebalances
        config: dict[str, Any] = {"model": {"dtype": dtype}, "serving": serving, "eplb": eplb}
        if args.loads_out is not None and mode == "on":
            config["metrics"] = {"perExpert": True}
        return config

    lines: list[dict[str, Any]] = []
    checks: dict[str, list[list[int]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_checkpoint(
            Path(tmp) / f"qwen3-moe-{args.shape}", shape, dtype, args.device
        )
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        check_plan = TrafficPlan(closed_loop(1, max(1, args.check_prompts)))
        check_prompts = [
            [int(t) for t in tokenizer.encode(check_plan.request(index, 0.0).prompt)]
            for index in range(args.check_prompts)
        ]
        for mode in args.eplb:
            config = worker_config(mode)
            config_file = Path(tmp) / f"worker-{mode}.yaml"
            config_file.write_text(yaml.safe_dump(config))
            started = time.perf_counter()
            server = Server(model_dir, args.ep_size, args.device, config_file, timeout_s=600)
            print(f"{SERVE} (EPLB {mode}) ready in {time.perf_counter() - started:.1f} s",
                  file=sys.stderr)  # fmt: skip
            try:
                kernels = server.kernels_settled()
                # warm up: the first steps of each batch size compile (Triton) and allocate
                for concurrency in args.concurrency:
                    warm = traffic(
                        concurrency, concurrency, args.prompt_words, 8, 1000 + concurrency, mix
                    )
                    serve_load(server.url, warm)
                for concurrency, requests in plans.items():
                    rebalancing = mode == "rebalancing"
                    rebalancer = Rebalancer(server, args.rebalance_every)
                    if rebalancing:
                        with rebalancer:
                            summary, records, origin = serve_load(
                                server.url, closed_loop(concurrency, requests)
                            )
                    else:
                        summary, records, origin = serve_load(
                            server.url, closed_loop(concurrency, requests)
                        )
                    lines.append({**common, "system": SERVE, "concurrency": concurrency, **summary})
                    lines[-1].update({"ep_size": args.ep_size, "eplb_mode": mode})
                    lines[-1]["placement_kernels"] = kernels
                    lines[-1]["eplb"] = config["eplb"]
                    lines[-1]["serving"] = serving
                    if rebalancing:
                        windows = [(a - origin, b - origin) for a, b in rebalancer.windows]
                        lines[-1]["during_rebalance"] = {
                            **window_itl_summary(records, windows),
                            "rebalances": [
                                {
                                    key: result[key]
                                    for key in ("result", "durationSeconds", "copiesMoved")
                                }
                                for result in rebalancer.results
                            ],
                        }
                    print(json.dumps(lines[-1]), file=sys.stderr, flush=True)
                if check_prompts:
                    checks[mode] = [
                        greedy_ids(server.url, prompt, args.output_tokens)
                        for prompt in check_prompts
                    ]
                if args.loads_out is not None and mode == "on":
                    counts = expert_loads(server.metrics_url)
                    args.loads_out.parent.mkdir(parents=True, exist_ok=True)
                    args.loads_out.write_text(
                        json.dumps(
                            {
                                "counts": counts,
                                "source": f"{SERVE} {args.shape} x{args.layers} layers, "
                                f"EP {args.ep_size}, the leader's load window after the loads "
                                f"(prompt mix {mix})",
                                **machine_facts(args.device),
                            }
                        )
                        + "\n"
                    )
            except BaseException:
                server.dump()
                raise
            finally:
                server.stop()

        from transformers import AutoModelForCausalLM

        device = torch.device(args.device)
        model: Any = None
        if check_prompts or not args.no_transformers:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dtype])
            model = model.to(device).eval()
        if check_prompts:
            reference = [
                greedy_reference(model, prompt, args.output_tokens, device)
                for prompt in check_prompts
            ]
            line: dict[str, Any] = {
                **common,
                "bench": "serve_outputs",
                "prompts": len(check_prompts),
                "reference": "transformers generate, batch 1, greedy, same dtype and device",
            }
            for mode, got in checks.items():
                differences = [first_difference(a, b) for a, b in zip(got, reference, strict=True)]
                line[f"eplb_{mode}_equal_to_reference"] = differences.count(None)
                line[f"eplb_{mode}_first_difference_at"] = differences
            for mode in ("on", "rebalancing"):
                if {mode, "off"} <= checks.keys():
                    pairs = zip(checks[mode], checks["off"], strict=True)
                    line[f"eplb_{mode}_equal_to_off"] = sum(a == b for a, b in pairs)
            lines.append(line)
            print(json.dumps(line), file=sys.stderr, flush=True)
        if not args.no_transformers:
            implementations = {
                "attention": model.config._attn_implementation,
                "experts": getattr(model.config, "_experts_implementation", None),
            }
            for concurrency, requests in plans.items():
                summary = transformers_batched(
                    model, tokenizer, closed_loop(concurrency, requests), device
                )
                lines.append(
                    {**common, "system": TRANSFORMERS, "concurrency": concurrency, **summary}
                )
                lines[-1]["transformers_implementations"] = implementations
                print(json.dumps(lines[-1]), file=sys.stderr, flush=True)

    by_key = {(line.get("system"), line.get("concurrency")): line for line in lines}
    for line in lines:
        base = by_key.get((TRANSFORMERS, line.get("concurrency")))
        if line.get("system") == SERVE and base is not None:
            line["vs_transformers"] = {
                key: round(line[key] / base[key], 3) if line[key] and base[key] else None
                for key in (
                    "requests_per_s",
                    "output_tokens_per_s",
                    "ttft_p50_ms",
                    "ttft_p99_ms",
                    "itl_p50_ms",
                    "itl_p99_ms",
                )
            }
        write_line(line, args.out)


if __name__ == "__main__":
    main()

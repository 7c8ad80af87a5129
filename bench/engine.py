"""Engine benchmark: MoE step time and tokens/s, and the cost of EPLB recording and metrics.

One EP rank runs the step loop on a synthetic model with the zipf routing simulator. Four modes
alternate in rounds on the same model, so all see the same machine state: EPLB off (no layer
state, no controller), EPLB on (load recorded every step, controller stepping; no rebalance
falls inside the run), and the serving loop with Prometheus metrics off and on. Prints one JSON
line per shape.

    python bench/engine.py --shape tiny            # CPU
    python bench/engine.py --shape qwen3 --device cuda
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from moe_worker.config import WorkerConfig
from moe_worker.engine import Engine
from moe_worker.metrics import WorkerMetrics
from moe_worker.server import WorkerStatus
from moe_worker.service import WorkerService

SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {
        "model": {
            "numLayers": 4,
            "hiddenSize": 64,
            "numExperts": 16,
            "topK": 2,
            "intermediateSize": 64,
        },
        "tokens": 256,
    },
    # Qwen3-30B-A3B's MoE layers: hidden 2048, 128 experts, top-8, expert FFN 768, bf16.
    "qwen3": {
        "model": {
            "numLayers": 8,
            "hiddenSize": 2048,
            "numExperts": 128,
            "topK": 8,
            "intermediateSize": 768,
            "dtype": "bfloat16",
            "renormalize": True,
        },
        "tokens": 512,
    },
}


def timed(step: Callable[[], None], engine: Engine, steps: int) -> list[float]:
    samples = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        if engine.device.type == "cuda":
            torch.cuda.synchronize(engine.device)
        samples.append(time.perf_counter() - started)
    return samples


def run(shape: str, device: str, rounds: int, steps: int) -> dict[str, Any]:
    spec = SHAPES[shape]
    config = WorkerConfig.model_validate(
        {
            "model": spec["model"],
            "eplb": {"windowSize": 1000, "stepInterval": 1_000_000},
            "workload": {"kind": "zipf", "tokensPerStep": spec["tokens"]},
            "device": device,
        }
    )
    engine = Engine(config, device=torch.device(device))
    controller = engine.eplb
    assert controller is not None
    layer_states = [layer.eplb_state for layer in engine.model.moe_layers]
    metrics = WorkerMetrics("bench", 0, "torch_gloo", "incremental", False)
    with_metrics = WorkerService(engine, WorkerStatus(), metrics)
    without_metrics = WorkerService(engine, WorkerStatus(), None)

    def set_eplb(on: bool) -> None:
        engine.eplb = controller if on else None
        for layer, state in zip(engine.model.moe_layers, layer_states, strict=True):
            layer.eplb_state = state if on else None

    modes: dict[str, tuple[bool, Callable[[], None]]] = {
        "eplb_off": (False, engine.step),
        "eplb_on": (True, engine.step),
        "service_metrics_off": (True, without_metrics.step),
        "service_metrics_on": (True, with_metrics.step),
    }
    timed(engine.step, engine, 5)  # warm-up
    samples: dict[str, list[float]] = {name: [] for name in modes}
    for index in range(rounds):
        names = list(modes) if index % 2 == 0 else list(reversed(modes))
        for name in names:
            eplb, step = modes[name]
            set_eplb(eplb)
            samples[name].extend(timed(step, engine, steps))
    set_eplb(True)
    p50 = {name: statistics.median(values) for name, values in samples.items()}
    # the part of a step spent drawing the simulated batch (hidden states, routing) on the host
    batch_seconds = []
    for index in range(steps):
        started = time.perf_counter()
        engine.simulator.batch(index)
        batch_seconds.append(time.perf_counter() - started)
    tokens = spec["tokens"]
    return {
        "bench": "engine",
        "shape": shape,
        "model": spec["model"],
        "tokens_per_step": tokens,
        "device": torch.cuda.get_device_name()
        if device == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "steps_each": len(samples["eplb_on"]),
        **{f"step_ms_{name}_p50": value * 1e3 for name, value in p50.items()},
        "batch_draw_ms_p50": statistics.median(batch_seconds) * 1e3,
        "tokens_per_s_eplb_on": tokens / p50["eplb_on"],
        "tokens_per_s_eplb_off": tokens / p50["eplb_off"],
        "recording_overhead_ratio": p50["eplb_on"] / p50["eplb_off"] - 1.0,
        "metrics_overhead_ratio": p50["service_metrics_on"] / p50["service_metrics_off"] - 1.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    print(json.dumps(run(args.shape, args.device, args.rounds, args.steps)), flush=True)


if __name__ == "__main__":
    main()

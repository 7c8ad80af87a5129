"""Engine benchmark: MoE step time and tokens/s, and the cost of EPLB load recording.

One EP rank runs the step loop on a synthetic model with the zipf routing simulator. EPLB on
(load recorded every step, controller stepping; no rebalance falls inside the run) and off (no
layer state, no controller) alternate in rounds on the same model, so both see the same
machine state. Prints one JSON line per shape.

    python bench/engine.py --shape tiny            # CPU
    python bench/engine.py --shape qwen3 --device cuda
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Any

import torch

from moe_worker.config import WorkerConfig
from moe_worker.engine import Engine

SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {
        "model": {"numLayers": 4, "hiddenSize": 64, "numExperts": 16, "topK": 2,
                  "intermediateSize": 64},
        "tokens": 256,
    },
    # Qwen3-30B-A3B's MoE layers: hidden 2048, 128 experts, top-8, expert FFN 768, bf16.
    "qwen3": {
        "model": {"numLayers": 8, "hiddenSize": 2048, "numExperts": 128, "topK": 8,
                  "intermediateSize": 768, "dtype": "bfloat16", "renormalize": True},
        "tokens": 512,
    },
}


def timed_steps(engine: Engine, steps: int) -> list[float]:
    samples = []
    for _ in range(steps):
        started = time.perf_counter()
        engine.step()
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
    layer_states = [layer.eplb_state for layer in engine.model.layers]

    def set_eplb(on: bool) -> None:
        engine.eplb = controller if on else None
        for layer, state in zip(engine.model.layers, layer_states, strict=True):
            layer.eplb_state = state if on else None

    timed_steps(engine, 5)  # warm-up
    samples: dict[bool, list[float]] = {True: [], False: []}
    for index in range(rounds):
        for on in (True, False) if index % 2 == 0 else (False, True):
            set_eplb(on)
            samples[on].extend(timed_steps(engine, steps))
    set_eplb(True)
    on_s, off_s = statistics.median(samples[True]), statistics.median(samples[False])
    tokens = spec["tokens"]
    return {
        "bench": "engine",
        "shape": shape,
        "model": spec["model"],
        "tokens_per_step": tokens,
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "steps_each": len(samples[True]),
        "step_ms_eplb_on_p50": on_s * 1e3,
        "step_ms_eplb_off_p50": off_s * 1e3,
        "tokens_per_s_eplb_on": tokens / on_s,
        "tokens_per_s_eplb_off": tokens / off_s,
        "recording_overhead_ratio": on_s / off_s - 1.0,
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

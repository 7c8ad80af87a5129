"""Async-stall benchmark: step times while a rebalance runs, async vs a synchronous stall.

Two GPUs, EP 2, the Qwen3-30B-A3B-shaped stack of the engine benchmark (hidden 2048, 128
experts, top-8, FFN 768, bf16), zipf routing. In one run: a balanced placement for the load, and
steady decoding on it; then an asynchronous rebalance to the same placement with the two ranks'
slots exchanged (equal balance, so step times stay comparable, and every expert copy moves)
while steps continue; then steady steps again; then a synchronous rebalance back, inside one
step. Prints one JSON line: step time p50/p99 in steady state and
while the async rebalance is in flight, the sync stall, and the copies moved.

    python bench/async_stall.py [--layers 8] [--steady-steps 100]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moe_worker.config import WorkerConfig
from moe_worker.engine import Engine
from moe_worker.eplb.async_worker import AsyncRebalance
from moe_worker.eplb.communicator import create_communicator
from moe_worker.eplb.policy import Placement, compute_placement, moved_copies
from moe_worker.eplb.rebalance import apply_placement


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _timed(engine: Engine, device: torch.device) -> float:
    started = time.perf_counter()
    engine.step()
    torch.cuda.synchronize(device)
    return time.perf_counter() - started


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def _rank(rank: int, args: argparse.Namespace, port: int, queue: Any) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2"
    )
    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    config = WorkerConfig.model_validate(
        {
            "epSize": 2,
            "model": {
                "numLayers": args.layers,
                "hiddenSize": 2048,
                "numExperts": 128,
                "topK": 8,
                "intermediateSize": 768,
                "dtype": "bfloat16",
            },
            "eplb": {
                "numRedundantExperts": 16,
                "windowSize": args.steady_steps,
                "stepInterval": 1_000_000_000,
                "policy": "balanced",
                "useAsync": True,
            },
            "workload": {"kind": "zipf", "tokensPerStep": args.tokens, "zipfExponent": 1.2},
            "device": "cuda",
        }
    )
    engine = Engine(config, rank, 2, device)
    controller = engine.eplb
    assert controller is not None
    state = controller.models["main"].state
    layers = engine.model.moe_layers
    sync_comm = create_communicator("torch_nccl", device=device)
    for _ in range(20):
        _timed(engine, device)
    # Steady state on a balanced placement for this load.
    load = controller.window_logical_load()
    base = compute_placement(
        "balanced", load, num_physical=state.placement().num_physical, num_gpus=2
    )
    apply_placement(state, layers, base, rank, 2, sync_comm)
    steady = [_timed(engine, device) for _ in range(args.steady_steps)]

    # The same balance with the two ranks' slots exchanged: every copy on a rank moves.
    def swapped(placement: Placement) -> Placement:
        grid = placement.phy2log.reshape(placement.num_layers, 2, -1)[:, ::-1]
        return Placement.from_phy2log(grid.reshape(placement.num_layers, -1), placement.num_logical)

    target = swapped(base)
    rebalance = AsyncRebalance(
        state,
        layers,
        "balanced",
        load,
        rank,
        2,
        controller.communicator,
        controller.control_group,
        300.0,
        "manual",
        device,
        target=target,
    )
    during: list[float] = []
    started = time.perf_counter()
    result = None
    while result is None:
        step_started = time.perf_counter()
        engine.step()
        result = rebalance.poll()
        torch.cuda.synchronize(device)
        during.append(time.perf_counter() - step_started)
    async_seconds = time.perf_counter() - started
    after = [_timed(engine, device) for _ in range(args.steady_steps // 2)]

    # The synchronous path inside one step: back to the first placement.
    torch.cuda.synchronize(device)
    dist.barrier()
    step_started = time.perf_counter()
    engine.step()
    apply_placement(state, layers, base, rank, 2, sync_comm)
    torch.cuda.synchronize(device)
    sync_step = time.perf_counter() - step_started
    slots = base.num_physical
    if rank == 0:
        steady_p99 = _pct(steady, 99)
        queue.put(
            {
                "bench": "async_stall",
                "device": torch.cuda.get_device_name(device),
                "torch": torch.__version__,
                "layers": args.layers,
                "tokens_per_rank_step": args.tokens,
                "communicator_async": type(controller.communicator).__name__,
                "steady_steps": len(steady),
                "steady_p50_ms": statistics.median(steady) * 1e3,
                "steady_p99_ms": steady_p99 * 1e3,
                "async_result": result.result,
                "async_steps": len(during),
                "async_seconds": async_seconds,
                "async_p50_ms": statistics.median(during) * 1e3,
                "async_p99_ms": _pct(during, 99) * 1e3,
                "async_p99_over_steady_p99": _pct(during, 99) / steady_p99,
                "async_moved_copy_fraction": float(moved_copies(base, target, 2, 2).sum())
                / (slots * args.layers),
                "after_p50_ms": statistics.median(after) * 1e3,
                "after_p99_ms": _pct(after, 99) * 1e3,
                "sync_step_ms": sync_step * 1e3,
                "sync_stall_ms": (sync_step - statistics.median(steady)) * 1e3,
            }
        )
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--steady-steps", type=int, default=100)
    args = parser.parse_args()
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = _port()
    processes = [context.Process(target=_rank, args=(rank, args, port, queue)) for rank in range(2)]
    for process in processes:
        process.start()
    print(json.dumps(queue.get(timeout=900)), flush=True)
    for process in processes:
        process.join()


if __name__ == "__main__":
    main()

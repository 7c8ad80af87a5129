"""Run a function on N local ranks (spawned processes on 127.0.0.1) and collect the results."""

from __future__ import annotations

import os
import queue as queue_module
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp

from moe_operator.runtime.local import free_ports


def free_port(consecutive: int = 1) -> int:
    """A port such that it and the next ``consecutive - 1`` ports are free now (below the
    kernel's client-port range, as the local runtime picks them)."""
    return free_ports(consecutive)


def _portable(value: Any) -> Any:
    """Tensors become numpy arrays (a tensor in a queue dies with its sending process)."""
    import torch

    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return value.float().numpy() if value.is_floating_point() else value.numpy()
    if isinstance(value, (list, tuple)):
        return type(value)(_portable(v) for v in value)
    if isinstance(value, dict):
        return {k: _portable(v) for k, v in value.items()}
    return value


def _entry(
    rank: int, world: int, port: int, backend: str, fn: Callable[..., Any], args: tuple, queue: Any
) -> None:
    import torch
    import torch.distributed as dist

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        if world > 1:
            dist.init_process_group(
                backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
            )
        queue.put((rank, "ok", _portable(fn(rank, world, *args))))
    except BaseException:  # noqa: BLE001 - reported to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(
    fn: Callable[..., Any],
    world: int,
    *args: Any,
    backend: str = "gloo",
    timeout: float = 240.0,
    may_die: tuple[int, ...] = (),
) -> list[Any]:
    """``fn(rank, world, *args)`` on every rank; results by rank (tensors as numpy arrays).

    ``backend="nccl"`` gives rank r GPU r. A failure on any rank, or a rank that dies without
    reporting, is raised here; ranks in ``may_die`` may exit early (their result is None).
    """
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    processes = [
        context.Process(
            target=_entry, args=(rank, world, port, backend, fn, args, queue), daemon=True
        )
        for rank in range(world)
    ]
    for process in processes:
        process.start()
    results: dict[int, Any] = {rank: None for rank in may_die}
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world:
            try:
                rank, status, value = queue.get(timeout=1.0)
            except queue_module.Empty:
                dead = [
                    p.exitcode
                    for rank, p in enumerate(processes)
                    if p.exitcode not in (None, 0) and rank not in may_die
                ]
                if dead:
                    raise AssertionError(f"a rank died with exit code {dead[0]}") from None
                if time.monotonic() > deadline:
                    raise AssertionError(f"ranks did not finish within {timeout} s") from None
                continue
            if status != "ok":
                raise AssertionError(f"rank {rank} failed:\n{value}")
            results[rank] = value
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
    return [results[rank] for rank in range(world)]

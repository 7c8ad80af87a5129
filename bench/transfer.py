"""Weight-transfer benchmark: a rebalance moving DeepSeek-V3-sized experts between two GPUs.

Each expert is three bf16 tensors of 7168 x 2048 (88 MB). Rank 0 sends half of the experts to
rank 1 while rank 1 sends the other half to rank 0, through each communicator backend, in one
run. Reports GB/s per direction (bytes one rank sends / wall time of the exchange, median of
--repeats) and the ratio to the link's 450 GB/s per direction (H200 NVLink, NV18). One JSON line
per backend.

    python bench/transfer.py [--experts 32] [--backends torch_nccl,pynccl,torch_gloo]
    python bench/transfer.py --same-gpu --backends torch_gloo/tcp,torch_gloo,torch_gloo:4
    python bench/transfer.py --cpu --experts 8

``--same-gpu`` (one GPU is enough): both ranks on cuda:0 over a gloo group, for the backends
that stage through the host (torch_gloo); the wire is then the host's loopback, the same path
as two GPUs' staging. Rank 0 also prints the bounds of that path measured in-process on the
same bytes: pinned device-to-host and host-to-device copies, and a device-to-device copy.
``--cpu``: both ranks on host tensors (no GPU), for the gloo backends. ``torch_gloo`` moves
same-host bytes through /dev/shm (``shm_link``); ``torch_gloo/tcp`` is the same with that off
(every byte over gloo's TCP), for the comparison in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moe_worker.eplb.communicator import create_communicator

HIDDEN, FFN = 7168, 2048
LINK_GBPS = 450.0
ALL_BACKENDS = "torch_nccl,pynccl,pynccl:2,torch_gloo,torch_gloo:4"


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _communicator(name: str, rank: int, device: torch.device, store_port: int) -> Any:
    """``pynccl:4`` stripes over 4 NCCL communicators; ``torch_gloo:4`` uses 4 gloo lanes,
    ``torch_gloo/tcp`` no shared memory."""
    name, _, transport = name.partition("/")
    base, _, count = name.partition(":")
    ways = int(count or 1)
    if base == "pynccl":
        store = dist.TCPStore("127.0.0.1", store_port, 2, rank == 0)
        return create_communicator(
            base, rank=rank, world=2, store=store, device=device, stripes=ways
        )
    if base == "torch_gloo":
        groups = [dist.new_group(backend="gloo") for _ in range(ways)]
        shared = transport != "tcp"
        return create_communicator(base, groups=groups, device=device, shared_memory=shared)
    return create_communicator(base, device=device)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores)"


def _copy_bounds(device: torch.device, nbytes: int, repeats: int) -> dict[str, float]:
    """GB/s of pinned device-to-host, host-to-device and device-to-device copies of
    ``nbytes`` (medians of ``repeats``)."""
    source = torch.empty(nbytes, dtype=torch.uint8, device=device)
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    target = torch.empty_like(source)
    copies = {
        "pinned_d2h_gb_per_s": lambda: pinned.copy_(source, non_blocking=True),
        "pinned_h2d_gb_per_s": lambda: target.copy_(pinned, non_blocking=True),
        "d2d_gb_per_s": lambda: target.copy_(source, non_blocking=True),
    }
    figures = {}
    for name, copy in copies.items():
        samples = []
        for _ in range(repeats + 1):
            torch.cuda.synchronize(device)
            started = time.perf_counter()
            copy()
            torch.cuda.synchronize(device)
            samples.append(time.perf_counter() - started)
        figures[name] = nbytes / statistics.median(samples[1:]) / 1e9
    return figures


def _rank(
    rank: int, args: argparse.Namespace, port: int, store_ports: list[int], queue: Any
) -> None:
    index = 0 if args.same_gpu else rank
    if args.cpu:
        device = torch.device("cpu")
    else:
        torch.cuda.set_device(index)
        device = torch.device("cuda", index)
    host_only = args.same_gpu or args.cpu
    backend = "gloo" if host_only else "nccl"  # NCCL refuses two ranks on one GPU
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    per_rank = args.experts // 2
    shapes = [(FFN, HIDDEN), (FFN, HIDDEN), (HIDDEN, FFN)]
    send = [
        [torch.randn(s, device=device, dtype=torch.bfloat16) for s in shapes]
        for _ in range(per_rank)
    ]
    recv = [
        [torch.empty(s, device=device, dtype=torch.bfloat16) for s in shapes]
        for _ in range(per_rank)
    ]
    peer = 1 - rank
    sent_bytes = sum(t.numel() * t.element_size() for expert in send for t in expert)
    for index, name in enumerate(args.backends):
        communicator = _communicator(name, rank, device, store_ports[index])
        samples = []
        for repeat in range(args.repeats + 1):
            # Both ranks queue in one global order: rank 0's experts first, then rank 1's.
            for owner in (0, 1):
                for e in range(per_rank):
                    for tensor_index in range(3):
                        if owner == rank:
                            communicator.add_send(send[e][tensor_index], peer)
                        else:
                            communicator.add_recv(recv[e][tensor_index], peer)
            _synchronize(device)
            dist.barrier()
            started = time.perf_counter()
            communicator.execute()
            _synchronize(device)
            elapsed = time.perf_counter() - started
            if repeat > 0:  # the first run warms up connections and buffers
                samples.append(elapsed)
        # The bytes arrived intact: what rank r received sums to what its peer sent.
        sums = torch.tensor(
            [
                sum(float(t.float().sum()) for e in send for t in e),
                sum(float(t.float().sum()) for e in recv for t in e),
            ],
            device="cpu" if host_only else device,
        )
        gathered = [torch.zeros_like(sums) for _ in range(2)]
        dist.all_gather(gathered, sums)
        exact = bool(
            torch.isclose(gathered[0][1], gathered[1][0])
            and torch.isclose(gathered[1][1], gathered[0][0])
        )
        for expert in recv:
            for tensor in expert:
                tensor.zero_()
        if rank == 0:
            seconds = statistics.median(samples)
            gbps = sent_bytes / seconds / 1e9
            queue.put(
                {
                    "bench": "transfer",
                    "backend": name,
                    "experts_moved": args.experts,
                    "bytes_per_direction": sent_bytes,
                    "seconds_p50": seconds,
                    "gb_per_s_per_direction": gbps,
                    "ratio_to_link": gbps / LINK_GBPS,
                    "same_gpu": args.same_gpu,
                    "device": _device_name(device),
                    "torch": torch.__version__,
                    "nccl_env": {k: v for k, v in os.environ.items() if k.startswith("NCCL_")},
                    "received_ok": exact,
                }
            )
        dist.barrier()
        if hasattr(communicator, "close"):
            communicator.close()
    if rank == 0 and args.same_gpu:
        bounds = _copy_bounds(device, sent_bytes, args.repeats)
        queue.put({"bench": "transfer_bounds", "bytes": sent_bytes, **bounds})
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backends", default=None, help="Default: every backend that applies.")
    parser.add_argument("--same-gpu", action="store_true", help="Both ranks on cuda:0 (gloo).")
    parser.add_argument("--cpu", action="store_true", help="Both ranks on host tensors (gloo).")
    args = parser.parse_args()
    host_only = args.same_gpu or args.cpu
    default = "torch_gloo/tcp,torch_gloo,torch_gloo:4" if host_only else ALL_BACKENDS
    args.backends = (args.backends or default).split(",")
    if host_only and any(not b.startswith("torch_gloo") for b in args.backends):
        parser.error("--backends: with --same-gpu or --cpu only torch_gloo[:N][/tcp]")
    context = mp.get_context("spawn")
    queue = context.Queue()
    port, store_ports = _port(), [_port() for _ in args.backends]
    processes = [
        context.Process(target=_rank, args=(rank, args, port, store_ports, queue))
        for rank in range(2)
    ]
    for process in processes:
        process.start()
    for _ in range(len(args.backends) + (1 if args.same_gpu else 0)):
        print(json.dumps(queue.get(timeout=600)), flush=True)
    for process in processes:
        process.join()


if __name__ == "__main__":
    main()

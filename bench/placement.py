"""Placement benchmark: balance, moves and runtime of `balanced`/`incremental` against `deepseek`.

Prints one JSON line per case. Loads: lognormal(0, 0.8) expert popularity per layer (seeded),
2M tokens per layer drawn multinomially. Runtimes are medians over --repeats runs after one
warm-up run, measured in the same process, with numba's JIT build (compiled first by `warm_up`);
`balanced_aot_ms` times the ahead-of-time build (what a fresh process runs) on the same case.
`bound` is the best balancedness any placement can reach: with two slots per GPU the exact
pairing-aware bound (`pair_bound`, scipy), else `balancedness_bound`; `*_of_bound` the ratios.

    python bench/placement.py [--repeats 21] [--seed 0]
    python bench/placement.py --loads bench/results/loads.serve-qwen3.h200.json

``--loads FILE`` (a load file, [layers, experts]: e.g. what ``bench/serve.py --loads-out``
recorded from a served model) runs the static cases on those loads instead: ``served-<G>gpu``
for G in --gpus, one redundant slot per GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from moe_worker.eplb.policy import (
    Placement,
    balancedness_bound,
    compute_placement,
    jit,
    layer_balancedness,
    moved_copies,
    overall_balancedness,
    warm_up,
)
from moe_worker.eplb.policy.jit import aot_available, aot_module
from moe_worker.eplb.policy.pair_bound import pair_balancedness_bound

LAYERS, EXPERTS, TOKENS = 58, 256, 2_000_000


def synthetic_loads(
    seed: int, layers: int = LAYERS, experts: int = EXPERTS, sigma: float = 0.8
) -> np.ndarray:
    rng = np.random.default_rng(seed)
    popularity = rng.lognormal(0.0, sigma, size=(layers, experts))
    popularity /= popularity.sum(axis=1, keepdims=True)
    return np.stack([rng.multinomial(TOKENS, p) for p in popularity]).astype(np.float64)


@contextmanager
def patched(owner: Any, name: str, value: Any) -> Iterator[None]:
    """Set ``owner.name`` to ``value`` for the block."""
    saved = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, saved)


def timed(function: Callable[[], Placement], repeats: int) -> tuple[Placement, float]:
    result = function()  # warm-up
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = function()
        samples.append(time.perf_counter() - started)
    return result, statistics.median(samples)


def machine() -> dict[str, Any]:
    try:
        import numba

        threads = numba.get_num_threads()
    except ImportError:  # pragma: no cover
        threads = 1
    return {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "numba_threads": threads,
        "python": platform.python_version(),
        "numpy": np.__version__,
    }


def static_case(
    name: str, weight: np.ndarray, slots: int, gpus: int, nodes: int, groups: int, repeats: int
) -> dict[str, Any]:
    kwargs = dict(num_physical=slots, num_gpus=gpus, num_nodes=nodes, num_groups=groups)
    figures: dict[str, Any] = {"case": name, "layers": weight.shape[0], "experts": weight.shape[1]}
    figures["max_over_mean"] = float((weight.max(axis=1) / weight.mean(axis=1)).mean())
    figures.update(slots=slots, gpus=gpus, nodes=nodes, groups=groups)
    figures["bound"] = overall_balancedness(balancedness_bound(weight, slots, gpus))
    for policy in ("deepseek", "balanced"):
        placement, seconds = timed(
            lambda policy=policy: compute_placement(policy, weight, **kwargs), repeats
        )
        figures[f"{policy}_balancedness"] = overall_balancedness(
            layer_balancedness(weight, placement, gpus)
        )
        figures[f"{policy}_ms"] = seconds * 1e3
    figures["time_ratio_balanced_vs_deepseek"] = figures["balanced_ms"] / figures["deepseek_ms"]
    if slots == 2 * gpus:  # the pairing decides: the exact bound (an integer program per layer)
        started = time.perf_counter()
        figures["bound_without_pairing"] = figures["bound"]
        figures["bound"] = overall_balancedness(pair_balancedness_bound(weight, slots, gpus))
        figures["bound_s"] = time.perf_counter() - started
    for policy in ("deepseek", "balanced"):
        figures[f"{policy}_of_bound"] = figures[f"{policy}_balancedness"] / figures["bound"]
    if aot_available():  # the ahead-of-time build (sequential over layers): a fresh process's
        with patched(jit, "build_for", lambda kernel: getattr(aot_module(), kernel.name)):
            _, seconds = timed(lambda: compute_placement("balanced", weight, **kwargs), repeats)
        figures["balanced_aot_ms"] = seconds * 1e3
    return figures


def drift_case(weight: np.ndarray, seed: int, repeats: int) -> dict[str, Any]:
    slots, gpus = 288, 32
    kwargs = dict(num_physical=slots, num_gpus=gpus)
    stale = compute_placement("balanced", weight, **kwargs)
    drifted = weight * np.random.default_rng(seed + 1).lognormal(0.0, 0.05, size=weight.shape)
    stale_balance = layer_balancedness(drifted, stale, gpus)
    figures: dict[str, Any] = {"case": "d-drift", "slots": slots, "gpus": gpus, "drift_sigma": 0.05}
    figures["stale_balancedness"] = overall_balancedness(stale_balance)
    runs: dict[str, Callable[[], Placement]] = {
        "deepseek_full": lambda: compute_placement("deepseek", drifted, **kwargs),
        "balanced_full": lambda: compute_placement("balanced", drifted, **kwargs),
        "incremental": lambda: compute_placement(
            "incremental", drifted, previous=stale, max_moved_fraction=0.10, **kwargs
        ),
        "incremental_uncapped": lambda: compute_placement(
            "incremental", drifted, previous=stale, **kwargs
        ),
        # The same 5% per layer, and 5% / 7% of all copies spent where they buy the most.
        "incremental_cap5": lambda: compute_placement(
            "incremental", drifted, previous=stale, max_moved_fraction=0.05, **kwargs
        ),
        "incremental_budget5": lambda: compute_placement(
            "incremental", drifted, previous=stale, moved_fraction=0.05, **kwargs
        ),
        "incremental_budget7": lambda: compute_placement(
            "incremental", drifted, previous=stale, moved_fraction=0.07, **kwargs
        ),
        # Replica shares (eplb.replicaShares): moves chosen with shares refitted, to the
        # policy's own target, and with 1% / 2% / 5% of all copies.
        "incremental_shares": lambda: compute_placement(
            "incremental", drifted, previous=stale, shares=True, **kwargs
        ),
        "incremental_shares_budget1": lambda: compute_placement(
            "incremental", drifted, previous=stale, moved_fraction=0.01, shares=True, **kwargs
        ),
        "incremental_shares_budget2": lambda: compute_placement(
            "incremental", drifted, previous=stale, moved_fraction=0.02, shares=True, **kwargs
        ),
        "incremental_shares_budget5": lambda: compute_placement(
            "incremental", drifted, previous=stale, moved_fraction=0.05, shares=True, **kwargs
        ),
    }
    balance: dict[str, np.ndarray] = {}
    for name, run in runs.items():
        placement, seconds = timed(run, repeats)
        balance[name] = layer_balancedness(drifted, placement, gpus)
        moved = moved_copies(stale, placement, gpus, gpus) / slots
        figures[f"{name}_balancedness"] = overall_balancedness(balance[name])
        figures[f"{name}_moved_fraction_mean"] = float(moved.mean())
        figures[f"{name}_moved_fraction_max_layer"] = float(moved.max())
        figures[f"{name}_ms"] = seconds * 1e3
    full_gain = balance["balanced_full"] - stale_balance
    for name in runs:
        if not name.startswith("incremental"):
            continue
        gain = balance[name] - stale_balance
        figures[f"{name}_recovered_of_balanced_full"] = float(gain.mean() / full_gain.mean())
        figures[f"{name}_recovered_min_layer"] = float((gain / full_gain).min())
        figures[f"{name}_recovered_of_deepseek_full"] = float(
            gain.mean() / (balance["deepseek_full"] - stale_balance).mean()
        )
    return figures


def served_cases(args: argparse.Namespace) -> None:
    """The static cases on a recorded load file, one line per GPU count."""
    from moe_worker.eplb.loadfile import read_loads

    weight = read_loads(args.loads)
    host = machine()
    warm_up()
    for gpus in args.gpus:
        experts = weight.shape[1]
        slots = experts + gpus + (-(experts + gpus)) % gpus  # one redundant slot per GPU
        figures = static_case(f"served-{gpus}gpu", weight, slots, gpus, 1, 1, args.repeats)
        line = {"bench": "placement", "loads": args.loads, **figures, **host}
        print(json.dumps(line), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--cases", default="", help="Comma-separated case names to run (default: every case)."
    )
    parser.add_argument("--loads", default=None, help="A load file [L, E] to place instead.")
    parser.add_argument("--gpus", type=int, nargs="+", default=[8, 16, 32, 64])
    args = parser.parse_args()
    if args.loads is not None:
        served_cases(args)
        return
    weight = synthetic_loads(args.seed)
    large_ep = synthetic_loads(args.seed, layers=94, experts=128, sigma=1.17)
    host = machine()
    warm_up()  # numba's JIT build (parallel over layers): what a warmed-up worker runs
    runs: dict[str, Callable[[], dict[str, Any]]] = {
        "a-hierarchical": lambda: static_case(
            "a-hierarchical", weight, 288, 32, 4, 8, args.repeats
        ),
        "a-global": lambda: static_case("a-global", weight, 288, 32, 1, 1, args.repeats),
        "b-global-64gpu": lambda: static_case(
            "b-global-64gpu", weight, 320, 64, 1, 1, args.repeats
        ),
        "c-decode-144gpu": lambda: static_case(
            "c-decode-144gpu", weight, 288, 144, 1, 1, args.repeats
        ),
        # Qwen3-235B-like: 94 layers x 128 experts on 64 GPUs x 3 slots, with the 235B trace's
        # skew (busiest expert 10.8x a layer's mean; lognormal sigma 1.17 gives 10.8x here).
        "e-large-ep-64x3": lambda: static_case(
            "e-large-ep-64x3", large_ep, 192, 64, 1, 1, args.repeats
        ),
        "d-drift": lambda: drift_case(weight, args.seed, args.repeats),
    }
    chosen = [name for name in args.cases.split(",") if name] or list(runs)
    unknown = sorted(set(chosen) - set(runs))
    if unknown:
        parser.error(f"--cases: unknown {', '.join(unknown)}; available: {', '.join(runs)}")
    cases = [runs[name]() for name in chosen]
    for figures in cases:
        print(json.dumps({"bench": "placement", "seed": args.seed, **figures, **host}), flush=True)


if __name__ == "__main__":
    main()

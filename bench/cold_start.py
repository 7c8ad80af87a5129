"""Cold start of `moe-eplb plan`: a fresh process on a fresh numba cache dir, the DeepSeek-V3
shape (58 layers x 256 experts, 320 slots on 64 GPUs), with the AOT kernels against numba's JIT
compiling on first use (the baseline: what a fresh install did before them) and against a warm
JIT cache. Wall seconds of the whole command (start-up, imports, placement, report), medians
over --repeats fresh processes; also the `--help` floor. One JSON line each.

    python bench/cold_start.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from placement import synthetic_loads  # noqa: E402

CLI = [sys.executable, "-m", "moe_operator.cli"]


def wall(args: list[str], env: dict[str, str]) -> tuple[float, dict | None]:
    started = time.perf_counter()
    done = subprocess.run(CLI + args, env=env, capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - started
    last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    return seconds, json.loads(last) if last.startswith("{") else None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from moe_worker.eplb.policy.jit import aot_available

    with tempfile.TemporaryDirectory() as scratch:
        loads = Path(scratch) / "loads.npy"
        np.save(loads, synthetic_loads(0))
        plan = ["plan", "--loads", str(loads), "--gpus", "64", "--slots", "320", "--json"]
        base = dict(os.environ)
        cases = {
            "help": (["--help"], {}, True),
            "plan, AOT kernels, fresh numba cache": (plan, {}, True),
            "plan, JIT, fresh numba cache (baseline)": (plan, {"MOE_EPLB_AOT": "off"}, True),
            "plan, JIT, warm numba cache": (plan, {"MOE_EPLB_AOT": "off"}, False),
        }
        results = {}
        for name, (argv, extra, fresh) in cases.items():
            samples, placed = [], None
            warm_dir = Path(scratch) / "warm-cache"
            for repeat in range(args.repeats + (0 if fresh else 1)):
                cache = Path(scratch) / f"cache-{name[:4]}-{repeat}" if fresh else warm_dir
                env = {**base, **extra, "NUMBA_CACHE_DIR": str(cache)}
                seconds, report = wall(argv, env)
                if not fresh and repeat == 0:
                    continue  # fills the cache
                samples.append(seconds)
                placed = report or placed
            results[name] = statistics.median(samples)
            line = {
                "bench": "cold_start",
                "case": name,
                "wall_s": round(results[name], 3),
                "samples_s": [round(s, 3) for s in samples],
                "placement_runtime_s": None if placed is None else round(placed["runtime_s"], 4),
                "balancedness_after": None if placed is None else placed["balancedness_after"],
                "aot_installed": aot_available(),
                "machine": f"{platform.machine()} {os.cpu_count()} cores",
            }
            print(json.dumps(line), flush=True)
        baseline = results["plan, JIT, fresh numba cache (baseline)"]
        aot = results["plan, AOT kernels, fresh numba cache"]
        print(
            json.dumps(
                {
                    "bench": "cold_start",
                    "case": "summary",
                    "first_plan_s": round(aot, 3),
                    "target_s": 2.0,
                    "speedup_vs_jit_cold": round(baseline / aot, 1),
                    "vs_warm_jit": round(aot / results["plan, JIT, warm numba cache"], 2),
                }
            )
        )


if __name__ == "__main__":
    main()

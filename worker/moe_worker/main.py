"""Entry point of one EP rank: ``python -m moe_worker --config FILE`` or ``moe-eplb worker``.

Rank, world size and the rendezvous address come from the environment (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT), as the pod template sets them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import yaml
from pydantic import ValidationError

from moe_worker.config import RankEnv, WorkerConfig


def load_config(path: str | Path) -> WorkerConfig:
    text = Path(path).read_text()
    data = yaml.safe_load(text) if Path(path).suffix in (".yaml", ".yml") else json.loads(text)
    return WorkerConfig.model_validate(data or {})


def run(config: WorkerConfig, env: RankEnv, steps: int | None = None) -> dict:
    import torch.distributed as dist

    from moe_worker.engine import Engine, init_group, resolve_device

    device = resolve_device(config.device, env.rank)
    init_group(env, device)
    try:
        engine = Engine(config, env.rank, env.world_size, device)
        total = config.steps if steps is None else steps
        stats = engine.run(total)
        summary: dict[str, object] = {
            "rank": env.rank,
            "steps": engine.step_index,
            "tokens": engine.tokens_processed,
            "mean_step_s": sum(s.seconds for s in stats) / max(len(stats), 1),
        }
        if engine.eplb is not None:
            summary["rebalances"] = [r.result for r in engine.eplb.history]
            summary["balancedness"] = engine.eplb.current_balancedness()
        return summary
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moe_worker", description="Run one EP rank.")
    parser.add_argument("--config", required=True, help="WorkerConfig as YAML or JSON.")
    parser.add_argument("--steps", type=int, default=None, help="Override config steps.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        config = load_config(args.config)
        env = RankEnv.from_environ(dict(os.environ))
    except (OSError, ValueError, ValidationError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = run(config, env, args.steps)
    print(json.dumps(summary), flush=True)
    return 0

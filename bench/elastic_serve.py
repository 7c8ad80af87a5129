"""Elastic EP under serving load: resize a serving group through a list of sizes (default
2 -> 4 -> 8 -> 4 -> 2) while closed-loop clients send greedy completions through the router, and
report per resize how long it took to commit and how many answers came at each size; at the end
the failed requests and the answers that differ from transformers' own greedy ``generate``.

Ranks are local CPU processes over gloo (the harness of ``tests/worker/test_serving_in_flight.py``,
a tiny random Qwen2-MoE in float32); joiners start on standby before a resize up, and leavers
retire after a resize down, as pods of a StatefulSet do. One JSON line.

    python bench/elastic_serve.py [--sizes 2 4 8 4 2] [--clients 8] [--answers-per-size 12]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "worker")]

from test_serving_in_flight import (  # noqa: E402
    LoadLoop,
    admit,
    prompts_for,
    retire,
    serving_ranks,
    start_standby,
    stop_serving,
    wrong_answers,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 4, 8, 4, 2])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--answers-per-size", type=int, default=12)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if len(args.sizes) < 2 or args.sizes[0] < 1:
        parser.error("--sizes: at least two sizes, the first >= 1")

    from moe_worker.asgi import start_server
    from moe_worker.serving.router import router_app

    top = max(args.sizes)
    with tempfile.TemporaryDirectory() as tmp:
        ranks, reference, api_port = serving_ranks(Path(tmp), world=args.sizes[0], max_world=top)
        urls = [f"http://127.0.0.1:{api_port + rank}" for rank in range(top)]
        router, load = None, None
        phases = []
        try:
            for rank in range(args.sizes[0]):
                ranks.start(rank)
            ranks.wait(
                lambda: all(ranks.readyz(r)[0] == 200 for r in range(args.sizes[0])), 180, "ready"
            )
            router = start_server(router_app(urls), 0, "127.0.0.1", "router")
            prompts = prompts_for(seed=5, count=16)
            load = LoadLoop([f"http://127.0.0.1:{router.port}"] * args.clients, prompts).start()
            ranks.wait(lambda: load.finished() >= args.clients, 180, "the first answers")
            for before, after in zip(args.sizes, args.sizes[1:], strict=False):
                started = time.monotonic()
                standby_s = 0.0
                if after > before:
                    start_standby(ranks, list(range(before, after)))
                    standby_s = time.monotonic() - started
                    admit(ranks, list(range(before, after)), after)
                else:
                    retire(ranks, list(range(after, before)), after)
                committed_s = time.monotonic() - started
                served = load.finished()
                ranks.wait(
                    lambda s=served: load.finished() >= s + args.answers_per_size,
                    300,
                    f"answers at EP {after}",
                )
                phases.append(
                    {
                        "from": before,
                        "to": after,
                        "joiners_on_standby_s": round(standby_s, 2),
                        "resize_committed_s": round(committed_s - standby_s, 2),
                        "answers_in_phase": load.finished() - served,
                        "generation": ranks.state()["topologyGeneration"],
                    }
                )
                print(json.dumps(phases[-1]), file=sys.stderr, flush=True)
            outcomes = load.end()
        finally:
            stop_serving(load, router, ranks)
        failures = [o.error for o in outcomes if o.error is not None]
        wrong = wrong_answers(reference, prompts, outcomes)
    line = {
        "bench": "elastic_serve",
        "sizes": args.sizes,
        "clients": args.clients,
        "backend": "gloo (CPU)",
        "requests_answered": len(outcomes) - len(failures),
        "requests_failed": len(failures),
        "failures": failures[:5],
        "answers_differing_from_transformers": len(wrong),
        "phases": phases,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }
    text = json.dumps(line)
    print(text, flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    main()

"""``python -m moe_worker.reference``: greedy answers of the whole model in one process.

The reference that a deployment's answers are checked against: the same model (checkpoint or
synthetic, the worker config's ``model``) built in one process at EP size 1 with every expert
in place, no redundant copies and EPLB off, serving the prompts on the CPU with greedy sampling,
end of sequence ignored. Whatever the placement, EP size or remaps of the deployment, its
greedy answers must equal these (placement never changes a token's result).

    python -m moe_worker.reference --config worker.yaml --requests in.json --out out.json

``in.json``: ``{"prompts": [[token ids], ...], "maxTokens": N}``; ``out.json``: ``{"answers":
[[token ids], ...]}`` in the same order.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moe_worker.config import WorkerConfig


def single_process_config(config: WorkerConfig) -> WorkerConfig:
    """``config`` at EP size 1 with one slot per expert, EPLB off, serving on, on the CPU."""
    eplb = config.eplb.model_copy(
        update={"enabled": False, "num_redundant_experts": 0, "initial_placement_file": None}
    )
    serving = config.serving.model_copy(update={"enabled": True})
    return config.model_copy(
        update={
            "ep_size": 1,
            "eplb": eplb,
            "serving": serving,
            "device": "cpu",
            "check_outputs": False,
        }
    )


def greedy_answers(
    config: WorkerConfig, prompts: list[list[int]], max_new_tokens: int
) -> list[list[int]]:
    """The greedy tokens (``max_new_tokens`` each, end of sequence ignored) of every prompt."""
    from moe_worker.engine import create_engine
    from moe_worker.serving.backend import SamplingParams
    from moe_worker.serving.engine import ServingEngine

    engine = create_engine(single_process_config(config))
    assert isinstance(engine, ServingEngine)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0, ignore_eos=True)
    answers: list[list[int]] = [[] for _ in prompts]
    for index, prompt in enumerate(prompts):

        def sink(output: object, index: int = index) -> None:
            if isinstance(output, BaseException):
                raise output
            answers[index].append(output.token_id)  # type: ignore[attr-defined]

        engine.submit(f"reference-{index}", prompt, params, sink)
    while engine.has_work():
        engine.step()
    return answers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moe_worker.reference", description=__doc__)
    parser.add_argument("--config", required=True, help="WorkerConfig as YAML or JSON.")
    parser.add_argument("--requests", required=True, help='{"prompts": [...], "maxTokens": N}')
    parser.add_argument("--out", required=True, help="Where to write the answers (JSON).")
    args = parser.parse_args(argv)
    from moe_worker.main import load_config

    try:
        config = load_config(args.config)
        requests = json.loads(Path(args.requests).read_text())
        prompts = [[int(t) for t in prompt] for prompt in requests["prompts"]]
        max_tokens = int(requests["maxTokens"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    answers = greedy_answers(config, prompts, max_tokens)
    Path(args.out).write_text(json.dumps({"answers": answers}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

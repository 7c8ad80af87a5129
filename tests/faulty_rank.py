"""A worker rank whose step fails on its own at a given step: ``python tests/faulty_rank.py STEP
--config FILE``. The routing-simulator engine's step raises an out-of-memory error (a fault of
this rank, not of communication) once it reaches STEP; everything else is ``python -m
moe_worker``."""

from __future__ import annotations

import sys
from typing import Any

import torch

from moe_worker import main as worker_main
from moe_worker.engine import Engine


def failing_from(step: int) -> None:
    original = Engine.step

    def step_or_fail(self: Engine) -> Any:
        if self.step_index >= step:
            raise torch.OutOfMemoryError("CUDA out of memory (injected by the test)")
        return original(self)

    Engine.step = step_or_fail  # type: ignore[method-assign]


if __name__ == "__main__":
    failing_from(int(sys.argv[1]))
    sys.exit(worker_main.main(sys.argv[2:]))

"""End-to-end tests start worker processes: compile the placement kernels once, up front, into
numba's on-disk cache (beside the sources), so no worker waits for the compiler mid-test."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session", autouse=True)
def warm_placement_kernels() -> None:
    from moe_worker.eplb.policy import warm_up

    warm_up()

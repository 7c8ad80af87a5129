"""Drives an OpenAI-compatible endpoint with a ``TrafficConfig``'s requests (asyncio + httpx).

With a rate profile, requests are sent at their Poisson arrival times (open loop), at most
``concurrency`` in flight if set; without one, ``concurrency`` clients each send their next
request when the last one ends (closed loop). Sending stops at ``duration_s`` or
``max_requests``; requests in flight then finish. ``on_progress`` sees the records twice a
second (the live table).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from moe_worker.config import TrafficConfig

from .client import completion_body, send_completion
from .stats import RequestRecord, summarize
from .traffic import TrafficPlan

Progress = Callable[[list[RequestRecord], float], None]
PROGRESS_INTERVAL_S = 0.5


@dataclass
class RunResult:
    records: list[RequestRecord]
    elapsed_s: float

    def summary(self) -> dict[str, Any]:
        return summarize(self.records, self.elapsed_s)


async def served_model(client: httpx.AsyncClient, base_url: str) -> str:
    """The first model id the server lists at /v1/models."""
    response = await client.get(f"{base_url}/v1/models")
    response.raise_for_status()
    models = response.json().get("data") or []
    if not models:
        raise ValueError(f"{base_url}/v1/models lists no model")
    return str(models[0]["id"])


async def run_traffic(
    base_url: str,
    config: TrafficConfig,
    model: str | None = None,
    on_progress: Progress | None = None,
    max_retries: int = 5,
    request_timeout_s: float = 600.0,
    should_stop: Callable[[], bool] | None = None,
) -> RunResult:
    """Send ``config``'s requests to ``base_url`` (without /v1) and wait for all of them;
    ``should_stop`` (polled before each send) ends the sending early."""
    base_url = base_url.rstrip("/").removesuffix("/v1")
    plan = TrafficPlan(config)
    records: list[RequestRecord] = []
    in_flight = config.concurrency or 512
    limits = httpx.Limits(max_connections=in_flight + 8, max_keepalive_connections=in_flight + 8)
    timeout = httpx.Timeout(request_timeout_s, connect=10.0)
    async with httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False) as client:
        model = model or await served_model(client, base_url)
        start = time.perf_counter()

        def clock() -> float:
            return time.perf_counter() - start

        async def one(index: int, at_s: float) -> None:
            planned = plan.request(index, at_s)
            record = RequestRecord(index=index, topic=planned.topic, sent_at=clock())
            records.append(record)
            body = completion_body(model, planned, config.ignore_eos)
            await send_completion(client, base_url, body, record, clock, max_retries)

        ticker = asyncio.create_task(_tick(records, clock, on_progress))
        try:
            times = plan.send_times()
            stopped = should_stop or (lambda: False)
            if times is None:
                await _closed_loop(config, clock, one, stopped)
            else:
                await _open_loop(times, config.concurrency, clock, one, stopped)
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
        elapsed = clock()
    if on_progress is not None:
        on_progress(records, elapsed)
    return RunResult(records, elapsed)


async def _open_loop(
    times: list[float],
    concurrency: int | None,
    clock: Callable[[], float],
    one: Callable[[int, float], Any],
    stopped: Callable[[], bool],
) -> None:
    limit = asyncio.Semaphore(concurrency) if concurrency else None

    async def limited(index: int, at_s: float) -> None:
        if limit is None:
            await one(index, at_s)
            return
        async with limit:
            await one(index, at_s)

    tasks = []
    for index, at_s in enumerate(times):
        delay = at_s - clock()
        if delay > 0:
            await asyncio.sleep(delay)  # the arrival time itself, not a synchronisation
        if stopped():
            break
        tasks.append(asyncio.create_task(limited(index, at_s)))
    await asyncio.gather(*tasks)


async def _closed_loop(
    config: TrafficConfig,
    clock: Callable[[], float],
    one: Callable[[int, float], Any],
    stopped: Callable[[], bool],
) -> None:
    next_index = [0]

    def take() -> int | None:
        index = next_index[0]
        if clock() >= config.duration_s or stopped():
            return None
        if config.max_requests is not None and index >= config.max_requests:
            return None
        next_index[0] += 1
        return index

    async def client_loop() -> None:
        while (index := take()) is not None:
            await one(index, clock())

    assert config.concurrency is not None
    await asyncio.gather(*(client_loop() for _ in range(config.concurrency)))


async def _tick(
    records: list[RequestRecord], clock: Callable[[], float], on_progress: Progress | None
) -> None:
    if on_progress is None:
        return
    while True:
        await asyncio.sleep(PROGRESS_INTERVAL_S)
        on_progress(records, clock())

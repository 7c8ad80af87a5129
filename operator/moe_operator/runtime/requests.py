"""The local runtime's requests: the load generator's recent figures for the live table, and
check requests whose greedy answers are compared with a single-process reference.

Check requests are token-id prompts sent through the same endpoint as the traffic, greedy and
of fixed length, a few every ``CHECK_EVERY_S`` seconds, so they meet every EP size and placement
the run goes through. At the end one reference process (``python -m moe_worker.reference``)
answers the same prompts with the whole model in one process; any difference is a mismatch.
Torch-free: the reference runs in its own process.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from moe_worker.config import TrafficConfig

from ..loadgen.runner import RunResult, run_traffic
from ..loadgen.stats import RequestRecord, summarize

WINDOW_S = 10.0
CHECK_PROMPTS = 6
CHECK_MAX_TOKENS = 8
CHECK_EVERY_S = 4.0


def window_summary(
    records: list[RequestRecord], elapsed_s: float, window_s: float
) -> dict[str, Any]:
    """``summarize`` over the requests that ended in the last ``window_s`` seconds (rates per
    second of that window), with the whole run's failures beside it."""
    start = max(0.0, elapsed_s - window_s)
    recent = [
        r for r in records if r.finished_at is not None and start <= r.finished_at <= elapsed_s
    ]
    summary = summarize(recent, max(elapsed_s - start, 1e-9))
    total = summarize(records, elapsed_s)
    summary["requests_failed_total"] = total["requests_failed"]
    summary["requests_completed_total"] = total["requests_completed"]
    summary["requests_in_flight"] = total["requests_in_flight"]
    return summary


def check_prompts(count: int = CHECK_PROMPTS, seed: int = 0) -> list[list[int]]:
    """``count`` token-id prompts (byte ids 32..126, 4 to 24 long), the same for every run."""
    rng = random.Random(f"check:{seed}")
    return [[rng.randint(32, 126) for _ in range(rng.randint(4, 24))] for _ in range(count)]


@dataclass
class CheckAnswers:
    """Greedy answers the deployment gave to the check prompts, with when and at which EP size."""

    prompts: list[list[int]] = field(default_factory=check_prompts)
    answers: list[dict[str, Any]] = field(default_factory=list)  # prompt, tokens, t, epSize
    errors: list[str] = field(default_factory=list)
    sent: int = 0

    async def send(
        self, client: httpx.AsyncClient, base_url: str, model: str, t: float, ep_size: int
    ) -> None:
        """One check request (the next prompt in turn); a 503 is retried as clients do."""
        index = self.sent % len(self.prompts)
        self.sent += 1
        body = {
            "model": model,
            "prompt": self.prompts[index],
            "max_tokens": CHECK_MAX_TOKENS,
            "temperature": 0,
            "ignore_eos": True,
            "return_token_ids": True,
        }
        for _ in range(20):
            try:
                response = await client.post(f"{base_url}/v1/completions", json=body)
            except httpx.HTTPError as exc:
                self.errors.append(f"check {index}: {type(exc).__name__}: {exc}")
                return
            if response.status_code != 503:
                break
            await _retry_pause(response)
        if response.status_code != 200:
            self.errors.append(f"check {index}: {response.status_code} {response.text[:200]}")
            return
        tokens = [int(t) for t in response.json()["choices"][0]["token_ids"]]
        self.answers.append({"prompt": index, "tokens": tokens, "t": t, "epSize": ep_size})


async def _retry_pause(response: httpx.Response) -> None:
    try:
        wait = float(response.headers.get("retry-after", "0.5"))
    except ValueError:
        wait = 0.5
    await asyncio.sleep(min(max(wait, 0.1), 2.0))  # the server's Retry-After, bounded


def mismatches(answers: list[dict[str, Any]], references: list[list[int]]) -> list[dict[str, Any]]:
    """The answers that differ from the reference answer of their prompt."""
    return [a for a in answers if a["tokens"] != references[a["prompt"]]]


def reference_answers(
    worker_config: Path, prompts: list[list[int]], workdir: Path
) -> list[list[int]]:
    """The single-process reference's greedy answers (``python -m moe_worker.reference``);
    raises RuntimeError with its last line when it fails."""
    requests = workdir / "check-prompts.json"
    out = workdir / "check-reference.json"
    requests.write_text(json.dumps({"prompts": prompts, "maxTokens": CHECK_MAX_TOKENS}))
    command = [sys.executable, "-m", "moe_worker.reference", "--config", str(worker_config)]
    command += ["--requests", str(requests), "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"the reference failed ({done.returncode}): {last}")
    return [list(map(int, a)) for a in json.loads(out.read_text())["answers"]]


class RequestDriver:
    """What a user's clients and the Service ``<name>`` are to a cluster deployment: a router
    over the ranks' APIs on one endpoint, the load generator sending the spec's ``workload``
    to it once the group serves, and the check requests (``check``)."""

    def __init__(
        self,
        rank_urls: list[str],
        control_url: str | None,
        traffic: TrafficConfig,
        check: bool,
        port: int = 0,
    ) -> None:
        from moe_worker.asgi import start_server
        from moe_worker.serving.router import router_app

        self.router = start_server(router_app(rank_urls, control_url), port, "127.0.0.1", "router")
        self.endpoint = f"http://127.0.0.1:{self.router.port}"
        self.traffic = traffic
        self.checks = CheckAnswers() if check else None
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(300.0, connect=10.0), trust_env=False)
        self.records: list[RequestRecord] = []
        self.elapsed_s = 0.0
        self.model: str | None = None
        self.task: asyncio.Task[RunResult] | None = None
        self.stop_sending = False
        self.started_at: float | None = None
        self._next_check = 0.0
        self._pending: set[asyncio.Task[None]] = set()

    def _progress(self, records: list[RequestRecord], elapsed_s: float) -> None:
        self.records, self.elapsed_s = records, elapsed_s

    async def _serving_model(self) -> str | None:
        try:
            response = await self.client.get(f"{self.endpoint}/v1/models", timeout=5.0)
        except httpx.HTTPError:
            return None
        if response.status_code != 200:
            return None
        models = response.json().get("data") or []
        return str(models[0]["id"]) if models else None

    async def tick(self, t: float, ep_size: int) -> str | None:
        """Start the traffic once the endpoint lists the model, and send the check requests
        that are due; returns an event line when the traffic starts."""
        event = None
        if self.task is None and not self.stop_sending:
            self.model = await self._serving_model()
            if self.model is None:
                return None
            self.started_at = t
            self.task = asyncio.create_task(
                run_traffic(
                    self.endpoint,
                    self.traffic,
                    self.model,
                    on_progress=self._progress,
                    should_stop=lambda: self.stop_sending,
                )
            )
            event = f"traffic started on {self.endpoint} (model {self.model})"
        if self.checks is not None and self.model is not None and t >= self._next_check:
            self._next_check = t + CHECK_EVERY_S
            check = asyncio.create_task(
                self.checks.send(self.client, self.endpoint, self.model, t, ep_size)
            )
            self._pending.add(check)
            check.add_done_callback(self._pending.discard)
        return event

    def recent(self) -> dict[str, Any] | None:
        """The last ``WINDOW_S`` seconds of the traffic (None before it starts)."""
        if self.task is None:
            return None
        return window_summary(self.records, self.elapsed_s, WINDOW_S)

    async def finish(self, timeout_s: float = 120.0) -> dict[str, Any] | None:
        """Stop sending, let the requests in flight end (at most ``timeout_s``), stop the
        router; returns the whole run's summary (None if the traffic never started)."""
        self.stop_sending = True
        summary = None
        try:
            if self.task is not None:
                result = await asyncio.wait_for(self.task, timeout_s)
                summary = result.summary()
            if self._pending:
                await asyncio.wait(self._pending, timeout=timeout_s)
        except TimeoutError:
            summary = summarize(self.records, self.elapsed_s)
            summary["unfinished_after_s"] = timeout_s
        finally:
            await self.client.aclose()
            self.router.shutdown()
        return summary

"""The load generator against a scripted OpenAI-compatible server (Starlette on uvicorn): 503s
retried after Retry-After, streamed chunks timed, usage read, errors counted, arrivals paced."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from moe_operator.loadgen.client import retry_after_seconds
from moe_operator.loadgen.runner import run_traffic
from moe_operator.loadgen.traffic import TrafficPlan
from moe_worker.asgi import start_server
from moe_worker.config import TrafficConfig


class Script:
    """The fake server's behaviour and what it saw."""

    def __init__(self, busy_first: int) -> None:
        self.busy_left = busy_first
        self.bodies: list[dict[str, Any]] = []

    def app(self) -> Starlette:
        async def models(request: Request) -> Response:
            return JSONResponse({"object": "list", "data": [{"id": "fake-moe"}]})

        async def completions(request: Request) -> Response:
            body = await request.json()
            self.bodies.append(body)
            if self.busy_left > 0:
                self.busy_left -= 1
                return JSONResponse({"error": {"message": "busy"}}, 503, {"Retry-After": "0"})
            if body["max_tokens"] > 100:
                message = {"error": {"message": "max_tokens: too many", "type": "BadRequest"}}
                return JSONResponse(message, 400)

            async def stream() -> AsyncIterator[str]:
                for n in range(body["max_tokens"]):
                    last = n == body["max_tokens"] - 1
                    choice = {"index": 0, "text": "x", "finish_reason": "length" if last else None}
                    yield f"data: {json.dumps({'choices': [choice]})}\n\n"
                    await asyncio.sleep(0)
                usage = {"prompt_tokens": 3, "completion_tokens": body["max_tokens"]}
                yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(stream(), media_type="text/event-stream")

        return Starlette(
            routes=[
                Route("/v1/models", models),
                Route("/v1/completions", completions, methods=["POST"]),
            ]
        )


@pytest.fixture
def fake_server() -> Iterator[tuple[str, Script]]:
    script = Script(busy_first=3)
    server = start_server(script.app(), 0, host="127.0.0.1", name="fake-openai")
    try:
        yield f"http://127.0.0.1:{server.port}/v1", script
    finally:
        server.shutdown()


def test_closed_loop_retries_busy_answers_and_reads_the_stream(
    fake_server: tuple[str, Script],
) -> None:
    url, script = fake_server
    config = TrafficConfig.model_validate(
        {"concurrency": 3, "maxRequests": 10, "durationS": 60, "outputTokens": {"mean": 5}}
    )
    result = asyncio.run(run_traffic(url, config))
    summary = result.summary()
    assert summary["requests_completed"] == 10 and summary["requests_failed"] == 0
    assert summary["retries_503"] == 3 and len(script.bodies) == 13
    assert summary["output_tokens"] == 50 and summary["prompt_tokens"] == 30
    assert summary["finish_reasons"] == {"length": 10}
    assert all(r.first_token_at is not None and len(r.chunk_gaps) == 4 for r in result.records)
    body = script.bodies[-1]
    assert body["model"] == "fake-moe" and body["stream"] is True and body["ignore_eos"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert sorted(r.index for r in result.records) == list(range(10))


def test_refused_requests_are_counted_with_the_servers_message(
    fake_server: tuple[str, Script],
) -> None:
    url, _ = fake_server
    config = TrafficConfig.model_validate(
        {"concurrency": 2, "maxRequests": 4, "outputTokens": {"mean": 500}}
    )
    result = asyncio.run(run_traffic(url, config, model="fake-moe"))
    summary = result.summary()
    assert summary["requests_failed"] == 4 and summary["failures"] == {"HTTP 400": 4}
    assert "max_tokens: too many" in result.records[0].detail


def test_open_loop_sends_at_the_arrival_times(fake_server: tuple[str, Script]) -> None:
    url, _ = fake_server
    config = TrafficConfig.model_validate(
        {"rateProfile": [{"atS": 0, "requestsPerS": 40}], "durationS": 1.0, "seed": 3}
    )
    planned = TrafficPlan(config).send_times()
    assert planned is not None and len(planned) > 10
    result = asyncio.run(run_traffic(url, config))
    assert result.summary()["requests_completed"] == len(planned)
    by_index = {r.index: r for r in result.records}
    assert all(by_index[i].sent_at >= at - 1e-3 for i, at in enumerate(planned))


def test_retry_after_reads_seconds_and_dates() -> None:
    assert retry_after_seconds(None) == 1.0
    assert retry_after_seconds("2") == 2.0
    assert retry_after_seconds("junk") == 1.0
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412485.0) == 5.0
    assert retry_after_seconds("3600") == 30.0

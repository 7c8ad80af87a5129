"""The router (`moe-eplb serve`'s endpoint, a pod's endpoint over its ranks) over real uvicorn
servers: streams pass through unchanged and are not capped in number, busy (503) and unreachable
ranks are skipped, the control API is forwarded with the caller's Authorization header."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import aiohttp
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from moe_worker.asgi import RunningServer, start_server
from moe_worker.serving.router import router_app

STREAMS = 300  # more than any default connection pool (httpx's and aiohttp's are 100)


@dataclass
class FakeRank:
    """A rank's API: streams ``CHUNKS`` server-sent events per completion, each naming this rank
    and echoing the prompt; a stream's last event waits until ``hold_until`` streams are open at
    once (then every open stream ends), so a router that queues streams never lets it end."""

    name: str
    busy: bool = False
    breaks_off: bool = False  # the rank dies after the first event of each stream
    hold_until: int = 0
    open_now: int = 0
    most_open: int = 0
    served: int = 0
    headers_seen: list[dict[str, str]] = field(default_factory=list)
    all_open: asyncio.Event | None = None

    CHUNKS = 3

    def app(self) -> Starlette:
        async def completions(request: Request) -> Response:
            body = json.loads(await request.body())
            if self.busy:
                return JSONResponse({"error": {"message": "queue full"}}, status_code=503)
            self.served += 1
            return StreamingResponse(self._events(body["prompt"]), media_type="text/event-stream")

        async def state(request: Request) -> Response:
            self.headers_seen.append(dict(request.headers))
            return JSONResponse({"rank": self.name})

        async def models(request: Request) -> Response:
            return JSONResponse({"object": "list", "data": [{"id": self.name}]})

        async def health(request: Request) -> Response:
            return JSONResponse({"status": "ready"})

        return Starlette(
            routes=[
                Route("/v1/completions", completions, methods=["POST"]),
                Route("/v1/state", state, methods=["GET"]),
                Route("/v1/models", models, methods=["GET"]),
                Route("/health", health, methods=["GET"]),
            ]
        )

    async def _events(self, prompt: str) -> AsyncIterator[bytes]:
        if self.all_open is None:
            self.all_open = asyncio.Event()
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
        if self.open_now >= self.hold_until:
            self.all_open.set()
        try:
            for index in range(self.CHUNKS):
                if index == self.CHUNKS - 1 and self.hold_until:
                    await asyncio.wait_for(self.all_open.wait(), timeout=60)
                event = {"rank": self.name, "prompt": prompt, "index": index}
                yield f"data: {json.dumps(event)}\n\n".encode()
                if self.breaks_off:
                    raise ConnectionError("rank gone")  # uvicorn drops the connection
            yield b"data: [DONE]\n\n"
        finally:
            self.open_now -= 1


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def servers() -> Iterator[list[RunningServer]]:
    started: list[RunningServer] = []
    yield started
    for server in reversed(started):
        server.shutdown()


def serve(started: list[RunningServer], app: Starlette) -> str:
    server = start_server(app, 0, "127.0.0.1", "test")
    started.append(server)
    return f"http://127.0.0.1:{server.port}"


async def stream_events(
    session: aiohttp.ClientSession, url: str, prompt: str
) -> tuple[int, list[dict[str, object]]]:
    async with session.post(url + "/v1/completions", json={"prompt": prompt}) as response:
        text = (await response.read()).decode()
    if response.status != 200:
        return response.status, [json.loads(text)]
    events = [line.removeprefix("data: ") for line in text.split("\n\n") if line]
    assert events[-1] == "[DONE]", text
    return response.status, [json.loads(event) for event in events[:-1]]


def run_clients(url: str, prompts: list[str]) -> list[tuple[int, list[dict[str, object]]]]:
    async def main() -> list[tuple[int, list[dict[str, object]]]]:
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            return await asyncio.gather(*(stream_events(session, url, p) for p in prompts))

    return asyncio.run(main())


def test_hundreds_of_streams_are_open_through_the_router_at_once(servers: list) -> None:
    rank = FakeRank("r0", hold_until=STREAMS)
    router = serve(servers, router_app([serve(servers, rank.app())]))
    prompts = [f"prompt {i}" for i in range(STREAMS)]
    results = run_clients(router, prompts)
    assert rank.most_open == STREAMS
    for prompt, (status, events) in zip(prompts, results, strict=True):
        assert status == 200
        assert events == [{"rank": "r0", "prompt": prompt, "index": i} for i in range(3)]


def test_busy_and_unreachable_ranks_are_skipped(servers: list) -> None:
    busy, ok = FakeRank("busy", busy=True), FakeRank("ok")
    dead = f"http://127.0.0.1:{closed_port()}"
    urls = [dead, serve(servers, busy.app()), serve(servers, ok.app())]
    app = router_app(urls)
    router = serve(servers, app)
    results = run_clients(router, [f"p{i}" for i in range(12)])
    assert [status for status, _ in results] == [200] * 12
    assert app.state.pool.in_flight == {url: 0 for url in urls[1:]} | {dead: 0}
    assert {events[0]["rank"] for _, events in results} == {"ok"}
    assert ok.served == 12 and busy.served == 0


def test_spreads_requests_over_idle_ranks(servers: list) -> None:
    ranks = [FakeRank("a"), FakeRank("b")]
    router = serve(servers, router_app([serve(servers, r.app()) for r in ranks]))
    run_clients(router, [f"p{i}" for i in range(10)])
    assert [r.served for r in ranks] == [5, 5]


def test_no_serving_rank_answers_503_naming_why(servers: list) -> None:
    busy = FakeRank("busy", busy=True)
    router = serve(servers, router_app([serve(servers, busy.app())]))
    [(status, [body])] = run_clients(router, ["p"])
    assert status == 503 and body == {"error": {"message": "queue full"}}

    dead = serve(servers, router_app([f"http://127.0.0.1:{closed_port()}"]))
    [(status, [body])] = run_clients(dead, ["p"])
    assert status == 503
    error = body["error"]
    assert isinstance(error, dict) and "unreachable" in error["message"]


def test_control_models_and_health_are_forwarded(servers: list) -> None:
    leader = FakeRank("leader")
    leader_url = serve(servers, leader.app())
    dead = f"http://127.0.0.1:{closed_port()}"
    router = serve(servers, router_app([leader_url], control_url=leader_url))
    half_dead = serve(servers, router_app([leader_url, dead]))

    async def main() -> list[tuple[int, object]]:
        async with aiohttp.ClientSession() as session:
            answers = []
            for url, path in ((router, "/v1/state"), (router, "/v1/models"), (router, "/health")):
                headers = {"Authorization": "Bearer secret"}
                async with session.get(url + path, headers=headers) as response:
                    answers.append((response.status, await response.json()))
            async with session.get(half_dead + "/health") as response:
                answers.append((response.status, await response.json()))
            async with session.get(half_dead + "/v1/state") as response:
                answers.append((response.status, await response.json()))
            return answers

    state, models, health, half_health, no_control = asyncio.run(main())
    assert state == (200, {"rank": "leader"})
    assert leader.headers_seen[-1]["authorization"] == "Bearer secret"
    assert models == (200, {"object": "list", "data": [{"id": "leader"}]})
    assert health == (200, {"status": "ready", "ranks": {leader_url: 200}})
    assert half_health == (503, {"status": "not ready", "ranks": {leader_url: 200, dead: 0}})
    assert no_control[0] == 404


def test_a_stream_the_rank_breaks_off_releases_its_rank(servers: list) -> None:
    """The client sees the stream end early; the router's count for that rank goes back to 0
    (a leaked count would steer every later request away from it)."""
    rank = FakeRank("r", breaks_off=True)
    url = serve(servers, rank.app())
    app = router_app([url])
    router = serve(servers, app)

    async def main() -> list[str]:
        outcomes = []
        async with aiohttp.ClientSession() as session:
            for index in range(5):
                try:
                    async with session.post(
                        router + "/v1/completions", json={"prompt": f"p{index}"}
                    ) as response:
                        text = (await response.read()).decode()
                        outcomes.append("complete" if "[DONE]" in text else "cut short")
                except aiohttp.ClientPayloadError:
                    outcomes.append("cut short")
        return outcomes

    assert asyncio.run(main()) == ["cut short"] * 5
    deadline = time.monotonic() + 10
    while app.state.pool.in_flight != {url: 0} and time.monotonic() < deadline:
        time.sleep(0.05)
    assert app.state.pool.in_flight == {url: 0}

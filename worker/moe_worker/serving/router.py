"""One OpenAI-compatible endpoint over several ranks' APIs (what a Service does in a cluster).

Each inference request goes to the rank with the fewest requests in flight through this router
(ties in turn); a rank answering 503 (its queue is full, or it is leaving) is skipped for the
next one. Streams are passed through as they arrive. The leader's control API is reachable here
as well (``POST /v1/eplb/rebalance``, ``GET /v1/state``): the router forwards the caller's
``Authorization`` header, so the leader's bearer token guards it as it guards the control port.
Torch-free: the CLI runs it.

The upstream client is aiohttp with no cap on connections: every client stream holds one
upstream connection for its whole life, so a capped pool (httpx's default is 100) would queue
the 101st stream behind the first ones, and httpx's pool re-scans every connection on each
stream's end (quadratic in the streams open). The client session lives on the server's event
loop: opened on the first request, closed at shutdown (uvicorn's lifespan).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

import aiohttp
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

HOP_HEADERS = {
    "host",
    "content-length",
    "connection",
    "transfer-encoding",
    "keep-alive",
    "te",
    "trailer",
    "upgrade",
    "proxy-connection",
}
MAX_BODY_BYTES = 1 << 20  # a rank rejects more; the router does not read past it
UPSTREAM_ERRORS = (aiohttp.ClientError, OSError, TimeoutError)


@dataclass
class RankPool:
    """The ranks' API base URLs and how many requests each has in flight through the router."""

    urls: list[str]
    in_flight: dict[str, int] = field(default_factory=dict)
    _turn: itertools.count[int] = field(default_factory=itertools.count)

    def order(self) -> list[str]:
        """The ranks to try, least busy first (ties broken in turn)."""
        turn = next(self._turn)
        count = len(self.urls)
        rotated = [self.urls[(turn + i) % count] for i in range(count)]
        return sorted(rotated, key=lambda url: self.in_flight.get(url, 0))

    def lease(self, url: str) -> Lease:
        self.in_flight[url] = self.in_flight.get(url, 0) + 1
        return Lease(self, url)


@dataclass
class Lease:
    """One request's hold on a rank: a count in ``in_flight`` and the upstream response,
    given back once, whichever way the request ends (done, client gone, rank gone)."""

    pool: RankPool
    url: str
    upstream: aiohttp.ClientResponse | None = None
    released: bool = False

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        self.pool.in_flight[self.url] -= 1
        if self.upstream is not None:
            self.upstream.release()


def _error(status: int, message: str, kind: str) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
    return JSONResponse(body, status_code=status)


def _passed(headers: Mapping[str, str]) -> dict[str, str]:
    """``headers`` without the hop-by-hop ones (the router frames its own messages)."""
    return {k: v for k, v in headers.items() if k.lower() not in HOP_HEADERS}


def _headers(request: Request) -> dict[str, str]:
    return _passed(request.headers)


class Upstream:
    """The router's one aiohttp session to the ranks, made on first use on the serving loop."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10.0),
                auto_decompress=False,  # bodies pass through as the rank encoded them
                skip_auto_headers=("Accept-Encoding",),  # only what the client asked for
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def router_app(rank_urls: list[str], control_url: str | None = None) -> Starlette:
    """The router over ``rank_urls`` (e.g. ``http://127.0.0.1:8001``) and the leader's control
    API at ``control_url``."""
    pool = RankPool(list(rank_urls))
    upstream_client = Upstream()

    async def _read(request: Request) -> bytes | None:
        body = b""
        async for part in request.stream():
            body += part
            if len(body) > MAX_BODY_BYTES:
                return None
        return body

    async def inference(request: Request) -> Response:
        body = await _read(request)
        if body is None:
            return _error(400, "body: the request body exceeds 1 MiB", "invalid_request_error")
        last: Response | None = None
        for url in pool.order():
            lease = pool.lease(url)
            try:
                lease.upstream = upstream = await upstream_client.session().request(
                    request.method, url + request.url.path, data=body, headers=_headers(request)
                )
                if upstream.status == 503:  # busy or leaving: the next rank
                    last = Response(
                        await upstream.read(), status_code=503, headers=_passed(upstream.headers)
                    )
                    lease.release()
                    continue
            except UPSTREAM_ERRORS as exc:
                lease.release()
                last = _error(
                    503, f"rank at {url} unreachable: {exc!r}", "service_unavailable_error"
                )
                continue
            except BaseException:
                lease.release()
                raise

            async def relay(lease: Lease = lease) -> AsyncIterator[bytes]:
                try:
                    assert lease.upstream is not None
                    async for chunk in lease.upstream.content.iter_any():
                        yield chunk
                finally:  # also when the rank breaks off or the client goes
                    lease.release()

            async def close(lease: Lease = lease) -> None:  # when relay never started
                lease.release()

            return StreamingResponse(
                relay(),
                status_code=upstream.status,
                headers=_passed(upstream.headers),
                background=BackgroundTask(close),
            )
        return last or _error(503, "no rank is serving", "service_unavailable_error")

    async def models(request: Request) -> Response:
        for url in pool.order():
            try:
                async with upstream_client.session().get(url + "/v1/models") as upstream:
                    return Response(
                        await upstream.read(), upstream.status, media_type="application/json"
                    )
            except UPSTREAM_ERRORS:
                continue
        return _error(503, "no rank is serving", "service_unavailable_error")

    async def health(request: Request) -> Response:
        states = {}
        for url in pool.urls:
            try:
                async with upstream_client.session().get(
                    url + "/health", timeout=aiohttp.ClientTimeout(total=5.0)
                ) as upstream:
                    states[url] = upstream.status
            except UPSTREAM_ERRORS:
                states[url] = 0
        healthy = all(code == 200 for code in states.values())
        return JSONResponse(
            {"status": "ready" if healthy else "not ready", "ranks": states},
            status_code=200 if healthy else 503,
        )

    async def control(request: Request) -> Response:
        if control_url is None:
            return _error(404, "no control API behind this router", "not_found_error")
        body = await _read(request)
        if body is None:
            return _error(400, "body: the request body exceeds 1 MiB", "invalid_request_error")
        try:
            async with upstream_client.session().request(
                request.method, control_url + request.url.path, data=body, headers=_headers(request)
            ) as upstream:
                return Response(
                    await upstream.read(),
                    upstream.status,
                    media_type=upstream.headers.get("content-type", "application/json"),
                )
        except UPSTREAM_ERRORS as exc:
            return _error(503, f"leader unreachable: {exc!r}", "service_unavailable_error")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await upstream_client.close()

    app = Starlette(
        routes=[
            Route("/v1/completions", inference, methods=["POST"]),
            Route("/v1/chat/completions", inference, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/v1/eplb/rebalance", control, methods=["POST"]),
            Route("/v1/state", control, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    app.state.pool = pool  # requests in flight per rank, for tests and debugging
    return app

"""HTTP endpoints of a rank: /metrics, /healthz, /readyz; on the leader, the control API.

The control API (JSON, bearer token): GET /v1/state, POST /v1/eplb/rebalance (202, or 409
while one is pending or running), POST /v1/ep/resize ``{"epSize": N}`` (202; 409 while a
resize is pending or running, or while the joining ranks have not registered; 422 for a size
that cannot hold every expert). Requests only set fields in ``WorkerStatus``; the step loop
relays them to every rank so all act at the same step. /readyz is 200 while the rank admits
requests (also during a resize or a rebalance: they queue); a rank waiting to join a running group
answers 503 ``standby`` (it is alive and registered, and the leader's state lists it in
``standbyRanks``), and a rank leaving in a scale-down answers 503 ``leaving`` while it finishes
its requests, so a Service sends new requests elsewhere.

Both are FastAPI apps (``metrics_app``, ``control_app``) served by uvicorn on a thread of the
rank (``serve_metrics``, ``serve_control``). Every answer is JSON ``{"error": ...}`` on failure,
whatever FastAPI would say by itself: 422 bodies name each bad field (``"field: msg; ..."``),
and a path or method that no route serves is 404 ``no route METHOD PATH``.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, TypeVar

from fastapi import Depends, FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .asgi import RunningServer, start_server
from .eplb.policy import kernel_build

log = logging.getLogger("moe_worker.server")
TOKEN_ENV = "MOE_CONTROL_TOKEN"
BodyT = TypeVar("BodyT", bound=BaseModel)


@dataclass
class WorkerStatus:
    """State shared between the step loop and the HTTP threads (guarded by ``lock``)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    ready: bool = False
    standby: bool = False
    leaving: bool = False  # a scale-down leaves this rank out: it admits no new requests
    resizing: bool = False
    resize_target: int = 0  # requested EP size, 0: none
    resize_reason: str = ""
    resize: dict[str, Any] = field(default_factory=dict)  # progress of the latest resize
    # target -> (HTTP status, error) when a resize to it cannot be accepted now, else None
    resize_check: Callable[[int], tuple[int, str] | None] | None = None
    # ranks registered to join and waiting on standby (the leader's view; None elsewhere)
    standby_ranks: Callable[[], list[int]] | None = None
    rebalance_requested: bool = False
    rebalancing: bool = False
    stop_requested: bool = False
    state: dict[str, Any] = field(default_factory=dict)
    # Wakes a serving group waiting idle, so a control request acts at once (set by the loop).
    wake: Callable[[], None] | None = None

    def _wake(self) -> None:
        if self.wake is not None:
            self.wake()

    def request_rebalance(self) -> bool:
        """Ask for a rebalance; False if one is already pending or running."""
        with self.lock:
            if self.rebalance_requested or self.rebalancing:
                return False
            self.rebalance_requested = True
        self._wake()
        return True

    def request_resize(self, target: int, reason: str) -> tuple[int, str | None]:
        """Ask for a resize to ``target`` ranks: (202, None) or (status, why not)."""
        check = self.resize_check
        problem = check(target) if check is not None else (409, "this rank cannot resize")
        with self.lock:
            if self.resize_target or self.resizing:
                return 409, "a resize is already pending or running"
            if problem is not None:
                return problem
            self.resize_target = target
            self.resize_reason = reason
            self.resize = {"target": target, "phase": "requested", "reason": reason}
        self._wake()
        return 202, None

    def admitting(self) -> bool:
        """Whether this rank takes new requests (its readiness)."""
        with self.lock:
            return self.ready and not self.standby and not self.leaving

    def snapshot(self) -> dict[str, Any]:
        standby_ranks = self.standby_ranks() if self.standby_ranks is not None else []
        with self.lock:
            return {
                **self.state,
                "standbyRanks": standby_ranks,
                "ready": self.ready,
                "standby": self.standby,
                "leaving": self.leaving,
                "resizing": self.resizing,
                "resize": dict(self.resize),
                "rebalancePending": self.rebalance_requested,
                "rebalancing": self.rebalancing,
                "placementKernels": kernel_build(),  # live: it changes while a rank idles
            }


class ResizeRequest(BaseModel):
    """Body of POST /v1/ep/resize."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    ep_size: int = Field(alias="epSize", gt=0, description="EP ranks after the resize.")
    reason: str | None = Field(None, max_length=256, description="Free text for the log.")


class RebalanceRequest(BaseModel):
    """Body of POST /v1/eplb/rebalance (may be empty)."""

    model_config = ConfigDict(extra="forbid")
    reason: str | None = Field(None, max_length=256, description="Free text for the log.")


def read_token(token_file: str | None) -> str | None:
    """The control token: from ``token_file`` if given, else $MOE_CONTROL_TOKEN, else None."""
    if token_file:
        return Path(token_file).read_text().strip() or None
    return os.environ.get(TOKEN_ENV) or None


def _json(code: int, payload: Any) -> Response:
    """``payload`` as JSON (``json.dumps`` layout, a trailing newline), as every route answers."""
    return Response((json.dumps(payload) + "\n").encode(), code, media_type="application/json")


class _Refused(Exception):
    """Raised by a dependency to answer ``code`` with ``{"error": error}`` instead of the route."""

    def __init__(self, code: int, error: str) -> None:
        super().__init__(error)
        self.code = code
        self.error = error


def _target(request: Request) -> str:
    """The request target as the client sent it: the raw path and the query, if any."""
    raw = request.scope.get("raw_path")
    path = raw.decode("latin-1") if raw else request.scope["path"]
    query = request.scope.get("query_string", b"")
    return f"{path}?{query.decode('latin-1')}" if query else path


async def _refused(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, _Refused)
    return _json(exc.code, {"error": exc.error})


async def _http_error(request: Request, exc: Exception) -> Response:
    """A path or a method no route serves (404, 405 alike) is 404 ``no route METHOD PATH``."""
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code in (404, 405):
        return _json(404, {"error": f"no route {request.method} {_target(request)}"})
    return _json(exc.status_code, {"error": exc.detail})


def _app(title: str) -> FastAPI:
    """An app with only the routes added to it: no docs, no OpenAPI, no slash redirects."""
    app = FastAPI(
        title=title, docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False
    )
    app.add_exception_handler(_Refused, _refused)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    return app


def metrics_app(exposition: Callable[[], bytes] | None, status: WorkerStatus) -> FastAPI:
    """/metrics (when ``exposition`` is given; 404 otherwise), /healthz and /readyz."""
    app = _app("moe-worker metrics")

    # Plain ``def`` routes run in the threadpool: a long exposition or a wait for the status
    # lock (held by the step loop) never stalls the event loop. /healthz touches nothing.
    @app.get("/metrics")
    def metrics() -> Response:
        if exposition is None:
            return _json(404, {"error": "metrics are disabled"})
        return Response(exposition(), 200, media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz")
    async def healthz() -> Response:
        return _json(200, {"status": "alive"})

    @app.get("/readyz")
    def readyz() -> Response:
        with status.lock:
            ready, standby, leaving = status.ready, status.standby, status.leaving
        if standby:
            return _json(503, {"status": "standby", "reason": "waiting to join the group"})
        if leaving:
            return _json(503, {"status": "leaving", "reason": "finishing its requests"})
        if ready:
            return _json(200, {"status": "ready"})
        return _json(503, {"status": "not ready", "reason": "starting (group or weights)"})

    return app


def _parse_body(raw: bytes, model: type[BodyT]) -> BodyT:
    """``raw`` as ``model`` (empty: ``{}``); raises ``_Refused`` (422) naming what is wrong."""
    try:
        return model.model_validate(json.loads(raw) if raw.strip() else {})
    except json.JSONDecodeError as exc:
        raise _Refused(422, f"body is not JSON: {exc.msg}") from None
    except UnicodeDecodeError as exc:
        raise _Refused(422, f"body is not JSON: {exc.reason}") from None
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()
        )
        raise _Refused(422, problems) from None


def _body(model: type[BodyT]) -> Callable[[Request], Awaitable[BodyT]]:
    """A dependency: the request body validated as ``model`` by us, not by FastAPI, so a bad
    body answers 422 ``{"error": "field: msg; ..."}`` like every other error here."""

    async def body(request: Request) -> BodyT:
        return _parse_body(await request.body(), model)

    return body


def control_app(status: WorkerStatus, token: str | None) -> FastAPI:
    """The leader's control API; requests need ``Authorization: Bearer <token>`` (401 without,
    and always 401 when ``token`` is None)."""
    app = _app("moe-worker control API")

    async def authorized(request: Request) -> None:
        if token is None:
            raise _Refused(401, "no control token is configured on this worker")
        given = request.headers.get("Authorization", "")
        if not given.startswith("Bearer ") or not hmac.compare_digest(
            given[7:].encode(), token.encode()
        ):
            raise _Refused(401, "missing or wrong bearer token")

    # Route dependencies run first: a request is authorized before its body is read. The
    # routes are plain ``def`` (threadpool): they wait for the status lock, and a resize's
    # check asks the rendezvous store which ranks registered.
    auth = [Depends(authorized)]

    @app.get("/v1/state", dependencies=auth)
    def state() -> Response:
        return _json(200, status.snapshot())

    @app.post("/v1/eplb/rebalance", dependencies=auth)
    def rebalance(
        request: Annotated[RebalanceRequest, Depends(_body(RebalanceRequest))],
    ) -> Response:
        if not status.request_rebalance():
            return _json(409, {"error": "a rebalance is already pending or running"})
        log.info("rebalance requested through the control API (%s)", request.reason or "no reason")
        return _json(202, {"accepted": True})

    @app.post("/v1/ep/resize", dependencies=auth)
    def resize(request: Annotated[ResizeRequest, Depends(_body(ResizeRequest))]) -> Response:
        code, problem = status.request_resize(request.ep_size, request.reason or "")
        if problem is not None:
            return _json(code, {"error": problem})
        log.info("resize to %d ranks requested (%s)", request.ep_size, request.reason or "")
        return _json(202, {"accepted": True, "epSize": request.ep_size})

    return app


def serve_metrics(
    port: int, exposition: Callable[[], bytes] | None, status: WorkerStatus, host: str = "0.0.0.0"
) -> RunningServer:
    """Serve ``metrics_app`` on ``host:port`` (0: a free port, see ``.port``)."""
    return start_server(metrics_app(exposition, status), port, host, "metrics")


def serve_control(
    port: int, status: WorkerStatus, token: str | None, host: str = "0.0.0.0"
) -> RunningServer:
    """Serve ``control_app`` on ``host:port`` (0: a free port, see ``.port``)."""
    return start_server(control_app(status, token), port, host, "control")

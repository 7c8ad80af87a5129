"""HTTP endpoints of a rank: /metrics, /healthz, /readyz; on the leader, the control API.

The control API (JSON, bearer token): GET /v1/state, POST /v1/eplb/rebalance (202, or 409
while one is pending or running), POST /v1/ep/resize ``{"epSize": N}`` (202; 409 while a
resize is pending or running, or while the joining ranks have not registered; 422 for a size
that cannot hold every expert). Requests only set fields in ``WorkerStatus``; the step loop
relays them to every rank so all act at the same step. A rank waiting to join a running group
answers /readyz with 200 ``standby``: it is ready to be taken in by a resize.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field, ValidationError

log = logging.getLogger("moe_worker.server")
TOKEN_ENV = "MOE_CONTROL_TOKEN"
BodyT = TypeVar("BodyT", bound=BaseModel)


@dataclass
class WorkerStatus:
    """State shared between the step loop and the HTTP threads (guarded by ``lock``)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    ready: bool = False
    standby: bool = False
    resizing: bool = False
    resize_target: int = 0  # requested EP size, 0: none
    resize_reason: str = ""
    resize: dict[str, Any] = field(default_factory=dict)  # progress of the latest resize
    # target -> (HTTP status, error) when a resize to it cannot be accepted now, else None
    resize_check: Callable[[int], tuple[int, str] | None] | None = None
    rebalance_requested: bool = False
    rebalancing: bool = False
    stop_requested: bool = False
    state: dict[str, Any] = field(default_factory=dict)

    def request_rebalance(self) -> bool:
        """Ask for a rebalance; False if one is already pending or running."""
        with self.lock:
            if self.rebalance_requested or self.rebalancing:
                return False
            self.rebalance_requested = True
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
            return 202, None

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {
                **self.state,
                "ready": self.ready,
                "standby": self.standby,
                "resizing": self.resizing,
                "resize": dict(self.resize),
                "rebalancePending": self.rebalance_requested,
                "rebalancing": self.rebalancing,
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


class _Handler(BaseHTTPRequestHandler):
    server_version = "moe-worker"
    routes: dict[tuple[str, str], Callable[[_Handler], None]] = {}

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s " + format, self.address_string(), *args)

    def send_body(self, code: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def send_json(self, code: int, payload: Any) -> None:
        self.send_body(code, (json.dumps(payload) + "\n").encode())

    def _dispatch(self, method: str) -> None:
        route = self.routes.get((method, self.path.split("?")[0]))
        if route is None:
            self.send_json(404, {"error": f"no route {method} {self.path}"})
            return
        route(self)

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        self._dispatch("POST")


def _start(port: int, handler: type[_Handler], host: str) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name=f"http-{port}", daemon=True).start()
    return server


def serve_metrics(
    port: int, exposition: Callable[[], bytes] | None, status: WorkerStatus, host: str = "0.0.0.0"
) -> ThreadingHTTPServer:
    """/metrics (when ``exposition`` is given), /healthz and /readyz on ``port``."""

    def metrics(handler: _Handler) -> None:
        if exposition is None:
            handler.send_json(404, {"error": "metrics are disabled"})
        else:
            handler.send_body(200, exposition(), CONTENT_TYPE_LATEST)

    def healthz(handler: _Handler) -> None:
        handler.send_json(200, {"status": "alive"})

    def readyz(handler: _Handler) -> None:
        with status.lock:
            ready, resizing, standby = status.ready, status.resizing, status.standby
        if standby:
            handler.send_json(200, {"status": "standby"})
        elif ready and not resizing:
            handler.send_json(200, {"status": "ready"})
        else:
            reason = "resizing" if resizing else "starting (group or weights not ready)"
            handler.send_json(503, {"status": "not ready", "reason": reason})

    class Handler(_Handler):
        routes = {
            ("GET", "/metrics"): metrics,
            ("GET", "/healthz"): healthz,
            ("GET", "/readyz"): readyz,
        }

    return _start(port, Handler, host)


def serve_control(
    port: int, status: WorkerStatus, token: str | None, host: str = "0.0.0.0"
) -> ThreadingHTTPServer:
    """The leader's control API on ``port``; requests need ``Authorization: Bearer <token>``."""

    def authorized(handler: _Handler) -> bool:
        given = handler.headers.get("Authorization", "")
        if token is None:
            handler.send_json(401, {"error": "no control token is configured on this worker"})
            return False
        if not given.startswith("Bearer ") or not hmac.compare_digest(
            given[7:].encode(), token.encode()
        ):
            handler.send_json(401, {"error": "missing or wrong bearer token"})
            return False
        return True

    def state(handler: _Handler) -> None:
        if authorized(handler):
            handler.send_json(200, status.snapshot())

    def read_body(handler: _Handler, model: type[BodyT]) -> BodyT | None:
        """The request body as ``model``; None after answering 422 when it is not."""
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw.strip() else {}
            return model.model_validate(body)
        except json.JSONDecodeError as exc:
            handler.send_json(422, {"error": f"body is not JSON: {exc.msg}"})
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()
            )
            handler.send_json(422, {"error": problems})
        return None

    def rebalance(handler: _Handler) -> None:
        if not authorized(handler):
            return
        request = read_body(handler, RebalanceRequest)
        if request is None:
            return
        if not status.request_rebalance():
            handler.send_json(409, {"error": "a rebalance is already pending or running"})
            return
        log.info("rebalance requested through the control API (%s)", request.reason or "no reason")
        handler.send_json(202, {"accepted": True})

    def resize(handler: _Handler) -> None:
        if not authorized(handler):
            return
        request = read_body(handler, ResizeRequest)
        if request is None:
            return
        code, problem = status.request_resize(request.ep_size, request.reason or "")
        if problem is not None:
            handler.send_json(code, {"error": problem})
            return
        log.info("resize to %d ranks requested (%s)", request.ep_size, request.reason or "")
        handler.send_json(202, {"accepted": True, "epSize": request.ep_size})

    class Handler(_Handler):
        routes = {
            ("GET", "/v1/state"): state,
            ("POST", "/v1/eplb/rebalance"): rebalance,
            ("POST", "/v1/ep/resize"): resize,
        }

    return _start(port, Handler, host)

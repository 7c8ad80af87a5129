"""Run an ASGI app (FastAPI/Starlette) with uvicorn on a background thread of this process.

A worker rank's step loop owns the main thread; its HTTP endpoints (the OpenAI-compatible API,
/metrics, health, the control API) run on uvicorn in a thread each. ``start_server`` returns once
the socket listens (port 0 picks a free port: read ``RunningServer.port``); ``shutdown`` stops it
and waits for the thread.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

import uvicorn


class RunningServer:
    """A uvicorn server on its own thread; ``port`` is the port it listens on."""

    def __init__(self, server: uvicorn.Server, thread: threading.Thread, sock: socket.socket):
        self._server = server
        self._thread = thread
        self._socket = sock
        self.host, self.port = sock.getsockname()[:2]

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The server thread's event loop (None before it started)."""
        return getattr(self._server, "moe_loop", None)

    def shutdown(self, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)
        self._socket.close()


class _Server(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # the main thread keeps its own handlers
        pass

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self.moe_loop = asyncio.get_running_loop()
        await super().startup(sockets)


def start_server(
    app: Any, port: int, host: str = "0.0.0.0", name: str = "http", timeout: float = 30.0
) -> RunningServer:
    """Serve ``app`` on ``host:port`` from a daemon thread; returns when it accepts connections.

    The socket is bound here, in the caller's thread, so a port already in use fails at once
    with ``OSError`` naming it.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit it: without it a response's header and body writes wait
    # on the client's delayed ACK (~40 ms per request on Linux).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    sock.listen(2048)
    config = uvicorn.Config(
        app, log_level="warning", access_log=False, lifespan="auto", timeout_keep_alive=30
    )
    server = _Server(config)
    thread = threading.Thread(
        target=lambda: server.run(sockets=[sock]), name=f"{name}-{sock.getsockname()[1]}"
    )
    thread.daemon = True
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive():
            sock.close()
            raise RuntimeError(f"{name} server on {host}:{port} failed to start")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"{name} server on {host}:{port} did not start in {timeout} s")
        time.sleep(0.005)
    return RunningServer(server, thread, sock)

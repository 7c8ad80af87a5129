"""Run the real operator (Kopf + moe_operator.handlers) in-process against the emulator."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import kopf

# conftest.py sets these before anything imports moe_operator.handlers (which reads them).
WEBHOOK_URL = f"http://127.0.0.1:{os.environ.get('MOE_OPERATOR_WEBHOOK_PORT')}"
METRICS_URL = f"http://127.0.0.1:{os.environ.get('MOE_OPERATOR_METRICS_PORT')}/metrics"


@asynccontextmanager
async def running_operator(kubeconfig: Path) -> AsyncIterator[None]:
    """Kopf with the operator's handlers, cluster-wide, until the block exits."""
    os.environ["KUBECONFIG"] = str(kubeconfig)
    import moe_operator.handlers  # noqa: F401  (registers the handlers)

    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(
        kopf.operator(clusterwide=True, standalone=True, stop_flag=stop, ready_flag=ready)
    )
    await asyncio.wait_for(ready.wait(), 30)
    try:
        yield
    finally:
        stop.set()
        done, _ = await asyncio.wait({task}, timeout=30)
        if not done:
            for other in asyncio.all_tasks():
                other.print_stack(limit=8)
            task.cancel()
            raise AssertionError("the operator did not stop within 30 s of its stop flag")
        task.result()


class OperatorProcess:
    """The operator as its image runs it (``kopf run -m moe_operator.handlers``, the chart's
    arguments), in its own process, so a test can kill it as a node failure would."""

    def __init__(
        self,
        kubeconfig: Path,
        log: Path,
        scope: tuple[str, ...] = ("--all-namespaces",),
        extra_env: dict[str, str] | None = None,
    ) -> None:
        """``scope``: the chart's namespace arguments (``--all-namespaces`` or one
        ``--namespace=`` per watched namespace); ``extra_env``: more of the chart's env."""
        from distributed import free_port

        self.kubeconfig, self.log, self.scope = kubeconfig, log, scope
        self.health = f"http://127.0.0.1:{free_port()}/healthz"
        # Its own ports: an in-process operator of an earlier test keeps its metrics server.
        self.env = {
            **os.environ,
            "KUBECONFIG": str(kubeconfig),
            "MOE_OPERATOR_METRICS_PORT": str(free_port()),
            "MOE_OPERATOR_WEBHOOK_PORT": str(free_port()),
            **(extra_env or {}),
        }
        self.process: subprocess.Popen[bytes] | None = None

    async def start(self, timeout: float = 60) -> None:
        kopf_bin = str(Path(sys.executable).parent / "kopf")
        command = [kopf_bin, "run", "-m", "moe_operator.handlers", "--standalone"]
        command += [*self.scope, f"--liveness={self.health}"]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                command,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

        def alive() -> bool:
            assert self.process is not None and self.process.poll() is None, self.log.read_text()
            try:
                with urllib.request.urlopen(self.health, timeout=2) as response:
                    return bool(response.status == 200)
            except OSError:
                return False

        await eventually(alive, timeout, "the operator's liveness endpoint")

    def kill(self) -> None:
        """SIGKILL: no cleanup handlers, nothing written on the way out."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


async def eventually(check: Callable[[], Any], timeout: float = 20.0, what: str = "") -> Any:
    """Poll ``check`` until it returns a truthy value; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or check}")
        await asyncio.sleep(0.05)

"""EP ranks as local processes (``python -m moe_worker``) sharing one config and rendezvous.

Each rank's stdout/stderr go to files (a full pipe would block a chatty rank); ``summary``
reads the JSON line a rank prints when it exits.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from distributed import free_port

T = TypeVar("T")
TOKEN = "elastic-test-token"


def http(method: str, url: str, token: str | None = None, body: Any = None) -> tuple[int, Any]:
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            raw, code = response.read(), response.status
    except urllib.error.HTTPError as error:
        raw, code = error.read(), error.code
    try:
        return code, json.loads(raw)
    except json.JSONDecodeError:
        return code, raw.decode()


class RankProcesses:
    """Start, kill and query the ranks of one deployment on 127.0.0.1."""

    def __init__(self, directory: Path, config: dict[str, Any], world: int) -> None:
        self.directory = directory
        self.world = world
        self.metrics_port = free_port(consecutive=8)
        self.control_port = free_port()
        self.master_port = free_port()
        (directory / "token").write_text(TOKEN + "\n")
        config = {
            **config,
            "epSize": world,
            "metrics": {**config.get("metrics", {}), "port": self.metrics_port},
            "control": {"port": self.control_port, "tokenFile": str(directory / "token")},
            "device": "cpu",
        }
        self.config_path = directory / "worker.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.processes: dict[int, subprocess.Popen[bytes]] = {}
        self.expected_exits: set[int] = set()
        self.starts = 0

    def start(self, rank: int, program: list[str] | None = None) -> None:
        """Start ``rank`` with the template's environment (WORLD_SIZE is the initial size);
        ``program``: what to run instead of ``python -m moe_worker`` (``--config`` follows)."""
        self.starts += 1
        out = open(self.directory / f"rank{rank}.{self.starts}.out", "wb")  # noqa: SIM115
        err = open(self.directory / f"rank{rank}.{self.starts}.err", "wb")  # noqa: SIM115
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": str(self.world),
            "MASTER_PORT": str(self.master_port),
            "OMP_NUM_THREADS": "1",
        }
        self.processes[rank] = subprocess.Popen(
            [*(program or [sys.executable, "-m", "moe_worker"]), "--config", str(self.config_path)],
            env=env,
            stdout=out,
            stderr=err,
        )
        self.processes[rank].out_path = out.name  # type: ignore[attr-defined]
        self.processes[rank].err_path = err.name  # type: ignore[attr-defined]

    def log(self, rank: int) -> str:
        return Path(self.processes[rank].err_path).read_text()[-4000:]  # type: ignore[attr-defined]

    def summary(self, rank: int, timeout: float = 60.0) -> dict[str, Any]:
        process = self.processes[rank]
        assert process.wait(timeout) == 0, self.log(rank)
        lines = Path(process.out_path).read_text().splitlines()  # type: ignore[attr-defined]
        return json.loads([line for line in lines if line.startswith("{")][-1])  # type: ignore[no-any-return]

    def control(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        return http(method, f"http://127.0.0.1:{self.control_port}{path}", TOKEN, body)

    def state(self) -> dict[str, Any]:
        code, body = self.control("GET", "/v1/state")
        assert code == 200, body
        return body  # type: ignore[no-any-return]

    def readyz(self, rank: int) -> tuple[int, Any]:
        return http("GET", f"http://127.0.0.1:{self.metrics_port + rank}/readyz")

    def kill(self, rank: int) -> None:
        self.processes[rank].send_signal(signal.SIGKILL)
        self.processes[rank].wait(10)

    def wait(self, condition: Callable[[], T | None], timeout: float = 90.0, what: str = "") -> T:
        """Poll ``condition`` until truthy; fail at once if a rank exits unexpectedly."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for rank, process in self.processes.items():
                if process.poll() is not None and rank not in self.expected_exits:
                    raise AssertionError(
                        f"rank {rank} exited ({process.returncode}): {self.log(rank)}"
                    )
            try:
                result = condition()
            except (urllib.error.URLError, ConnectionError, AssertionError, KeyError):
                result = None
            if result:
                return result
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}")

    def stop(self) -> None:
        """SIGTERM to the leader (the stop relays to every rank); kill what is left."""
        leader = self.processes.get(0)
        if leader is not None and leader.poll() is None:
            leader.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

"""``moe-eplb serve MODEL_DIR``: a checkpoint served on this machine.

The EP ranks run as local processes (``python -m moe_worker``, CPU and gloo, or one local GPU
each) with a worker config in the ConfigMap's schema; a router on ``--port`` spreads requests
over the ranks' APIs and reaches the leader's control API (token-guarded). EPLB is on by
default. No torch here: the checks read config.json and list files.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from moe_operator.runtime.local import free_ports
from moe_worker.config import WorkerConfig
from moe_worker.model.families import FAMILIES, TOKENIZER_FILES

# Where each family's config.json gives its routed-expert count (either spelling).
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


class ServeError(ValueError):
    """A one-line problem with the model directory or the options, naming it."""


def read_checkpoint_facts(model_dir: Path, what: str = "MODEL_DIR") -> dict[str, Any]:
    """config.json's facts serving needs (model_type; experts per MoE layer, None for a dense
    model), or a one-line ``ServeError`` naming ``what`` (the argument or option)."""
    if not model_dir.exists():
        raise ServeError(f"{what} {model_dir}: no such directory")
    if not model_dir.is_dir():
        raise ServeError(f"{what} {model_dir}: not a directory")
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise ServeError(f"{what} {model_dir}: no config.json (not a transformers checkpoint)")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ServeError(f"{what} {model_dir}: config.json is not JSON: {exc.msg}") from None
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise ServeError(
            f"{what} {model_dir}: model_type {model_type!r} is not supported; "
            f"supported: {', '.join(sorted(FAMILIES))}"
        )
    # vision-language wrappers keep the language model's sizes in text_config
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    experts = next((text[k] for k in EXPERT_COUNT_KEYS if isinstance(text.get(k), int)), None)
    if not list(model_dir.glob("*.safetensors")):
        raise ServeError(f"{what} {model_dir}: no .safetensors weights")
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        raise ServeError(f"{what} {model_dir}: no tokenizer (tokenizer.json) beside the weights")
    return {"model_type": model_type, "num_experts": experts}


def checkpoint_experts(
    model_dir: Path, main: int | None, draft: Path | None
) -> tuple[int, int | None]:
    """(experts per MoE layer of the main model, of the draft), given the main model's
    (``main``, from its facts; None: dense) and the draft's directory: the main model may be dense
    when an MoE draft is given (its slot arithmetic is then the draft's: EPLB balances the
    draft alone); a one-line ``ServeError`` when neither has MoE layers."""
    draft_experts = (
        None if draft is None else read_checkpoint_facts(draft, "--draft")["num_experts"]
    )
    if main is None and draft_experts is None:
        keys = " or ".join(EXPERT_COUNT_KEYS)
        raise ServeError(
            f"MODEL_DIR {model_dir}: config.json gives no expert count ({keys}); a dense model "
            "needs an MoE draft (--draft)"
        )
    return (main if main is not None else draft_experts), draft_experts  # type: ignore[return-value]


def serve_worker_config(
    model_dir: Path,
    ep_size: int,
    num_experts: int,
    device: str,
    base: dict[str, Any] | None,
    ports: dict[str, int],
    draft: dict[str, Any] | None = None,
) -> WorkerConfig:
    """The ranks' worker config: ``base`` (the ConfigMap's schema) with the checkpoint, EP size,
    device and local ports filled in (and ``draft``: a speculative draft checkpoint's
    ``model.draft`` fields). Redundant experts default to one slot per rank (rounded so every
    rank holds the same number of slots)."""
    document: dict[str, Any] = dict(base or {})
    model = dict(document.get("model") or {})
    model.update({"source": "checkpoint", "path": str(model_dir), "numExperts": num_experts})
    model.pop("numLayers", None)
    if draft is not None:
        model["draft"] = {**(model.get("draft") or {}), **draft}
    document["model"] = model
    eplb = dict(document.get("eplb") or {})
    if "numRedundantExperts" not in eplb and "num_redundant_experts" not in eplb:
        eplb["numRedundantExperts"] = ep_size + (-(num_experts + ep_size)) % ep_size
    document["eplb"] = eplb
    serving = dict(document.get("serving") or {})
    serving.update({"enabled": True, "port": ports["api"]})
    serving.setdefault("modelName", model_dir.resolve().name)
    document["serving"] = serving
    document["metrics"] = {**(document.get("metrics") or {}), "port": ports["metrics"]}
    document["control"] = {**(document.get("control") or {}), "port": ports["control"]}
    document.update({"epSize": ep_size, "device": device, "steps": 0})
    return WorkerConfig.model_validate(document)


@dataclass
class ServeRanks:
    """The local rank processes of one ``serve`` run."""

    config: WorkerConfig
    gpus: list[str] | None
    token: str
    workdir: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def api_urls(self) -> list[str]:
        port = self.config.serving.port
        return [f"http://127.0.0.1:{port + rank}" for rank in range(self.config.ep_size)]

    @property
    def control_url(self) -> str:
        return f"http://127.0.0.1:{self.config.control.port}"

    def start(self, master_port: int) -> None:
        config_file = self.workdir / "worker.yaml"
        config_file.write_text(yaml.safe_dump(self.config.model_dump(by_alias=True, mode="json")))
        for rank in range(self.config.ep_size):
            env = {
                **os.environ,
                "RANK": str(rank),
                "WORLD_SIZE": str(self.config.ep_size),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(master_port),
                "MOE_CONTROL_TOKEN": self.token,
                "MOE_BIND_HOST": "127.0.0.1",
                "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            }
            if self.gpus is not None:
                env["CUDA_VISIBLE_DEVICES"] = self.gpus[rank]
            log = (self.workdir / f"rank-{rank}.log").open("wb")
            self.processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "moe_worker", "--config", str(config_file)],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # a terminal's Ctrl-C reaches serve, which stops them
                )
            )

    def wait_ready(self, timeout_s: float, progress: Callable[[str], None]) -> None:
        """Until every rank's API answers /health 200; a rank that exits is an error."""
        deadline = time.monotonic() + timeout_s
        pending = set(self.api_urls)
        with httpx.Client(timeout=2.0, trust_env=False) as client:
            while pending:
                for rank, process in enumerate(self.processes):
                    if process.poll() is not None:
                        tail = self.log_tail(rank)
                        raise ServeError(f"rank {rank} exited ({process.returncode}): {tail}")
                for url in sorted(pending):
                    try:
                        if client.get(url + "/health").status_code == 200:
                            pending.discard(url)
                            progress(f"{url} ready")
                    except httpx.HTTPError:
                        pass
                if time.monotonic() > deadline:
                    raise ServeError(f"ranks not ready within {timeout_s:.0f} s: {sorted(pending)}")
                if pending:
                    time.sleep(0.2)

    def log_tail(self, rank: int) -> str:
        lines = (self.workdir / f"rank-{rank}.log").read_text(errors="replace").splitlines()
        errors = [line for line in lines if line.startswith("error:") or "Error" in line]
        return (errors or lines or ["(no output)"])[-1].strip()

    def stop(self, timeout_s: float = 30.0) -> list[int | None]:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        codes: list[int | None] = []
        for process in self.processes:
            try:
                codes.append(process.wait(timeout=max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                process.kill()
                codes.append(process.wait())
        return codes


def serve(
    model_dir: Path,
    ep_size: int,
    port: int,
    device: str,
    base_config: dict[str, Any] | None,
    gpus: list[str] | None,
    progress: Callable[[str], None],
    stop: threading.Event,
    ready_timeout_s: float = 600.0,
    draft: Path | None = None,
    speculative_tokens: int | None = None,
) -> list[int | None]:
    """Serve until ``stop`` is set; returns the ranks' exit codes. ``draft``: a speculative
    draft checkpoint (``speculative_tokens`` per step)."""
    from moe_worker.asgi import start_server
    from moe_worker.serving.router import router_app

    facts = read_checkpoint_facts(model_dir)
    num_experts, draft_experts = checkpoint_experts(model_dir, facts["num_experts"], draft)
    draft_fields: dict[str, Any] | None = None
    if draft is not None:
        draft_fields = {"source": "checkpoint", "path": str(draft)}
        if draft_experts is not None:
            draft_fields["numExperts"] = draft_experts
        if speculative_tokens is not None:
            draft_fields["numSpeculativeTokens"] = speculative_tokens
    first = free_ports(2 * ep_size + 3)
    ports = {"api": first, "metrics": first + ep_size, "control": first + 2 * ep_size}
    config = serve_worker_config(
        model_dir, ep_size, num_experts, device, base_config, ports, draft_fields
    )
    token = os.environ.get("MOE_CONTROL_TOKEN") or secrets.token_urlsafe(24)
    with tempfile.TemporaryDirectory(prefix="moe-serve-") as workdir:
        ranks = ServeRanks(config, gpus, token, Path(workdir))
        ranks.start(first + 2 * ep_size + 1)
        router = None
        try:
            progress(f"{ep_size} rank(s) of {facts['model_type']} starting (logs in {workdir})")
            ranks.wait_ready(ready_timeout_s, progress)
            router = start_server(
                router_app(ranks.api_urls, ranks.control_url), port, "127.0.0.1", "router"
            )
            progress(f"serving {config.serving.model_name} at http://127.0.0.1:{router.port}/v1")
            progress(f"leader metrics at http://127.0.0.1:{ports['metrics']}/metrics")
            while not stop.is_set():
                if any(p.poll() is not None for p in ranks.processes):
                    dead = [r for r, p in enumerate(ranks.processes) if p.poll() is not None]
                    raise ServeError(f"rank {dead[0]} exited: {ranks.log_tail(dead[0])}")
                stop.wait(0.5)
        finally:
            if router is not None:
                router.shutdown()
            codes = ranks.stop()
    return codes

"""Entry point of one EP rank: ``python -m moe_worker --config FILE`` or ``moe-eplb worker``.

Rank, world size and the rendezvous address come from the environment (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT, and LOCAL_RANK for the port offset), as the pod template sets them.
Serves /metrics, /healthz, /readyz (port metrics.port + local rank) and, on rank 0, the control
API (control.port). SIGTERM stops every rank at the same step; the process then exits 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import ValidationError

from moe_worker.config import RankEnv, WorkerConfig

if TYPE_CHECKING:
    from moe_worker.asgi import RunningServer
    from moe_worker.metrics import WorkerMetrics
    from moe_worker.server import WorkerStatus
    from moe_worker.serving.engine import ServingEngine


def config_error(path: str | Path, exc: BaseException) -> str:
    """One line for a config that cannot be used: the file, the field (camelCase) and the rule
    (pydantic's first error, and how many more), or what kept the file from being read."""
    if isinstance(exc, ValidationError):
        errors = exc.errors()
        first = errors[0]
        where = ".".join(str(part) for part in first["loc"]) or "config"
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        message = str(first["msg"]).removeprefix("Value error, ")
        return f"{path}: {where}: {message}{more}"
    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    return f"{path}: {lines[0]}"


def load_config(path: str | Path) -> WorkerConfig:
    text = Path(path).read_text()
    data = yaml.safe_load(text) if Path(path).suffix in (".yaml", ".yml") else json.loads(text)
    return WorkerConfig.model_validate(data or {})


def run(config: WorkerConfig, env: RankEnv, steps: int | None = None) -> dict[str, Any]:
    import torch.distributed as dist

    from moe_worker.elastic import Rendezvous, StandbyStopped
    from moe_worker.engine import resolve_device
    from moe_worker.eplb.channels import backend_for
    from moe_worker.membership import Membership
    from moe_worker.metrics import WorkerMetrics
    from moe_worker.server import WorkerStatus, read_token, serve_control, serve_metrics
    from moe_worker.service import WorkerService

    status = WorkerStatus()
    warming = None
    if config.eplb.enabled:
        # The placement kernels compile (unless built ahead of time) while the model loads, not
        # when the first rebalance needs them: in a fresh pod that takes seconds.
        from moe_worker.eplb.policy import start_warm_up

        warming = start_warm_up()
    # Where the HTTP servers listen: every address unless MOE_BIND_HOST names one (tests run
    # several "pods" on one host, each on its own loopback address).
    bind_host = os.environ.get("MOE_BIND_HOST", "0.0.0.0")
    for signum in (signal.SIGTERM, signal.SIGINT):  # both stop every rank at the same step
        signal.signal(signum, lambda *_: setattr(status, "stop_requested", True))
    metrics = None
    servers = []
    # In a pod (POD_NAME set) ports count from the pod's first rank; elsewhere from rank 0.
    in_pod = "POD_NAME" in os.environ
    local_rank = int(os.environ.get("LOCAL_RANK", 0 if in_pod else env.rank))
    device = resolve_device(config.device, env.rank)
    if config.metrics.enabled:
        metrics = WorkerMetrics(
            config.deployment,
            env.rank,
            backend_for(config.eplb, device),  # the backend in use, not "auto"
            config.eplb.policy,
            config.eplb.use_async,
            config.metrics.per_expert,
            ("main", "draft") if config.model.draft is not None else ("main",),
        )
        port = config.metrics.port + local_rank if config.metrics.port else 0
        servers.append(serve_metrics(port, metrics.exposition, status, bind_host))
    if config.control.enabled and env.rank == 0:
        servers.append(
            serve_control(
                config.control.port, status, read_token(config.control.token_file), bind_host
            )
        )
    rendezvous = Rendezvous(
        env.master_addr, env.master_port, env.rank == 0, config.elastic.join_timeout_s
    )
    membership = Membership(rendezvous, env.rank, config, device)

    def standby() -> None:
        with status.lock:
            status.standby = True

    serving_engine: Any = None
    try:
        try:
            engine = membership.start(env, standby, lambda: status.stop_requested)
        except StandbyStopped:
            return {"rank": env.rank, "steps": 0, "standby": True, "stopped_by_signal": True}
        with status.lock:
            status.standby = False
        if config.serving.enabled:
            serving_engine = engine
            serving_engine.observer = metrics  # request latencies, queue and tokens
            servers.append(
                serve_api(config, serving_engine, status, metrics, local_rank, bind_host)
            )
        service = WorkerService(engine, status, metrics, config.metrics.update_interval, membership)
        service.run(config.steps if steps is None else steps)
        summary: dict[str, Any] = {
            "rank": env.rank,
            "steps": engine.step_index,
            "tokens": engine.tokens_processed,
            "stopped_by_signal": service.stopping,
            "retired": membership.retired,
            "topologyGeneration": membership.generation,
            "epSize": engine.ep.size,
            "device": str(engine.device),
            "recoveries": service.recoveries,
            "outputsChecked": engine.outputs_checked,
            "outputMismatches": engine.output_mismatches,
        }
        if config.serving.enabled:
            summary["requestsFinished"] = serving_engine.requests_finished
            summary["generatedTokens"] = serving_engine.generated_tokens
        if engine.eplb is not None and not membership.retired:
            summary["rebalances"] = [r.result for r in engine.eplb.history]
            summary["balancedness"] = engine.eplb.current_balancedness()
        return summary
    finally:
        if serving_engine is not None:  # requests still queued or running end with an error
            serving_engine.fail_all(RuntimeError("the server is shutting down"))
        for server in servers:
            server.shutdown()
        if warming is not None:
            warming.join()  # a compiling thread must not be cut off at interpreter exit
        if dist.is_initialized():
            dist.destroy_process_group()


def served_model_name(config: WorkerConfig) -> str:
    """The model id of the API: the configured name, the checkpoint directory's, or synthetic."""
    if config.serving.model_name:
        return config.serving.model_name
    if config.model.source == "checkpoint" and config.model.path:
        return Path(config.model.path).resolve().name
    return f"synthetic-{config.model.family}"


def serve_api(
    config: WorkerConfig,
    engine: ServingEngine,
    status: WorkerStatus,
    metrics: WorkerMetrics | None,
    local_rank: int,
    host: str,
) -> RunningServer:
    """This rank's OpenAI-compatible API on ``serving.port`` + local rank (in a pod of several
    ranks: the ports after its router's, ``MOE_API_PORT`` + local rank), with /metrics,
    /healthz and /readyz of the same rank beside it."""
    from starlette.routing import Mount

    from moe_worker.asgi import start_server
    from moe_worker.server import metrics_app
    from moe_worker.serving.api import build_app
    from moe_worker.serving.rank_backend import EngineBackend

    backend = EngineBackend(engine, served_model_name(config), status.admitting)
    exposition = None if metrics is None else metrics.exposition
    app = build_app(backend, extra_routes=[Mount("/", app=metrics_app(exposition, status))])
    base = int(os.environ.get(API_PORT_ENV, config.serving.port))  # behind a pod's router
    port = base + local_rank if config.serving.port else 0
    return start_server(app, port, host, "api")


API_PORT_ENV = "MOE_API_PORT"  # where a pod's launcher puts its local ranks' APIs


def pod_router_ports(serving_port: int, count: int) -> list[int]:
    """The API ports of a pod's ``count`` local ranks behind its router on ``serving_port``."""
    return [serving_port + 1 + local for local in range(count)]


def launch_local_ranks(argv: list[str]) -> int:
    """In a pod with LOCAL_WORLD_SIZE GPUs: one process per local rank (LOCAL_RANK set).

    A serving pod's one API port (``serving.port``, the Service's target) is a router over its
    local ranks' APIs, which listen on the ports after it (``pod_router_ports``). SIGTERM is
    passed on to every rank; the exit status is the worst of theirs.
    """
    import subprocess

    count = int(os.environ["LOCAL_WORLD_SIZE"])
    router = None
    env = dict(os.environ)
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config")
    known, _ = parser.parse_known_args(argv)
    try:
        config = load_config(known.config) if known.config else None
    except (OSError, ValueError, ValidationError):
        config = None  # each rank reports the problem itself
    if config is not None and config.serving.enabled:
        from moe_worker.asgi import start_server
        from moe_worker.serving.router import router_app

        host = os.environ.get("MOE_BIND_HOST", "0.0.0.0")
        target = "127.0.0.1" if host == "0.0.0.0" else host
        ports = pod_router_ports(config.serving.port, count)
        env[API_PORT_ENV] = str(ports[0])
        urls = [f"http://{target}:{port}" for port in ports]
        router = start_server(router_app(urls), config.serving.port, host, "pod-router")
    children = [
        subprocess.Popen(
            [sys.executable, "-m", "moe_worker", *argv], env={**env, "LOCAL_RANK": str(i)}
        )
        for i in range(count)
    ]

    def forward(*_: Any) -> None:
        for child in children:
            child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    try:
        return max(child.wait() for child in children)
    finally:
        if router is not None:
            router.shutdown()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1 and "LOCAL_RANK" not in os.environ:
        return launch_local_ranks(argv)
    parser = argparse.ArgumentParser(prog="moe_worker", description="Run one EP rank.")
    parser.add_argument("--config", required=True, help="WorkerConfig as YAML or JSON.")
    parser.add_argument(
        "--steps", type=int, default=None, help="Override config steps (0: run until stopped)."
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        config = load_config(args.config)
        env = RankEnv.from_environ(dict(os.environ))
    except (OSError, ValueError, ValidationError, yaml.YAMLError) as exc:
        print(f"error: {config_error(args.config, exc)}", file=sys.stderr)
        return 2
    from moe_worker.model.hf_source import CheckpointError

    try:
        summary = run(config, env, args.steps)
    except CheckpointError as exc:  # the model's files: one line, not a traceback
        print(f"error: {args.config}: model.path: {exc}", file=sys.stderr)
        return 2
    write_line(json.dumps(summary))
    return 0


def write_line(text: str) -> None:
    """Write one line to stdout with a single write(2) where it fits in PIPE_BUF.

    Local ranks of one pod share the pod's stdout; print() under PYTHONUNBUFFERED issues the
    text and its newline as two writes, so two ranks' summaries could interleave on one line.
    """
    sys.stdout.flush()
    data = (text + "\n").encode()
    while data:
        written = os.write(sys.stdout.fileno(), data)
        data = data[written:]

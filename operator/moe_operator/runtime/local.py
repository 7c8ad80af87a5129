"""The embedded default: run a MoEDeployment on this machine, with the operator's policy loop.

All ranks run as local processes started with the command and environment of the StatefulSet's
pod template (one "pod" holding every rank, so ports and MASTER_ADDR stay on 127.0.0.1; CPU and
gloo unless the deployment asks for GPUs and they exist). Every second the runtime scrapes the
ranks (or queries ``--prometheus``), runs ``policy.decide`` and acts: a remap is a POST to the
leader's control API; a resize restarts the ranks at the new EP size (the live elastic protocol
is not built yet, so a resize here is a restart, and steps in flight are lost). It shows a live
table and writes a report: a JSON timeline and a PNG plot with the actions marked.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from ..api.models import MoEDeployment
from ..builders import stateful_set, worker_config
from ..metrics_source import MetricsUnavailable, PrometheusSource, ScrapeSource
from ..policy import Decision, PolicyMemory, Snapshot, decide


def free_ports(count: int) -> int:
    """A port p such that p .. p + count - 1 are free now."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            base = int(sock.getsockname()[1])
        if base + count > 65535:
            continue
        try:
            for offset in range(1, count):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", base + offset))
        except OSError:
            continue
        return base


def with_ep_size(deployment: MoEDeployment, ep_size: int) -> MoEDeployment:
    document = deployment.model_dump(by_alias=True, exclude_none=True)
    document["spec"]["parallelism"]["expertParallelSize"] = ep_size
    return MoEDeployment.model_validate(document)


def pod_command(
    deployment: MoEDeployment, workdir: Path, metrics_port: int, device: str
) -> tuple[list[str], dict[str, str], dict[str, Any]]:
    """The pod template's command and env with every rank in one local pod; and its config."""
    ep_size = deployment.spec.parallelism.expert_parallel_size
    container = stateful_set(deployment)["spec"]["template"]["spec"]["containers"][0]
    config = worker_config(deployment)
    config["device"] = device
    config["metrics"]["port"] = metrics_port
    config["control"] = {"port": metrics_port - 1, "tokenFile": str(workdir / "token")}
    config["steps"] = 0
    (workdir / "worker.yaml").write_text(yaml.safe_dump(config))
    env = dict(os.environ)
    env.pop("RANK", None)
    for item in container["env"]:
        if "value" in item:
            env[item["name"]] = item["value"]
    # The pod's numba cache dir is for its read-only root filesystem; here numba's own default
    # (or the caller's NUMBA_CACHE_DIR) keeps compiled kernels across runs.
    env.pop("NUMBA_CACHE_DIR", None)
    if "NUMBA_CACHE_DIR" in os.environ:
        env["NUMBA_CACHE_DIR"] = os.environ["NUMBA_CACHE_DIR"]
    env.update(
        POD_NAME=f"{deployment.metadata.name}-0",
        POD_NAMESPACE=deployment.metadata.namespace or "default",
        LOCAL_WORLD_SIZE=str(ep_size),
        WORLD_SIZE=str(ep_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_ports(1)),
    )
    command = list(container["command"])
    command[0] = str(Path(sys.executable).parent / "moe-eplb")
    command[command.index("--config") + 1] = str(workdir / "worker.yaml")
    return command, env, config


@dataclass
class Ranks:
    """The running worker processes of one EP size."""

    process: subprocess.Popen[bytes]
    ep_size: int
    metrics_port: int
    control_port: int

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def start_ranks(deployment: MoEDeployment, workdir: Path, device: str) -> Ranks:
    ep_size = deployment.spec.parallelism.expert_parallel_size
    base = free_ports(ep_size + 1)
    command, env, _ = pod_command(deployment, workdir, base + 1, device)
    log = open(workdir / f"ranks-ep{ep_size}.log", "ab")  # noqa: SIM115 - owned by the child
    process = subprocess.Popen(
        command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    return Ranks(process, ep_size, base + 1, base)


@dataclass
class Timeline:
    started: float = field(default_factory=time.time)
    points: list[dict[str, Any]] = field(default_factory=list)
    actions: list[dict[str, Any]] = field(default_factory=list)

    def add(self, snapshot: Snapshot | None, decision: Decision, ep_size: int) -> None:
        t = round(time.time() - self.started, 2)
        if snapshot is not None:
            self.points.append(
                {
                    "t": t,
                    "ep_size": snapshot.ep_size,
                    "balancedness": snapshot.balancedness,
                    "rank_tokens_per_s": list(snapshot.rank_tokens_per_s),
                    "mapping_generation": snapshot.mapping_generation,
                }
            )
        if decision.verb in ("remap", "resize"):
            self.actions.append(
                {
                    "t": t,
                    "action": decision.verb,
                    "reason": decision.reason,
                    "from_ep_size": ep_size,
                    "to_ep_size": decision.target_ep_size or ep_size,
                }
            )


def write_report(timeline: Timeline, deployment: MoEDeployment, path: Path) -> Path:
    """JSON timeline at ``path`` and a PNG plot beside it (same stem)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "deployment": deployment.metadata.name,
        "threshold": deployment.spec.remap.balancedness_threshold,
        "points": timeline.points,
        "actions": timeline.actions,
    }
    path.write_text(json.dumps(report, indent=1))
    figure, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    ts = [p["t"] for p in timeline.points]
    axes[0].plot(ts, [p["balancedness"] for p in timeline.points], label="balancedness (min)")
    axes[0].axhline(report["threshold"], color="grey", linestyle="--", label="remap threshold")
    axes[0].set_ylabel("balancedness")
    loads = [
        sum(p["rank_tokens_per_s"]) / max(len(p["rank_tokens_per_s"]), 1) for p in timeline.points
    ]
    axes[1].plot(ts, loads)
    axes[1].set_ylabel("tokens/s per rank")
    axes[2].step(ts, [p["ep_size"] for p in timeline.points], where="post")
    axes[2].set_ylabel("EP size")
    axes[2].set_xlabel("seconds")
    for action in timeline.actions:
        color = "tab:green" if action["action"] == "remap" else "tab:red"
        for axis in axes:
            axis.axvline(action["t"], color=color, alpha=0.6)
    axes[0].legend(loc="lower right")
    figure.suptitle(f"{deployment.metadata.name}: remaps (green), resizes (red)")
    figure.tight_layout()
    figure.savefig(path.with_suffix(".png"), dpi=100)
    plt.close(figure)
    return path


def table(snapshot: Snapshot | None, decision: Decision, timeline: Timeline) -> Any:
    from rich.table import Table

    out = Table(title="moe-eplb run", expand=False)
    out.add_column("what")
    out.add_column("value")
    if snapshot is None:
        out.add_row("metrics", decision.reason)
    else:
        balance = "-" if snapshot.balancedness is None else f"{snapshot.balancedness:.3f}"
        out.add_row("EP size", str(snapshot.ep_size))
        out.add_row("balancedness (min over layers)", balance)
        out.add_row("mapping generation", str(snapshot.mapping_generation))
        loads = " ".join(f"{x:.0f}" for x in snapshot.rank_tokens_per_s)
        out.add_row("tokens/s per rank", loads)
    out.add_row("policy", f"{decision.verb}: {decision.reason}")
    for action in timeline.actions[-5:]:
        out.add_row(f"t={action['t']:.0f}s {action['action']}", action["reason"])
    return out


async def _remap(ranks: Ranks, token: str, reason: str) -> str:
    url = f"http://127.0.0.1:{ranks.control_port}/v1/eplb/rebalance"
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http,
        http.post(url, json={"reason": reason}, headers={"Authorization": f"Bearer {token}"}) as r,
    ):
        return "accepted" if r.status == 202 else f"HTTP {r.status}"


async def run(
    deployment: MoEDeployment,
    duration: float,
    report: Path,
    prometheus: str | None = None,
    device: str = "cpu",
    live: bool = True,
) -> Timeline:
    """Run until ``duration`` seconds pass (or Ctrl-C); returns the timeline (also written)."""
    from rich.live import Live

    workdir = report.parent / f".{deployment.metadata.name}-run"
    workdir.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    (workdir / "token").write_text(token)
    current = deployment
    ranks = start_ranks(current, workdir, device)
    timeline = Timeline()
    memory = PolicyMemory()
    deadline = time.monotonic() + duration

    def source_for(r: Ranks) -> PrometheusSource | ScrapeSource:
        if prometheus:
            meta = current.metadata
            return PrometheusSource(prometheus, meta.namespace or "default", meta.name)
        return ScrapeSource(
            [f"http://127.0.0.1:{r.metrics_port + i}/metrics" for i in range(r.ep_size)]
        )

    source = source_for(ranks)
    decision = Decision("none", "starting")
    snapshot: Snapshot | None = None
    try:
        with Live(
            table(None, decision, timeline), refresh_per_second=2, transient=not live
        ) as view:
            while time.monotonic() < deadline:
                await asyncio.sleep(1.0)
                if ranks.process.poll() is not None:
                    raise RuntimeError(
                        f"the ranks exited with status {ranks.process.returncode}; "
                        f"see {workdir}/ranks-ep{ranks.ep_size}.log"
                    )
                try:
                    snapshot = await source.snapshot()
                except MetricsUnavailable:
                    snapshot = None
                decision = decide(current.spec, memory, snapshot, time.time())
                memory = decision.memory
                timeline.add(snapshot, decision, ranks.ep_size)
                if decision.verb == "remap":
                    await _remap(ranks, token, decision.reason)
                elif decision.verb == "resize":
                    ranks.stop()
                    current = with_ep_size(current, decision.target_ep_size)
                    ranks = start_ranks(current, workdir, device)
                    source = source_for(ranks)
                view.update(table(snapshot, decision, timeline))
    except (KeyboardInterrupt, asyncio.CancelledError):
        pass
    finally:
        ranks.stop()
        write_report(timeline, deployment, report)
    return timeline

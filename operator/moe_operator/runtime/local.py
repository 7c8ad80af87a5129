"""The embedded default: run a MoEDeployment on this machine, with the operator's policy loop.

The StatefulSet's pods run as local processes started with the command and environment of its
pod template (one process per pod of ``gpusPerPod`` ranks, everything on 127.0.0.1; CPU and gloo
unless the deployment asks for GPUs and they exist). Every second the runtime scrapes the ranks
(or queries ``--prometheus``), runs ``policy.decide`` and acts through the operator's own
actions (``actuator.py``, with ``LocalPods`` as the group): a remap is a POST to the leader's
control API; a resize is a live elastic resize through the protocol of ``resize.py`` (scale up:
start the new pods, wait until they are ready on standby, POST /v1/ep/resize; scale down: POST
first, the retiring ranks hand their experts over and exit, then their pods go). A leader that
does not answer leaves things as they were, to be asked again next round. Like a kubelet, it
restarts a pod whose process dies; the surviving ranks take the restarted one back in and
restore its experts. It shows a live table and writes a report: a
JSON timeline and a PNG plot with the actions marked.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import yaml

from ..actuator import advance_resize, remap
from ..api.models import MoEDeployment
from ..builders import stateful_set, worker_config
from ..metrics_source import MetricsUnavailable, PrometheusSource, ScrapeSource
from ..policy import Decision, PolicyMemory, Snapshot, decide
from ..resize import ResizeProgress, begin, pods_for
from .requests import CheckAnswers, RequestDriver, mismatches, reference_answers

RESIZE_PHASE_TIMEOUT_S = 120.0


LOWEST_PORT = 10000


def ephemeral_ports() -> tuple[int, int]:
    """The range the kernel takes client ports from (Linux: ip_local_port_range)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_ports(count: int) -> int:
    """A port p such that p .. p + count - 1 are free now, below the ephemeral range when it
    leaves room: a port kept for a rank that starts later (a scale-up's pod) must not be taken
    meanwhile by one of the many client connections the run makes."""
    low, _ = ephemeral_ports()
    rng = random.Random()
    for _ in range(2000):
        if low - count > LOWEST_PORT:
            base = rng.randrange(LOWEST_PORT, low - count)
        else:  # no room below it: whatever the kernel hands out
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                base = int(sock.getsockname()[1])
            if base + count > 65535:
                continue
        try:
            for offset in range(count):
                with socket.socket() as probe:
                    probe.bind(("0.0.0.0", base + offset))
        except OSError:
            continue
        return base
    raise OSError(f"no {count} consecutive free ports found")


def rank_up(code: int, readyz: Any) -> bool:
    """Whether a rank's /readyz answer means it is up for a resize: admitting (200) or on
    standby, registered to join (503 ``standby``)."""
    return code == 200 or (isinstance(readyz, dict) and readyz.get("status") == "standby")


class LocalGpuError(ValueError):
    """The machine has too few GPUs for ``--device cuda``."""


def local_gpus(deployment: MoEDeployment, visible: list[str]) -> list[list[str]]:
    """The GPUs of each pod ordinal (one per rank, as a device plugin gives a pod its own), from
    the machine's ``visible`` GPU ids; raises LocalGpuError when there are too few for the
    largest EP size the deployment may reach."""
    parallelism, elastic = deployment.spec.parallelism, deployment.spec.elastic
    most = parallelism.expert_parallel_size
    field = "spec.parallelism.pods x gpusPerPod"
    if elastic.enabled and (elastic.max_expert_parallel_size or 0) > most:
        most = int(elastic.max_expert_parallel_size or 0)
        field = "spec.elastic.maxExpertParallelSize"
    if len(visible) < most:
        raise LocalGpuError(
            f"--device cuda: {field} = {most} ranks need {most} GPUs (one per rank); "
            f"this machine has {len(visible)}"
        )
    per_pod = parallelism.gpus_per_pod
    return [visible[first : first + per_pod] for first in range(0, most, per_pod)]


def choose_device(requested: str, deployment: MoEDeployment, visible: list[str]) -> tuple[str, str]:
    """(device, why) for ``--device``: cpu and cuda as asked; auto takes the local GPUs when
    there are enough for one per rank up to the elastic maximum, else the CPU (and gloo)."""
    if requested != "auto":
        return requested, f"--device {requested}"
    try:
        local_gpus(deployment, visible)
    except LocalGpuError as exc:
        reason = str(exc).removeprefix("--device cuda: ")
        return "cpu", f"CPU: {reason}" if visible else "CPU: no local GPU"
    return "cuda", f"local GPUs {','.join(visible)}"


def visible_gpus() -> list[str]:
    """This machine's GPU ids as CUDA sees them: CUDA_VISIBLE_DEVICES when set, else the GPUs
    `nvidia-smi -L` lists (none without the driver). No torch: the operator's image has none."""
    narrowed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if narrowed is not None:
        return [gpu.strip() for gpu in narrowed.split(",") if gpu.strip()]
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        listing = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = [line for line in listing.stdout.splitlines() if line.startswith("GPU ")]
    return [str(index) for index in range(len(gpus))]


def with_ep_size(deployment: MoEDeployment, ep_size: int) -> MoEDeployment:
    document = deployment.model_dump(by_alias=True, exclude_none=True)
    parallelism = document["spec"]["parallelism"]
    parallelism["pods"] = pods_for(ep_size, parallelism.get("gpusPerPod", 1))
    return MoEDeployment.model_validate(document)


@dataclass
class LocalPod:
    ordinal: int
    process: subprocess.Popen[bytes]
    retiring: bool = False
    started_at: float = field(default_factory=time.monotonic)


# A pod whose process exits with an error this many times in a row, each within
# CRASH_LIFETIME_S of its start, is crash-looping (Kubernetes' CrashLoopBackOff): the run ends.
CRASH_LIMIT = 3
CRASH_LIFETIME_S = 60.0


def crash_looping(exits: list[dict[str, Any]], ordinal: int) -> bool:
    """Whether pod ``ordinal``'s last CRASH_LIMIT exits were all errors soon after its start.
    ``exits``: {"pod", "code", "lived_s"} per exit, oldest first."""
    own = [e for e in exits if e["pod"] == ordinal][-CRASH_LIMIT:]
    return len(own) == CRASH_LIMIT and all(
        e["code"] != 0 and e["lived_s"] < CRASH_LIFETIME_S for e in own
    )


def last_lines(text: str, count: int = 6) -> list[str]:
    """The last ``count`` non-empty lines of a log (what its process said before it died)."""
    return [line for line in text.splitlines() if line.strip()][-count:]


class LocalPods:
    """The deployment's pods as local processes; rank r's metrics are on ``metrics_port + r``."""

    def __init__(
        self, deployment: MoEDeployment, workdir: Path, device: str, check_outputs: bool = False
    ) -> None:
        self.deployment = deployment
        self.workdir = workdir
        self.gpus_per_pod = deployment.spec.parallelism.gpus_per_pod
        self.ep_size = deployment.spec.parallelism.expert_parallel_size
        most = max(self.ep_size, deployment.spec.elastic.max_expert_parallel_size or 0)
        self.control_port = free_ports(most + 1)
        self.metrics_port = self.control_port + 1
        self.master_port = free_ports(1)
        self.token = secrets.token_urlsafe(32)
        (workdir / "token").write_text(self.token)
        self.device = device
        self.gpus = local_gpus(deployment, visible_gpus()) if device == "cuda" else []
        self.check_outputs = check_outputs
        # Serving (unless the spec asks for the simulator): pod k's API (its one rank's, or
        # the router over its ranks' on the ports after it) on api_port + k x api_span.
        self.serving = deployment.spec.simulator is None
        self.most_pods = pods_for(most, self.gpus_per_pod)
        self.api_span = self.gpus_per_pod + 1 if self.gpus_per_pod > 1 else 1
        self.api_port = free_ports(self.most_pods * self.api_span) if self.serving else 0
        self.pods: dict[int, LocalPod] = {}
        self.restarts = 0
        self.exits: list[dict[str, Any]] = []

    def _command(self, ordinal: int) -> tuple[list[str], dict[str, str]]:
        """The pod template's command and env for pod ``ordinal``, with a local config file."""
        container = stateful_set(self.deployment)["spec"]["template"]["spec"]["containers"][0]
        config = worker_config(self.deployment)
        config["device"] = self.device
        config["metrics"]["port"] = self.metrics_port + ordinal * self.gpus_per_pod
        config["control"] = {"port": self.control_port, "tokenFile": str(self.workdir / "token")}
        config["steps"] = 0
        # The simulator's own check; a serving run checks answers through the API instead.
        config["checkOutputs"] = self.check_outputs and not self.serving
        if self.serving:
            config["serving"]["port"] = self.api_port + ordinal * self.api_span
        path = self.workdir / f"worker-{ordinal}.yaml"
        path.write_text(yaml.safe_dump(config))
        env = dict(os.environ)
        for name in ("RANK", "LOCAL_RANK"):
            env.pop(name, None)
        for item in container["env"]:
            if "value" in item:
                env[item["name"]] = item["value"]
        # The pod's numba cache dir is for its read-only root filesystem; here numba's default
        # (or the caller's NUMBA_CACHE_DIR) keeps compiled kernels across runs.
        env.pop("NUMBA_CACHE_DIR", None)
        if "NUMBA_CACHE_DIR" in os.environ:
            env["NUMBA_CACHE_DIR"] = os.environ["NUMBA_CACHE_DIR"]
        if self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(self.gpus[ordinal])
        if self.device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            # Several ranks share this machine's cores; torch's default (a thread per core in
            # every rank) oversubscribes them and the collectives then wait on descheduled ranks.
            env["OMP_NUM_THREADS"] = "1"
        env.update(
            POD_NAME=f"{self.deployment.metadata.name}-{ordinal}",
            POD_NAMESPACE=self.deployment.metadata.namespace or "default",
            # Pods started later join the running group; a full restart starts at this size.
            WORLD_SIZE=str(self.ep_size),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(self.master_port),
        )
        # The template's `moe-eplb ...`, run by this interpreter (console script or not).
        command = [sys.executable, "-m", "moe_operator.cli", *container["command"][1:]]
        command[command.index("--config") + 1] = str(path)
        return command, env

    def start(self, ordinal: int) -> None:
        command, env = self._command(ordinal)
        log = open(self.workdir / f"pod-{ordinal}.log", "ab")  # noqa: SIM115 - owned by the child
        process = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.pods[ordinal] = LocalPod(ordinal, process)

    def scale_to(self, count: int) -> None:
        """Like a StatefulSet's replicas: start missing ordinals, stop those at or above count."""
        for ordinal in range(count):
            if ordinal not in self.pods:
                self.start(ordinal)
        for ordinal in sorted(o for o in self.pods if o >= count):
            self._terminate(self.pods.pop(ordinal))

    def supervise(self) -> list[str]:
        """Restart pods whose process died (restartPolicy Always); returns what happened."""
        events = []
        for ordinal, pod in list(self.pods.items()):
            code = pod.process.poll()
            if code is None:
                continue
            lived = time.monotonic() - pod.started_at
            self.exits.append({"pod": ordinal, "code": code, "t": time.time(), "lived_s": lived})
            if code == 0 and pod.retiring:
                continue  # a retired rank waits for its pod to be removed
            if crash_looping(self.exits, ordinal):
                continue  # not restarted: the run ends (see crash_loop)
            events.append(f"pod {ordinal} exited ({code}); restarted")
            self.restarts += 1
            self.start(ordinal)
        return events

    def crash_loop(self) -> str | None:
        """A crash-looping pod's last exit and its log's last lines (None: none is)."""
        for ordinal in sorted(self.pods):
            if crash_looping(self.exits, ordinal):
                code = [e["code"] for e in self.exits if e["pod"] == ordinal][-1]
                log = self.workdir / f"pod-{ordinal}.log"
                said = last_lines(log.read_text(errors="replace")) if log.exists() else []
                return (
                    f"pod {ordinal} exited {CRASH_LIMIT} times in a row within "
                    f"{CRASH_LIFETIME_S:.0f} s of starting (last exit code {code}; log {log}); "
                    "its last lines:\n" + "\n".join(f"  {line}" for line in said)
                )
        return None

    def ready_pods(self) -> int:
        """Pods whose every rank is up: ready (admitting) or on standby, waiting to join."""
        count = 0
        with httpx.Client(timeout=2.0, trust_env=False) as client:
            for ordinal in sorted(self.pods):
                ok = True
                for local in range(self.gpus_per_pod):
                    port = self.metrics_port + ordinal * self.gpus_per_pod + local
                    try:
                        answer = client.get(f"http://127.0.0.1:{port}/readyz")
                        ok = ok and rank_up(answer.status_code, answer.json())
                    except (httpx.HTTPError, ValueError):
                        ok = False
                count += ok
        return count

    def api_urls(self) -> list[str]:
        """The API of every pod the deployment may have (a router skips those not there)."""
        return [
            f"http://127.0.0.1:{self.api_port + k * self.api_span}" for k in range(self.most_pods)
        ]

    def metrics_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{self.metrics_port + r}/metrics" for r in range(self.ep_size)]

    # --- actuator.Group: what the operator's actions need of the pods ---------------------

    async def call_leader(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        url = f"http://127.0.0.1:{self.control_port}{path}"
        headers = {"Authorization": f"Bearer {self.token}"}
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http,
            http.request(method, url, json=body, headers=headers) as response,
        ):
            return response.status, await response.json(content_type=None)

    async def pods_up(self, standby_ranks: list[int]) -> int:
        """Each rank's own /readyz says whether it is up (ready or on standby)."""
        return await asyncio.to_thread(self.ready_pods)

    async def set_pods(self, count: int) -> None:
        self.scale_to(count)

    async def retiring(self, keep: int) -> None:
        for ordinal, pod in self.pods.items():
            pod.retiring = ordinal >= keep

    @staticmethod
    def _terminate(pod: LocalPod) -> None:
        if pod.process.poll() is None:
            os.killpg(pod.process.pid, signal.SIGTERM)
            try:
                pod.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(pod.process.pid, signal.SIGKILL)
                pod.process.wait()

    def stop(self) -> None:
        """SIGTERM to the leader's pod first (the stop relays to every rank), then the rest."""
        for ordinal in sorted(self.pods):
            self._terminate(self.pods[ordinal])
        self.pods.clear()


# The load generator's figures each timeline point keeps (window_summary's keys)
TRAFFIC_POINT_KEYS = (
    "requests_per_s",
    "output_tokens_per_s",
    "ttft_p50_ms",
    "ttft_p99_ms",
    "itl_p50_ms",
    "itl_p99_ms",
    "requests_in_flight",
    "requests_completed_total",
    "requests_failed_total",
)


@dataclass
class Timeline:
    started: float = field(default_factory=time.time)
    points: list[dict[str, Any]] = field(default_factory=list)
    actions: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    restarts: int = 0
    rank_summaries: list[dict[str, Any]] = field(default_factory=list)
    traffic: dict[str, Any] | None = None  # the load generator's summary of the whole run
    checks: dict[str, Any] | None = None  # answers compared with the single-process reference
    failure: str | None = None  # why the run ended early (a crash-looping pod)

    def note(self, event: str) -> None:
        self.events.append({"t": round(time.time() - self.started, 2), "event": event})

    def now(self) -> float:
        return round(time.time() - self.started, 2)

    def add(
        self,
        snapshot: Snapshot | None,
        decision: Decision,
        ep_size: int,
        traffic: dict[str, Any] | None = None,
    ) -> dict[str, Any] | None:
        """Record a snapshot (with the load generator's recent figures) and, for a remap or
        resize, the action (returned, outcome "requested" until the caller knows better)."""
        t = self.now()
        if snapshot is not None:
            point: dict[str, Any] = {
                "t": t,
                "ep_size": snapshot.ep_size,
                "balancedness": snapshot.balancedness,
                "rank_tokens_per_s": list(snapshot.rank_tokens_per_s),
                "mapping_generation": snapshot.mapping_generation,
            }
            if traffic is not None:
                point.update({key: traffic.get(key) for key in TRAFFIC_POINT_KEYS})
            self.points.append(point)
        if decision.verb not in ("remap", "resize"):
            return None
        action: dict[str, Any] = {
            "t": t,
            "action": decision.verb,
            "reason": decision.reason,
            "from_ep_size": ep_size,
            "to_ep_size": decision.target_ep_size or ep_size,
            "outcome": "requested",
            "finished_t": None,
            "mapping_generation_before": None if snapshot is None else snapshot.mapping_generation,
        }
        self.actions.append(action)
        return action


def settle_remaps(actions: list[dict[str, Any]], snapshot: Snapshot | None, t: float) -> None:
    """Accepted remaps are done once the mapping generation has moved past the one they saw."""
    if snapshot is None:
        return
    for action in actions:
        before = action.get("mapping_generation_before")
        if (
            action["action"] == "remap"
            and action["outcome"] == "accepted"
            and before is not None
            and snapshot.mapping_generation > before
        ):
            action["outcome"], action["finished_t"] = "done", t


def finish_resize(actions: list[dict[str, Any]], outcome: str, t: float) -> None:
    """The latest unfinished resize's outcome: done, or failed with the reason."""
    for action in reversed(actions):
        if action["action"] == "resize" and action["finished_t"] is None:
            action["outcome"], action["finished_t"] = outcome, t
            return


def progress_line(snapshot: Snapshot | None, decision: Decision, timeline: Timeline) -> str:
    """One line of the live table's news, for logs that are not a terminal."""
    if snapshot is None:
        state = f"metrics: {decision.reason}"
    else:
        balance = "-" if snapshot.balancedness is None else f"{snapshot.balancedness:.3f}"
        loads = snapshot.rank_tokens_per_s
        per_rank = sum(loads) / max(len(loads), 1)
        state = f"EP {snapshot.ep_size} balancedness {balance} tokens/s/rank {per_rank:.0f}"
    point = timeline.points[-1] if timeline.points else {}
    if point.get("requests_completed_total") is not None:
        state += (
            f"; requests/s {point['requests_per_s']:.1f} done {point['requests_completed_total']}"
            f" failed {point['requests_failed_total']} TTFT p99 {_ms(point.get('ttft_p99_ms'))}"
        )
    done = sum(1 for a in timeline.actions if a["outcome"] == "done")
    actions = f"actions done {done}/{len(timeline.actions)}"
    return f"t={timeline.now():.0f}s {state}; policy {decision.verb}; {actions}"


def _ms(value: Any) -> str:
    return "-" if value is None else f"{value:.0f} ms"


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
        "events": timeline.events,
        "podRestarts": timeline.restarts,
        "ranks": timeline.rank_summaries,
        "traffic": timeline.traffic,
        "checks": timeline.checks,
        "failure": timeline.failure,
    }
    path.write_text(json.dumps(report, indent=1))
    serving = any(p.get("requests_per_s") is not None for p in timeline.points)
    figure, axes = plt.subplots(
        4 if serving else 3, 1, figsize=(9, 10 if serving else 8), sharex=True
    )
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
    if serving:
        axes[3].plot(ts, [p.get("requests_per_s") for p in timeline.points], label="requests/s")
        axes[3].set_ylabel("requests/s (10 s)")
        ttft = axes[3].twinx()
        ttft.plot(
            ts,
            [p.get("ttft_p99_ms") for p in timeline.points],
            color="tab:orange",
            label="TTFT p99 (ms)",
        )
        ttft.set_ylabel("TTFT p99, ms")
        failed = [p for p in timeline.points if p.get("requests_failed_total")]
        title = (
            f"requests: {failed[-1]['requests_failed_total']} failed"
            if failed
            else "no request failed"
        )
        axes[3].set_title(title, fontsize="small")
        lines = axes[3].get_legend_handles_labels()[0] + ttft.get_legend_handles_labels()[0]
        axes[3].legend(handles=lines, loc="upper left", fontsize="small")
    axes[-1].set_xlabel("seconds")
    from matplotlib.lines import Line2D

    for action in timeline.actions:
        color = "tab:green" if action["action"] == "remap" else "tab:red"
        for axis in axes:
            axis.axvline(action["t"], color=color, alpha=0.5, linestyle=":")
            if action["outcome"] == "done" and action["finished_t"] is not None:
                axis.axvline(action["finished_t"], color=color, alpha=0.8)
    handles, _ = axes[0].get_legend_handles_labels()
    handles += [
        Line2D([], [], color="tab:green", linestyle=":", label="remap requested"),
        Line2D([], [], color="tab:green", label="remap done"),
        Line2D([], [], color="tab:red", linestyle=":", label="resize requested"),
        Line2D([], [], color="tab:red", label="resize done"),
    ]
    axes[0].legend(handles=handles, loc="lower right", fontsize="small")
    figure.suptitle(f"{deployment.metadata.name}: remaps and resizes, requested (dotted) and done")
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
    point = timeline.points[-1] if timeline.points else {}
    if point.get("requests_completed_total") is not None:
        out.add_row(
            "requests done / failed / in flight",
            f"{point['requests_completed_total']} / {point['requests_failed_total']} / "
            f"{point['requests_in_flight']}",
        )
        out.add_row(
            "requests/s, output tokens/s (10 s)",
            f"{point['requests_per_s']:.1f}, {point['output_tokens_per_s']:.0f}",
        )
        out.add_row(
            "TTFT p50 / p99, ITL p50 / p99",
            f"{_ms(point.get('ttft_p50_ms'))} / {_ms(point.get('ttft_p99_ms'))}, "
            f"{_ms(point.get('itl_p50_ms'))} / {_ms(point.get('itl_p99_ms'))}",
        )
    out.add_row("policy", f"{decision.verb}: {decision.reason}")
    for action in timeline.actions[-5:]:
        finished = "" if action["finished_t"] is None else f" at t={action['finished_t']:.0f}s"
        out.add_row(
            f"t={action['t']:.0f}s {action['action']}",
            f"{action['reason']} -> {action['outcome']}{finished}",
        )
    for event in timeline.events[-3:]:
        out.add_row(f"t={event['t']:.0f}s", event["event"])
    return out


# Seconds the run goes on after a serving deployment's traffic ends by default (the policy
# scales back down), and the longest it waits for the endpoint to serve before giving up.
SETTLE_S = 30.0
STARTUP_LIMIT_S = 600.0


async def run(
    deployment: MoEDeployment,
    duration: float | None,
    report: Path,
    prometheus: str | None = None,
    device: str = "cpu",
    live: bool = True,
    check_outputs: bool = False,
    api_port: int = 0,
) -> Timeline:
    """Run until ``duration`` seconds pass (or Ctrl-C); returns the timeline (also written).
    ``duration`` None: a serving deployment runs until ``workload.durationS + SETTLE_S`` after
    its traffic started, however long the pods took to come up (``STARTUP_LIMIT_S`` at most);
    the simulator for 120 s.

    A serving deployment (no ``spec.simulator``) gets one endpoint on ``api_port`` (0: a free
    port) over its ranks' APIs, and the spec's ``workload`` traffic is sent to it from the
    moment it serves until the duration ends; the pods stop once the requests in flight end.
    With ``check_outputs``, check requests' greedy answers are compared with a single-process
    reference at the end."""
    from rich.live import Live

    workdir = report.parent / f".{deployment.metadata.name}-run"
    workdir.mkdir(parents=True, exist_ok=True)
    for old_log in workdir.glob("pod-*.log"):  # a previous run's: its summaries are not ours
        old_log.unlink()
    pods = LocalPods(deployment, workdir, device, check_outputs)
    pods.scale_to(pods_for(pods.ep_size, pods.gpus_per_pod))
    driver = None
    if pods.serving:
        driver = RequestDriver(
            pods.api_urls(),
            f"http://127.0.0.1:{pods.control_port}",
            deployment.spec.workload,
            check_outputs,
            api_port,
        )
    checks = None if driver is None else driver.checks
    current = deployment
    timeline = Timeline()
    memory = PolicyMemory()
    started_at = time.monotonic()
    if duration is not None:
        deadline = started_at + duration
    elif driver is not None:
        deadline = started_at + STARTUP_LIMIT_S  # moved once the traffic starts
    else:
        deadline = started_at + 120.0
    resize: ResizeProgress | None = None

    def source_for() -> PrometheusSource | ScrapeSource:
        """The metrics of the ranks serving now (Prometheus, or a scrape of each)."""
        if prometheus:
            meta = current.metadata
            return PrometheusSource(prometheus, meta.namespace or "default", meta.name)
        return ScrapeSource(pods.metrics_urls())

    source = source_for()
    console_is_terminal = sys.stdout.isatty()
    last_line = [0.0]
    decision = Decision("none", "starting")
    snapshot: Snapshot | None = None
    try:
        with Live(
            table(None, decision, timeline), refresh_per_second=2, transient=not live
        ) as view:
            while time.monotonic() < deadline:
                await asyncio.sleep(1.0)
                for event in pods.supervise():
                    timeline.note(event)
                timeline.failure = pods.crash_loop()
                if timeline.failure is not None:
                    timeline.note(timeline.failure.splitlines()[0])
                    break
                if resize is not None:
                    action, resize, why = await advance_resize(
                        pods, resize, pods.gpus_per_pod, time.time(), RESIZE_PHASE_TIMEOUT_S
                    )
                    if action in ("done", "failed"):
                        outcome = "done" if action == "done" else f"failed: {why}"
                        timeline.note(f"resize to {resize.to_ep_size}: {outcome}")
                        finish_resize(timeline.actions, outcome, timeline.now())
                        if action == "done":
                            pods.ep_size = resize.to_ep_size
                        else:  # the group keeps serving at its size, on its pods
                            kept = pods_for(pods.ep_size, pods.gpus_per_pod)
                            await pods.retiring(kept)
                            pods.scale_to(kept)
                        current = with_ep_size(current, pods.ep_size)
                        source = source_for()
                        resize = None
                traffic = None
                if driver is not None:
                    started = await driver.tick(timeline.now(), pods.ep_size)
                    if started is not None:
                        timeline.note(started)
                        if duration is None:
                            workload = deployment.spec.workload.duration_s
                            deadline = time.monotonic() + workload + SETTLE_S
                    traffic = driver.recent()
                try:
                    snapshot = await source.snapshot()
                except MetricsUnavailable:
                    snapshot = None
                settle_remaps(timeline.actions, snapshot, timeline.now())
                decision = decide(current.spec, memory, snapshot, time.time())
                remembered, memory = memory, decision.memory
                recorded = timeline.add(snapshot, decision, pods.ep_size, traffic)
                if decision.verb == "remap" and recorded is not None:
                    answer = await remap(pods, decision.reason)
                    recorded["outcome"] = (
                        answer.outcome if answer.ok else f"failed: {answer.outcome}"
                    )
                    if not answer.ok:
                        memory = remembered  # not done: the policy asks again next round
                elif decision.verb == "resize" and recorded is not None:
                    if resize is None:
                        resize = begin(pods.ep_size, decision.target_ep_size, time.time())
                        recorded["outcome"] = "accepted"
                    else:
                        recorded["outcome"] = "refused: a resize is already running"
                view.update(table(snapshot, decision, timeline))
                if not console_is_terminal and timeline.now() - last_line[0] >= 5.0:
                    last_line[0] = timeline.now()
                    print(progress_line(snapshot, decision, timeline), flush=True)
        if driver is not None:  # the requests in flight end before the pods go
            timeline.note("traffic stopped; waiting for the requests in flight")
            timeline.traffic = await driver.finish()
            driver = None
    except (KeyboardInterrupt, asyncio.CancelledError):
        pass
    finally:
        if driver is not None:
            timeline.traffic = await driver.finish(timeout_s=10.0)
        pods.stop()
        timeline.restarts = pods.restarts
        timeline.rank_summaries = read_summaries(workdir)
        if pods.serving and check_outputs:
            timeline.checks = check_report(pods, workdir, checks)
        write_report(timeline, deployment, report)
    return timeline


def check_report(pods: LocalPods, workdir: Path, checks: CheckAnswers | None) -> dict[str, Any]:
    """The check requests' answers against the single-process reference's."""
    if checks is None or not checks.answers:
        return {"checked": 0, "mismatches": [], "errors": [] if checks is None else checks.errors}
    try:
        references = reference_answers(workdir / "worker-0.yaml", checks.prompts, workdir)
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        return {"checked": 0, "mismatches": [], "errors": [*checks.errors, str(exc)]}
    wrong = mismatches(checks.answers, references)
    return {
        "checked": len(checks.answers),
        "epSizes": sorted({a["epSize"] for a in checks.answers}),
        "mismatches": wrong,
        "errors": checks.errors,
    }


def read_summaries(workdir: Path) -> list[dict[str, Any]]:
    """The JSON summary line every rank printed when it exited (retired or stopped)."""
    out = []
    for log in sorted(workdir.glob("pod-*.log")):
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("{") and '"rank"' in line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return out

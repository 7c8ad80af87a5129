"""One policy round for a MoEDeployment: read metrics, decide (``policy.decide``), act.

Actions: a remap is ``POST /v1/eplb/rebalance`` to the leader rank's control API (bearer token
from the deployment's Secret); a resize sets ``spec.parallelism.pods`` through the CR's
``scale`` subresource, the same path as ``kubectl scale`` and an HPA. With elastic on,
``resize_round`` then carries the change out live (``resize.py``: pods up, POST
/v1/ep/resize, pods down), its progress in ``status.resize`` so an operator restart resumes it;
without elastic, the reconcile handlers re-deploy at the new size. The policy memory is written
to ``status.policy``.

Ranks are reached at ``MOE_OPERATOR_POD_HOST`` (a template over {pod}, {name}, {namespace};
default ``{pod}.{name}-ranks.{namespace}.svc``, the headless Service's DNS).
"""

from __future__ import annotations

import base64
import os
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from .api.models import GROUP, KIND, VERSION, MoEDeployment
from .builders import control_port
from .k8s import KubeClient, KubeError
from .metrics_source import MetricsUnavailable, PrometheusSource, ScrapeSource
from .policy import Decision, decide, memory_from_status, memory_to_status
from .resize import (
    ResizeObservation,
    begin,
    pods_for,
    pods_up,
    progress_from_status,
    progress_to_status,
    serving_ep_size,
)
from .resize import step as resize_step
from .status import size_status

POD_HOST = os.environ.get("MOE_OPERATOR_POD_HOST", "{pod}.{name}-ranks.{namespace}.svc")
RESIZE_PHASE_TIMEOUT_S = float(os.environ.get("MOE_OPERATOR_RESIZE_PHASE_SECONDS", "600"))


def rank_host(deployment: MoEDeployment, ordinal: int) -> str:
    name = deployment.metadata.name
    return POD_HOST.format(
        pod=f"{name}-{ordinal}",
        name=name,
        namespace=deployment.metadata.namespace or "default",
        ordinal=ordinal,
    )


def metrics_urls(deployment: MoEDeployment, ep_size: int | None = None) -> list[str]:
    """Every serving rank's /metrics, in rank order (rank = ordinal x gpusPerPod + local)."""
    spec = deployment.spec
    gpus = spec.parallelism.gpus_per_pod
    ranks = spec.parallelism.expert_parallel_size if ep_size is None else ep_size
    return [
        f"http://{rank_host(deployment, rank // gpus)}:{spec.metrics.port + rank % gpus}/metrics"
        for rank in range(ranks)
    ]


@dataclass
class Sources:
    """Metrics sources kept across rounds (a direct scrape needs the previous one for rates)."""

    by_uid: dict[str, Any] = field(default_factory=dict)

    def get(
        self, uid: str, deployment: MoEDeployment, ep_size: int
    ) -> PrometheusSource | ScrapeSource:
        """The source for the ``ep_size`` ranks serving now."""
        url = deployment.spec.metrics.prometheus_url
        key = (url, ep_size)
        cached = self.by_uid.get(uid)
        if cached is not None and cached[0] == key:
            return cached[1]  # type: ignore[no-any-return]
        source: PrometheusSource | ScrapeSource
        if url:
            meta = deployment.metadata
            source = PrometheusSource(url, meta.namespace or "default", meta.name)
        else:
            source = ScrapeSource(metrics_urls(deployment, ep_size))
        self.by_uid[uid] = (key, source)
        return source


@dataclass
class PolicyRound:
    decision: Decision
    status: dict[str, Any]
    event: tuple[str, str, str] | None = None  # (type, reason, message)
    metrics_problem: str | None = None


async def _token(kube: KubeClient, deployment: MoEDeployment) -> str:
    name, namespace = deployment.metadata.name, deployment.metadata.namespace
    secret = await kube.get("v1", "Secret", namespace, f"{name}-control")
    if not secret:
        raise KubeError(404, f"Secret {name}-control not found")
    return base64.b64decode(secret["data"]["token"]).decode()


async def call_leader(
    kube: KubeClient, deployment: MoEDeployment, method: str, path: str, body: Any = None
) -> tuple[int, Any]:
    """One control-API request to the leader rank: (HTTP status, JSON body)."""
    url = f"http://{rank_host(deployment, 0)}:{control_port(deployment)}{path}"
    headers = {"Authorization": f"Bearer {await _token(kube, deployment)}"}
    timeout = aiohttp.ClientTimeout(total=10)
    async with (
        aiohttp.ClientSession(timeout=timeout) as http,
        http.request(method, url, json=body, headers=headers) as response,
    ):
        return response.status, await response.json(content_type=None)


async def request_remap(kube: KubeClient, deployment: MoEDeployment, reason: str) -> str:
    """Ask the leader for a rebalance; returns how it answered."""
    code, body = await call_leader(
        kube, deployment, "POST", "/v1/eplb/rebalance", {"reason": reason}
    )
    if code == 202:
        return "accepted"
    if code == 409:
        return "already running"
    raise KubeError(code, f"the leader answered {code}: {body}")


async def leader_state(kube: KubeClient, deployment: MoEDeployment) -> dict[str, Any] | None:
    """The leader's GET /v1/state, or None when it cannot be reached."""
    try:
        code, body = await call_leader(kube, deployment, "GET", "/v1/state")
    except (aiohttp.ClientError, TimeoutError, ValueError, KubeError):
        return None
    return body if code == 200 and isinstance(body, dict) else None


@dataclass
class ResizeRound:
    status: dict[str, Any]
    event: tuple[str, str, str] | None = None


async def resize_round(
    kube: KubeClient,
    deployment: MoEDeployment,
    status: dict[str, Any],
    now: float | None = None,
    phase_timeout_s: float = RESIZE_PHASE_TIMEOUT_S,
) -> ResizeRound:
    """Carry a live resize one step further (elastic on): see ``resize.step``.

    Starts one when the leader serves at a size other than the spec's; records the size it
    serves at in ``status.expertParallelSize``; the progress goes to ``status.resize``.
    """
    now = time.time() if now is None else now
    spec, meta = deployment.spec, deployment.metadata
    state = await leader_state(kube, deployment)
    serving = None
    if state is not None and not state.get("resizing"):
        serving = int(state["epSize"])
    patch: dict[str, Any] = {}
    if serving is not None:
        patch.update(size_status(serving, spec.parallelism.gpus_per_pod))
    progress = progress_from_status(status.get("resize"))
    target = spec.parallelism.expert_parallel_size
    event = None
    if progress is None:
        if serving is None or serving == target:
            return ResizeRound(patch)
        progress = begin(serving, target, now)
        event = ("Normal", "Resizing", f"live resize of EP {serving} -> {target} started")
    sts = await kube.get("apps/v1", "StatefulSet", meta.namespace, meta.name) or {}
    gpus = spec.parallelism.gpus_per_pod
    ready_replicas = int((sts.get("status") or {}).get("readyReplicas") or 0)
    ready = pods_up(ready_replicas, list((state or {}).get("standbyRanks") or []), gpus)
    action, progress = resize_step(
        progress, ResizeObservation(ready, serving), gpus, now, phase_timeout_s
    )
    if action == "set-pods":
        replicas = pods_for(progress.to_ep_size, gpus)
        if (sts.get("spec") or {}).get("replicas") != replicas:
            await kube.patch(
                "apps/v1",
                "StatefulSet",
                meta.namespace,
                meta.name,
                {"spec": {"replicas": replicas}},
            )
    elif action == "post-resize":
        code, body = await call_leader(
            kube, deployment, "POST", "/v1/ep/resize", {"epSize": progress.to_ep_size}
        )
        if code not in (202, 409) and not (code == 422 and "already" in str(body)):
            action = "failed"
            event = ("Warning", "ResizeFailed", f"the leader answered {code}: {body}")
    if action == "done":
        patch.update(size_status(progress.to_ep_size, gpus))
        patch["resize"] = None
        event = ("Normal", "Resized", f"EP {progress.from_ep_size} -> {progress.to_ep_size} live")
    elif action == "failed":
        patch["resize"] = None
        event = event or (
            "Warning",
            "ResizeFailed",
            f"EP {progress.from_ep_size} -> {progress.to_ep_size}: phase {progress.phase} "
            f"took over {phase_timeout_s:.0f} s; the group keeps serving at its size",
        )
    else:
        patch["resize"] = progress_to_status(progress)
    return ResizeRound(patch, event)


async def policy_round(
    kube: KubeClient,
    deployment: MoEDeployment,
    uid: str,
    status: dict[str, Any],
    sources: Sources,
    now: float | None = None,
) -> PolicyRound:
    now = time.time() if now is None else now
    memory = memory_from_status(status.get("policy"))
    problem = None
    try:
        serving = serving_ep_size(deployment.spec, status)
        snapshot = await sources.get(uid, deployment, serving).snapshot()
    except MetricsUnavailable as exc:
        snapshot, problem = None, str(exc)
    decision = decide(deployment.spec, memory, snapshot, now)
    if decision.verb == "unavailable" and problem is None:
        problem = decision.reason
    patch: dict[str, Any] = {"policy": memory_to_status(decision.memory)}
    if snapshot is not None and snapshot.balancedness is not None:
        patch["balancedness"] = f"{snapshot.balancedness:.3f}"
    if snapshot is not None:
        patch["mappingGeneration"] = snapshot.mapping_generation
        patch["topologyGeneration"] = snapshot.topology_generation
    event = None
    meta = deployment.metadata
    if decision.verb == "remap":
        try:
            answer = await request_remap(kube, deployment, decision.reason)
            event = ("Normal", "Remap", f"remap requested ({answer}): {decision.reason}")
        except (aiohttp.ClientError, TimeoutError, KubeError) as exc:
            patch["policy"] = memory_to_status(memory)  # not done: try again next round
            event = ("Warning", "RemapFailed", f"{decision.reason}; the leader said: {exc}")
    elif decision.verb == "resize":
        gpus_per_pod = deployment.spec.parallelism.gpus_per_pod
        await kube.patch(
            f"{GROUP}/{VERSION}",
            KIND,
            meta.namespace,
            meta.name,
            {"spec": {"replicas": pods_for(decision.target_ep_size, gpus_per_pod)}},
            "scale",
        )
        event = (
            "Normal",
            "Resize",
            f"EP size {deployment.spec.parallelism.expert_parallel_size} -> "
            f"{decision.target_ep_size}: {decision.reason}",
        )
    return PolicyRound(decision, patch, event, problem)

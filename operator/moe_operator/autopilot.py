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

from .actuator import advance_resize, leader_state, remap, serving_size
from .api.models import GROUP, KIND, VERSION, MoEDeployment
from .builders import control_port
from .k8s import KubeClient, KubeError
from .metrics_source import MetricsUnavailable, PrometheusSource, ScrapeSource
from .policy import Decision, decide, memory_from_status, memory_to_status
from .resize import (
    begin,
    pods_for,
    pods_up,
    progress_from_status,
    progress_to_status,
    serving_ep_size,
)
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


@dataclass
class KubeGroup:
    """The deployment's ranks in a cluster (``actuator.Group``): the leader behind the headless
    Service, the StatefulSet's pods."""

    kube: KubeClient
    deployment: MoEDeployment
    _sts: dict[str, Any] | None = None  # read once per round (a group lives for one round)

    async def call_leader(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        return await call_leader(self.kube, self.deployment, method, path, body)

    async def _statefulset(self) -> dict[str, Any]:
        if self._sts is None:
            meta = self.deployment.metadata
            found = await self.kube.get("apps/v1", "StatefulSet", meta.namespace, meta.name)
            self._sts = found or {}
        return self._sts

    async def pods_up(self, standby_ranks: list[int]) -> int:
        sts = await self._statefulset()
        ready = int((sts.get("status") or {}).get("readyReplicas") or 0)
        return pods_up(ready, standby_ranks, self.deployment.spec.parallelism.gpus_per_pod)

    async def set_pods(self, count: int) -> None:
        if ((await self._statefulset()).get("spec") or {}).get("replicas") != count:
            meta = self.deployment.metadata
            patch = {"spec": {"replicas": count}}
            await self.kube.patch("apps/v1", "StatefulSet", meta.namespace, meta.name, patch)

    async def retiring(self, keep: int) -> None:
        """Nothing to do: the StatefulSet removes the highest ordinals when lowered."""


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
    spec = deployment.spec
    gpus = spec.parallelism.gpus_per_pod
    group = KubeGroup(kube, deployment)
    state = await leader_state(group)
    serving = serving_size(state)
    patch: dict[str, Any] = {}
    if serving is not None:
        patch.update(size_status(serving, gpus))
    progress = progress_from_status(status.get("resize"))
    target = spec.parallelism.expert_parallel_size
    event = None
    if progress is None:
        if serving is None or serving == target:
            return ResizeRound(patch)
        progress = begin(serving, target, now)
        event = ("Normal", "Resizing", f"live resize of EP {serving} -> {target} started")
    action, progress, why = await advance_resize(group, progress, gpus, now, phase_timeout_s, state)
    if action == "done":
        patch.update(size_status(progress.to_ep_size, gpus))
        patch["resize"] = None
        event = ("Normal", "Resized", f"EP {progress.from_ep_size} -> {progress.to_ep_size} live")
    elif action == "failed":
        patch["resize"] = None
        message = f"EP {progress.from_ep_size} -> {progress.to_ep_size}: {why}"
        event = ("Warning", "ResizeFailed", message)
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
        answer = await remap(KubeGroup(kube, deployment), decision.reason)
        if answer.ok:
            event = ("Normal", "Remap", f"remap requested ({answer.outcome}): {decision.reason}")
        else:
            patch["policy"] = memory_to_status(memory)  # not done: try again next round
            event = ("Warning", "RemapFailed", f"{decision.reason}; {answer.outcome}")
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

"""One policy round for a MoEDeployment: read metrics, decide (``policy.decide``), act.

Actions: a remap is ``POST /v1/eplb/rebalance`` to the leader rank's control API (bearer token
from the deployment's Secret); a resize sets ``spec.parallelism.expertParallelSize`` through the
CR's ``scale`` subresource, the same path as ``kubectl scale``, which the reconcile handlers turn
into a StatefulSet and worker-config change. The policy memory is written to ``status.policy``.

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

POD_HOST = os.environ.get("MOE_OPERATOR_POD_HOST", "{pod}.{name}-ranks.{namespace}.svc")


def rank_host(deployment: MoEDeployment, ordinal: int) -> str:
    name = deployment.metadata.name
    return POD_HOST.format(
        pod=f"{name}-{ordinal}", name=name, namespace=deployment.metadata.namespace or "default"
    )


def metrics_urls(deployment: MoEDeployment) -> list[str]:
    """Every rank's /metrics, in rank order (rank = ordinal x gpusPerPod + local rank)."""
    spec = deployment.spec
    return [
        f"http://{rank_host(deployment, ordinal)}:{spec.metrics.port + local}/metrics"
        for ordinal in range(spec.pods)
        for local in range(spec.parallelism.gpus_per_pod)
    ]


@dataclass
class Sources:
    """Metrics sources kept across rounds (a direct scrape needs the previous one for rates)."""

    by_uid: dict[str, Any] = field(default_factory=dict)

    def get(self, uid: str, deployment: MoEDeployment) -> PrometheusSource | ScrapeSource:
        url = deployment.spec.metrics.prometheus_url
        key = (url, deployment.spec.parallelism.expert_parallel_size)
        cached = self.by_uid.get(uid)
        if cached is not None and cached[0] == key:
            return cached[1]  # type: ignore[no-any-return]
        source: PrometheusSource | ScrapeSource
        if url:
            meta = deployment.metadata
            source = PrometheusSource(url, meta.namespace or "default", meta.name)
        else:
            source = ScrapeSource(metrics_urls(deployment))
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


async def request_remap(kube: KubeClient, deployment: MoEDeployment, reason: str) -> str:
    """Ask the leader for a rebalance; returns how it answered."""
    url = f"http://{rank_host(deployment, 0)}:{control_port(deployment)}/v1/eplb/rebalance"
    headers = {"Authorization": f"Bearer {await _token(kube, deployment)}"}
    timeout = aiohttp.ClientTimeout(total=10)
    async with (
        aiohttp.ClientSession(timeout=timeout) as http,
        http.post(url, json={"reason": reason}, headers=headers) as response,
    ):
        if response.status == 202:
            return "accepted"
        if response.status == 409:
            return "already running"
        raise aiohttp.ClientResponseError(
            response.request_info, (), status=response.status, message=await response.text()
        )


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
        snapshot = await sources.get(uid, deployment).snapshot()
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
        await kube.patch(
            f"{GROUP}/{VERSION}",
            KIND,
            meta.namespace,
            meta.name,
            {"spec": {"replicas": decision.target_ep_size}},
            "scale",
        )
        event = (
            "Normal",
            "Resize",
            f"EP size {deployment.spec.parallelism.expert_parallel_size} -> "
            f"{decision.target_ep_size}: {decision.reason}",
        )
    return PolicyRound(decision, patch, event, problem)

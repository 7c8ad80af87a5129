"""A HorizontalPodAutoscaler's sizing, as Kubernetes documents it, against a scale subresource.

For a ``Pods`` metric with an ``AverageValue`` target the HPA takes the pods its target's
``/scale`` selector selects, averages the metric over the ready ones and sets
``desired = ceil(ready pods x average / target)``, leaving the size alone while the ratio is
within the tolerance (0.1), clamped to ``[minReplicas, maxReplicas]``; it writes ``desired`` to
the target's ``/scale`` ``spec.replicas``. This module does that, one round at a time, through
the API (``GET`` and ``PATCH`` of ``/scale``, a pod list) so a test can run it beside the
operator.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from moe_operator.k8s import KubeClient, resource_path


def desired_replicas(
    current: int,
    ready_pod_values: list[float],
    target: float,
    min_replicas: int,
    max_replicas: int,
    tolerance: float = 0.1,
) -> int:
    """The HPA's replicas for one round (the pods' metric values, ready pods only)."""
    if not ready_pod_values:
        return current
    ratio = sum(ready_pod_values) / len(ready_pod_values) / target
    if abs(ratio - 1.0) <= tolerance:
        desired = current
    else:
        desired = math.ceil(ratio * len(ready_pod_values))
    return max(min_replicas, min(max_replicas, desired))


def selected(labels: dict[str, str], selector: str) -> bool:
    """Whether ``labels`` match an equality-based selector string ("a=b,c=d")."""
    wanted = dict(term.split("=", 1) for term in selector.split(",") if term)
    return all(labels.get(key) == value for key, value in wanted.items())


@dataclass
class Autoscaler:
    """One HPA over ``kind``/``name`` in ``namespace``, the metric read per pod name."""

    kube: KubeClient
    api_version: str
    kind: str
    namespace: str
    name: str
    target: float
    min_replicas: int
    max_replicas: int

    async def round(self, metric: Callable[[str], float]) -> tuple[int, int]:
        """(replicas before, replicas written) after one sizing round."""
        host = self.kube.api.configuration.host
        path = resource_path(self.api_version, self.kind, self.namespace, self.name)
        scale = await api_call(host, "GET", f"{path}/scale")
        assert scale["kind"] == "Scale"
        current = int(scale["spec"]["replicas"])
        selector = str(scale["status"]["selector"])
        assert selector, "the scale subresource must give a selector"
        listing = await api_call(host, "GET", f"/api/v1/namespaces/{self.namespace}/pods")
        ready = [
            p["metadata"]["name"]
            for p in listing["items"]
            if selected(p["metadata"].get("labels") or {}, selector) and _ready(p)
        ]
        desired = desired_replicas(
            current,
            [metric(name) for name in ready],
            self.target,
            self.min_replicas,
            self.max_replicas,
        )
        if desired != current:
            await self.kube.patch(
                self.api_version,
                self.kind,
                self.namespace,
                self.name,
                {"spec": {"replicas": desired}},
                "scale",
            )
        return current, desired


async def api_call(host: str, method: str, path: str, body: Any = None) -> Any:
    """One JSON request to the API server at ``host``; fails the test on an error status."""
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, host + path, json=body) as reply,
    ):
        assert reply.status < 300, f"{method} {path}: {reply.status} {await reply.text()}"
        return await reply.json()


def _ready(pod: dict[str, Any]) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)

"""One reconcile round of a MoEDeployment: validate, bring every child to its manifest, observe.

Idempotent: a round against children that already match makes no writes, so an operator restart
(``on.resume``) or a periodic resync never duplicates or recreates anything; a child deleted by
hand is created again. The control token is generated only when its Secret does not exist.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .api.models import MoEDeployment
from .builders import children, endpoint, selector_string
from .drift import plan_child
from .k8s import KubeClient, KubeError
from .resize import desired_pods, progress_from_status, serving_ep_size
from .status import Observed
from .validation import problems


@dataclass
class Round:
    """What one round did (``actions``: "created StatefulSet/x", ...) and observed."""

    observed: Observed
    actions: list[str] = field(default_factory=list)
    deployment: MoEDeployment | None = None


def document_of(body: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a MoEDeployment object that the API models validate (no status, no
    server-set metadata)."""
    meta = body.get("metadata") or {}
    return {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": {"name": meta.get("name"), "namespace": meta.get("namespace")},
        "spec": body.get("spec"),
    }


def _observed(
    body: Mapping[str, Any],
    deployment: MoEDeployment | None,
    statefulset: Mapping[str, Any] | None = None,
    problem: tuple[str, str] | None = None,
) -> Observed:
    meta = body.get("metadata") or {}
    name = str(meta.get("name"))
    sts_status = (statefulset or {}).get("status") or {}
    sts_meta = (statefulset or {}).get("metadata") or {}
    status = dict(body.get("status") or {})
    ep_size = serving_ep_size(deployment.spec, status) if deployment else 0
    gpus = deployment.spec.parallelism.gpus_per_pod if deployment else 1
    return Observed(
        generation=int(meta.get("generation") or 0),
        ep_size=ep_size,
        gpus_per_pod=gpus,
        selector=selector_string(name),
        pods_wanted=desired_pods(deployment.spec, status) if deployment else 0,
        pods_ready=int(sts_status.get("readyReplicas") or 0),
        pods_updated=int(sts_status.get("updatedReplicas") or 0),
        sts_observed_generation=sts_status.get("observedGeneration"),
        sts_generation=sts_meta.get("generation"),
        problem=problem,
        resize=_resize_words(status) if deployment else None,
        endpoint=endpoint(deployment) if deployment else None,
    )


def _resize_words(status: Mapping[str, Any]) -> str | None:
    progress = progress_from_status(status.get("resize"))
    if progress is None:
        return None
    return f"EP {progress.from_ep_size} -> {progress.to_ep_size}: {progress.phase}"


async def reconcile(kube: KubeClient, body: Mapping[str, Any], with_pod_monitor: bool) -> Round:
    """Validate the spec; create or patch each child; read back the StatefulSet's status.

    An invalid spec yields a round with ``problem`` ("InvalidSpec", every problem) and no
    writes; an API failure propagates as ``KubeError`` after the children done so far.
    """
    found = problems(document_of(body))
    if found:
        return Round(_observed(body, None, problem=("InvalidSpec", "; ".join(found))))
    deployment = MoEDeployment.model_validate(document_of(body))
    uid = (body.get("metadata") or {}).get("uid")
    manifests = children(
        deployment,
        secrets.token_urlsafe(32),
        owner_uid=uid,
        with_pod_monitor=with_pod_monitor,
        pods=desired_pods(deployment.spec, dict(body.get("status") or {})),
    )
    actions: list[str] = []
    statefulset: dict[str, Any] | None = None
    for desired in manifests:
        api_version, kind = desired["apiVersion"], desired["kind"]
        namespace, name = desired["metadata"].get("namespace"), desired["metadata"]["name"]
        live = await kube.get(api_version, kind, namespace, name)
        action = plan_child(live, desired)
        if action.verb == "create":
            try:
                live = await kube.create(action.body)
                actions.append(f"created {kind}/{name}")
            except KubeError as exc:
                if exc.status != 409:  # 409: a concurrent round created it first
                    raise
                live = await kube.get(api_version, kind, namespace, name)
                action = plan_child(live, desired)
        if action.verb == "patch":
            live = await kube.patch(api_version, kind, namespace, name, action.body)
            actions.append(f"updated {kind}/{name}")
        if kind == "StatefulSet":
            statefulset = live
    return Round(_observed(body, deployment, statefulset), actions, deployment)

"""Kopf glue: handler registration, events and status writes. Decisions live elsewhere.

Run with ``kopf run -m moe_operator.handlers --all-namespaces`` (or ``--namespace NS``).
Environment: ``MOE_OPERATOR_RESYNC_SECONDS`` (period of the reconcile timer, default 30),
``MOE_OPERATOR_WEBHOOK_PORT`` (serve the validating admission webhook on this port; unset: no
webhook), ``MOE_OPERATOR_WEBHOOK_CERT_DIR`` (``tls.crt``/``tls.key``; unset: plain HTTP, for
tests only), ``MOE_OPERATOR_METRICS_PORT`` (the operator's own /metrics, default 8080; 0: off),
``MOE_OPERATOR_POLICY_SECONDS`` (period of the remap/resize policy round, default 15),
``MOE_OPERATOR_POD_HOST`` (how ranks are reached, see ``autopilot``),
``MOE_OPERATOR_NAMESPACED`` (``true`` with ``--namespace`` arguments: the watched namespaces are
fixed, so Kopf scans neither namespaces nor CRDs cluster-wide, which a namespaced Role forbids).

Kopf keeps its own bookkeeping in annotations prefixed ``kopf.moe.eplb.dev`` (never in our
``status``), and the operator writes ``status`` through the status subresource itself.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import kopf
import prometheus_client

from . import metrics
from .api.models import GROUP, PLURAL, VERSION, MoEDeployment
from .autopilot import Sources, policy_round, resize_round
from .k8s import KubeClient, KubeError, bearer_token, load_configuration
from .reconcile import Round, _observed, document_of, reconcile
from .status import METRICS_UNAVAILABLE, compute_status, now_rfc3339, set_condition
from .validation import admission_problems
from .validation import problems as validation_problems

RESYNC_SECONDS = float(os.environ.get("MOE_OPERATOR_RESYNC_SECONDS", "30"))
WEBHOOK_PORT = os.environ.get("MOE_OPERATOR_WEBHOOK_PORT")
WEBHOOK_CERT_DIR = os.environ.get("MOE_OPERATOR_WEBHOOK_CERT_DIR")
POLICY_SECONDS = float(os.environ.get("MOE_OPERATOR_POLICY_SECONDS", "15"))
METRICS_PORT = int(os.environ.get("MOE_OPERATOR_METRICS_PORT", "8080"))
RESOURCE = (GROUP, VERSION, PLURAL)
# (apiGroup, resource, verbs) of the calls Kopf makes for these handlers (watching, its
# annotations and finalizer, events). With the operator's own calls (k8s.API_CALLS) this is
# exactly what the chart's RBAC grants; CLUSTER_WIDE_CALLS only when watching all namespaces.
KOPF_API_CALLS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    (GROUP, PLURAL, ("list", "watch", "patch")),
    ("", "events", ("create",)),
)
CLUSTER_WIDE_CALLS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("apiextensions.k8s.io", "customresourcedefinitions", ("list", "watch")),
)
logger = logging.getLogger("moe_operator")


@kopf.on.login()
async def login(**_: Any) -> kopf.ConnectionInfo:
    """Kopf uses the same credentials as the operator's own client."""
    configuration = await load_configuration()
    return kopf.ConnectionInfo(
        server=str(configuration.host),
        token=await bearer_token(configuration),
        ca_path=configuration.ssl_ca_cert,
        insecure=not configuration.verify_ssl,
        certificate_path=configuration.cert_file,
        private_key_path=configuration.key_file,
        default_namespace=os.environ.get("POD_NAMESPACE"),
    )


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    prefix = f"kopf.{GROUP}"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=prefix)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=prefix, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{GROUP}/operator"
    # Our own events say what happened; Kopf posts only its warnings and errors.
    settings.posting.level = logging.WARNING
    settings.networking.request_timeout = 60
    settings.watching.server_timeout = 300
    settings.scanning.disabled = os.environ.get("MOE_OPERATOR_NAMESPACED") == "true"
    if WEBHOOK_PORT:
        settings.admission.server = kopf.WebhookServer(
            addr="0.0.0.0",
            port=int(WEBHOOK_PORT),
            insecure=not WEBHOOK_CERT_DIR,
            certfile=os.path.join(WEBHOOK_CERT_DIR, "tls.crt") if WEBHOOK_CERT_DIR else None,
            pkeyfile=os.path.join(WEBHOOK_CERT_DIR, "tls.key") if WEBHOOK_CERT_DIR else None,
        )
    if METRICS_PORT and not getattr(configure, "metrics_started", False):
        prometheus_client.start_http_server(METRICS_PORT)
        configure.metrics_started = True  # type: ignore[attr-defined]
    memo.sources = Sources()  # shared by every deployment's policy round
    memo.kube = await KubeClient.connect()
    memo.pod_monitor = await memo.kube.has_api("monitoring.coreos.com/v1", "podmonitors")
    logger.info("PodMonitor support: %s", memo.pod_monitor)


@kopf.on.cleanup()
async def disconnect(memo: kopf.Memo, **_: Any) -> None:
    kube = getattr(memo, "kube", None)
    memo.closing = True
    if kube is not None:
        await kube.close()


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


async def _write_status(kube: KubeClient, body: Mapping[str, Any], rnd: Round) -> None:
    previous = _plain(body.get("status") or {})
    status = compute_status(rnd.observed, previous, now_rfc3339())
    if any(previous.get(key) != value for key, value in status.items()):
        meta = body["metadata"]
        await kube.patch_status(meta["namespace"], meta["name"], status)


def _degraded_with(body: Mapping[str, Any], reason: str, message: str) -> bool:
    for condition in (body.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Degraded":
            return bool(
                condition.get("status") == "True"
                and condition.get("reason") == reason
                and condition.get("message") == message
            )
    return False


async def reconcile_and_report(body: kopf.Body, memo: kopf.Memo) -> None:
    """One round: children, then one Event per action, then the status."""
    kube: KubeClient = memo.kube
    meta = body["metadata"]
    labels = (meta["namespace"], meta["name"])
    for verb in ("remap", "resize"):
        # The action series exist from 0 long before any action, so the first one shows.
        metrics.ACTIONS.labels(*labels, verb)
    with metrics.RECONCILE_SECONDS.time():
        try:
            rnd = await reconcile(kube, body, memo.pod_monitor)
        except KubeError as exc:
            metrics.RECONCILES.labels("error").inc()
            metrics.ERRORS.labels("ApiError").inc()
            metrics.DEGRADED.labels(*labels).set(1)
            rnd = Round(_observed(body, None, problem=("ApiError", str(exc))))
            kopf.event(body, type="Warning", reason="ApiError", message=str(exc))
            await _write_status(kube, body, rnd)
            raise kopf.TemporaryError(str(exc), delay=10) from exc
    for action in rnd.actions:
        verb, _, what = action.partition(" ")
        metrics.CHILD_WRITES.labels(verb, what.split("/")[0]).inc()
        kopf.event(body, type="Normal", reason=verb.capitalize(), message=f"{verb} {what}")
    problem = rnd.observed.problem
    metrics.RECONCILES.labels("invalid" if problem else "ok").inc()
    metrics.DEGRADED.labels(*labels).set(1 if problem else 0)
    if problem is not None and not _degraded_with(body, *problem):
        metrics.ERRORS.labels(problem[0]).inc()
        kopf.event(body, type="Warning", reason=problem[0], message=problem[1])
    await _write_status(kube, body, rnd)


@kopf.on.resume(*RESOURCE)
@kopf.on.create(*RESOURCE)
@kopf.on.update(*RESOURCE, field="spec")
async def on_change(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    await reconcile_and_report(body, memo)


@kopf.timer(*RESOURCE, interval=RESYNC_SECONDS, initial_delay=RESYNC_SECONDS)
async def resync(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Periodic round: restores children deleted or edited by hand, refreshes the status."""
    if getattr(memo, "closing", False):
        return
    await reconcile_and_report(body, memo)


@kopf.timer(*RESOURCE, interval=POLICY_SECONDS, initial_delay=POLICY_SECONDS)
async def autopilot(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """The closed loop: metrics -> policy -> remap or resize, while the deployment runs."""
    status = _plain(body.get("status") or {})
    if getattr(memo, "closing", False):
        return
    document = document_of(body)
    if validation_problems(document):
        return  # the reconcile rounds report it
    deployment = MoEDeployment.model_validate(document)
    spec = deployment.spec
    resizing = spec.elastic.enabled and (
        bool(status.get("resize"))
        or status.get("expertParallelSize") not in (None, spec.parallelism.expert_parallel_size)
    )
    if status.get("phase") != "Running" and not resizing:
        return
    sources: Sources = memo.sources
    meta = body["metadata"]
    kube: KubeClient = memo.kube
    labels = (meta["namespace"], meta["name"])
    resize_patch: dict[str, Any] = {}
    if deployment.spec.elastic.enabled:
        # A live resize goes on while new pods are not ready yet (phase Pending).
        resized = await resize_round(kube, deployment, status)
        resize_patch = resized.status
        status = {**status, **resize_patch}
        if resized.event is not None:
            kind, reason, message = resized.event
            kopf.event(body, type=kind, reason=reason, message=message)
        if status.get("phase") != "Running":
            await kube.patch_status(meta["namespace"], meta["name"], resize_patch)
            return
    rnd = await policy_round(kube, deployment, meta["uid"], status, sources)
    metrics.METRICS_AVAILABLE.labels(*labels).set(0 if rnd.metrics_problem else 1)
    if rnd.decision.verb in ("remap", "resize"):
        metrics.ACTIONS.labels(*labels, rnd.decision.verb).inc()
    if rnd.event is not None:
        kind, reason, message = rnd.event
        kopf.event(body, type=kind, reason=reason, message=message)
    now = now_rfc3339()
    conditions = list(status.get("conditions") or [])
    degraded: dict[str, Any] = next((c for c in conditions if c.get("type") == "Degraded"), {})
    if rnd.metrics_problem is not None:
        if degraded.get("reason") != METRICS_UNAVAILABLE:
            metrics.ERRORS.labels(METRICS_UNAVAILABLE).inc()
            kopf.event(
                body, type="Warning", reason=METRICS_UNAVAILABLE, message=rnd.metrics_problem
            )
        conditions = set_condition(
            conditions,
            "Degraded",
            True,
            METRICS_UNAVAILABLE,
            rnd.metrics_problem,
            int(meta.get("generation") or 0),
            now,
        )
    elif degraded.get("reason") == METRICS_UNAVAILABLE:
        conditions = set_condition(
            conditions, "Degraded", False, "AsExpected", "", int(meta.get("generation") or 0), now
        )
    await kube.patch_status(
        meta["namespace"], meta["name"], {**resize_patch, **rnd.status, "conditions": conditions}
    )


def validate_admission(body: kopf.Body, old: kopf.Body | None = None, **_: Any) -> None:
    """The validating webhook: the operator's own rules plus immutable fields on update."""
    found = admission_problems(document_of(body), document_of(old) if old else None)
    if found:
        raise kopf.AdmissionError("; ".join(found), code=422)


if WEBHOOK_PORT:
    kopf.on.validate(*RESOURCE, id="validate-moedeployment")(validate_admission)

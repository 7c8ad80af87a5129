"""The operator's own Prometheus metrics (served on MOE_OPERATOR_METRICS_PORT, default 8080).

``SPECS`` lists every series (the dashboards and alert rules are checked against it).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from prometheus_client import Counter, Gauge, Histogram


class OperatorMetric(NamedTuple):
    name: str
    kind: str
    labels: tuple[str, ...]
    help: str


SPECS: tuple[OperatorMetric, ...] = (
    OperatorMetric(
        "moe_operator_reconciles_total",
        "counter",
        ("result",),
        "Reconcile rounds by result (ok, invalid, error).",
    ),
    OperatorMetric(
        "moe_operator_reconcile_duration_seconds", "histogram", (), "Time of one reconcile round."
    ),
    OperatorMetric(
        "moe_operator_child_writes_total",
        "counter",
        ("verb", "kind"),
        "Children created or patched.",
    ),
    OperatorMetric(
        "moe_operator_actions_total",
        "counter",
        ("namespace", "deployment", "action"),
        "Actions the policy took on a deployment (action: remap, resize).",
    ),
    OperatorMetric(
        "moe_operator_errors_total",
        "counter",
        ("reason",),
        "Errors by reason (ApiError, InvalidSpec, MetricsUnavailable).",
    ),
    OperatorMetric(
        "moe_operator_metrics_available",
        "gauge",
        ("namespace", "deployment"),
        "1 when the deployment's worker metrics were read fresh, else 0.",
    ),
    OperatorMetric(
        "moe_operator_degraded",
        "gauge",
        ("namespace", "deployment"),
        "1 while the deployment's Degraded condition is True.",
    ),
)

BY_NAME = {spec.name: spec for spec in SPECS}


def _series(name: str) -> Any:
    """The collector of ``name`` as SPECS declares it (help and labels from there)."""
    spec = BY_NAME[name]
    kind = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}[spec.kind]
    return kind(name.removesuffix("_total"), spec.help, list(spec.labels))


RECONCILES: Counter = _series("moe_operator_reconciles_total")
RECONCILE_SECONDS: Histogram = _series("moe_operator_reconcile_duration_seconds")
CHILD_WRITES: Counter = _series("moe_operator_child_writes_total")
ACTIONS: Counter = _series("moe_operator_actions_total")
ERRORS: Counter = _series("moe_operator_errors_total")
METRICS_AVAILABLE: Gauge = _series("moe_operator_metrics_available")
DEGRADED: Gauge = _series("moe_operator_degraded")

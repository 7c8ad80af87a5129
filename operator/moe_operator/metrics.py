"""The operator's own Prometheus metrics (served on MOE_OPERATOR_METRICS_PORT, default 8080).

``SPECS`` lists every series (the dashboards and alert rules are checked against it).
"""

from __future__ import annotations

from typing import NamedTuple

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
        "Actions taken on deployments (remap, scale_up, scale_down).",
    ),
    OperatorMetric(
        "moe_operator_errors_total", "counter", ("reason",), "Errors by reason (ApiError, ...)."
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

RECONCILES = Counter("moe_operator_reconciles", SPECS[0].help, ["result"])
RECONCILE_SECONDS = Histogram("moe_operator_reconcile_duration_seconds", SPECS[1].help)
CHILD_WRITES = Counter("moe_operator_child_writes", SPECS[2].help, ["verb", "kind"])
ACTIONS = Counter("moe_operator_actions", SPECS[3].help, ["namespace", "deployment", "action"])
ERRORS = Counter("moe_operator_errors", SPECS[4].help, ["reason"])
METRICS_AVAILABLE = Gauge(
    "moe_operator_metrics_available", SPECS[5].help, ["namespace", "deployment"]
)
DEGRADED = Gauge("moe_operator_degraded", SPECS[6].help, ["namespace", "deployment"])

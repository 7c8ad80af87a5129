"""Every alert of the chart's PrometheusRule, unit-tested by `promtool test rules` (Debian's
prometheus): each fires for the deployment in trouble, after its `for`, and not for the healthy
one beside it. The rules are the chart's own, rendered with its default values."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_helm import template

LABELS = 'namespace="ml", deployment="{d}"'


def chart_rules() -> list[dict[str, Any]]:
    documents = template(
        ["--set", "alerts.enabled=true", "--api-versions", "monitoring.coreos.com/v1"]
    )
    rule = next(d for d in documents if d["kind"] == "PrometheusRule")
    return list(rule["spec"]["groups"][0]["rules"])


def firing(rule: dict[str, Any], deployment: str) -> dict[str, Any]:
    """The alert ``rule`` raises for ``deployment``: its labels and summary filled in."""
    summary = rule["annotations"]["summary"].replace("{{ $labels.deployment }}", deployment)
    return {
        "exp_labels": {"namespace": "ml", "deployment": deployment, **rule["labels"]},
        "exp_annotations": {"summary": summary},
    }


def series(name: str, deployment: str, values: str, **labels: str) -> dict[str, str]:
    extra = "".join(f', {k}="{v}"' for k, v in labels.items())
    return {
        "series": f"{name}{{{LABELS.format(d=deployment)}{extra}}}",
        "values": values,
    }


# name -> (input series over 1m steps, [(eval time, deployments firing)])
CASES: dict[str, tuple[list[dict[str, str]], list[tuple[str, list[str]]]]] = {
    # below 0.8 for 30m (the default balancednessFor)
    "MoEBalancednessLow": (
        [
            series("moe_balancedness", "sick", "0.5x60", rank="0"),
            series("moe_balancedness", "sick", "0.9x60", rank="1"),  # the min counts
            series("moe_balancedness", "fine", "0.95x60", rank="0"),
        ],
        [("20m", []), ("45m", ["sick"])],
    ),
    "MoERebalanceFailures": (
        [
            series("moe_rebalances_total", "sick", "0x10 1x50", result="timeout", trigger="manual"),
            series("moe_rebalances_total", "fine", "0+1x60", result="ok", trigger="interval"),
        ],
        [("5m", []), ("20m", ["sick"]), ("59m", [])],  # a failure counts for 30 minutes
    ),
    # in flight with no new topology for 15m (resizeStuckFor), then its own 15m
    "MoEResizeStuck": (
        [
            series("moe_rebalancing", "sick", "1x60", rank="0"),
            series("moe_topology_generation", "sick", "3x60", rank="0"),
            series("moe_rebalancing", "fine", "1x60", rank="0"),
            series("moe_topology_generation", "fine", "0+1x60", rank="0"),  # it moves on
        ],
        [("10m", []), ("40m", ["sick"])],
    ),
    # p99 above 2 s for 10m (ttftFor): every request of "sick" waits 2.5-5 s
    "MoETimeToFirstTokenHigh": (
        [
            *(
                series("moe_time_to_first_token_seconds_bucket", "sick", values, le=le, rank="0")
                for le, values in (("1", "0x60"), ("2.5", "0x60"), ("5", "0+10x60"))
            ),
            series("moe_time_to_first_token_seconds_bucket", "sick", "0+10x60", le="+Inf"),
            *(
                series("moe_time_to_first_token_seconds_bucket", "fine", "0+10x60", le=le)
                for le in ("1", "2.5", "5", "+Inf")
            ),
        ],
        [("8m", []), ("30m", ["sick"])],
    ),
    "MoEMetricsUnavailable": (
        [
            series("moe_operator_metrics_available", "sick", "1x5 0x55"),
            series("moe_operator_metrics_available", "fine", "1x60"),
        ],
        [("10m", []), ("20m", ["sick"])],
    ),
}


def test_every_alert_has_a_unit_test() -> None:
    assert {r["alert"] for r in chart_rules()} == set(CASES)


@pytest.mark.parametrize("alert", sorted(CASES))
def test_alert_fires_for_the_deployment_in_trouble_only(alert: str, tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is missing: `make setup` installs Debian's prometheus package")
    rule = next(r for r in chart_rules() if r["alert"] == alert)
    (tmp_path / "rules.yaml").write_text(
        yaml.safe_dump({"groups": [{"name": "moe-eplb", "rules": [rule]}]})
    )
    inputs, checks = CASES[alert]
    tests = {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": inputs,
                "alert_rule_test": [
                    {
                        "eval_time": at,
                        "alertname": alert,
                        "exp_alerts": [firing(rule, d) for d in deployments],
                    }
                    for at, deployments in checks
                ],
            }
        ],
    }
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(tests))
    result = subprocess.run(
        [promtool, "test", "rules", "tests.yaml"], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr

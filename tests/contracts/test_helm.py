"""The Helm chart, the dashboards and the Dockerfile agree with the code they deploy."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from manifest_checks import kubernetes_validate_strict
from moe_operator import builders, dashboards
from moe_operator import metrics as operator_metrics
from moe_operator.handlers import CLUSTER_WIDE_CALLS, KOPF_API_CALLS
from moe_operator.k8s import API_CALLS, OWNER_REFERENCE_GRANTS
from moe_worker import metrics as worker_metrics

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "moe-operator"
HELM = shutil.which("helm") or str(Path(sys.executable).parent / "helm")
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
# Kinds kubernetes-validate knows; the others come from CRDs (cert-manager, prometheus-operator).
CRD_KINDS = {"ServiceMonitor", "PrometheusRule", "Certificate", "Issuer"}
VARIANTS = [
    pytest.param([], id="default"),
    pytest.param(["--api-versions", "monitoring.coreos.com/v1"], id="default+monitoring"),
    pytest.param(
        ["--set", "webhook.enabled=true", "--api-versions", "cert-manager.io/v1"],
        id="webhook+cert-manager",
    ),
    *(
        pytest.param(
            ["-f", str(values), "--api-versions", "monitoring.coreos.com/v1"], id=values.stem
        )
        for values in CI_VALUES
    ),
]


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    if not Path(HELM).exists():
        pytest.fail("helm is missing: `make setup` installs it (scripts/install_helm.py)")
    return subprocess.run([HELM, *args], capture_output=True, text=True)


def template(extra: list[str]) -> list[dict[str, Any]]:
    result = helm("template", "moe", str(CHART), "--namespace", "moe-system", *extra)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


@pytest.mark.parametrize("extra", VARIANTS)
def test_lint_template_and_kubernetes_validate(extra: list[str], tmp_path: Path) -> None:
    lint_args = [
        a for i, a in enumerate(extra) if "--api-versions" not in extra[max(i - 1, 0) : i + 1]
    ]
    lint = helm("lint", "--strict", str(CHART), *lint_args)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    documents = template(extra)
    core = [d for d in documents if d["kind"] not in CRD_KINDS]
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(yaml.safe_dump_all(core))
    check = kubernetes_validate_strict(rendered)
    assert check.returncode == 0, check.stdout + check.stderr
    deployment = next(d for d in documents if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    security = container["securityContext"]
    assert security["runAsNonRoot"] and security["readOnlyRootFilesystem"]
    assert security["allowPrivilegeEscalation"] is False
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # The workers' NetworkPolicy admits the operator to the control port by these labels.
    assert builders.OPERATOR_LABELS.items() <= pod["metadata"]["labels"].items()


def test_values_schema_rejects_bad_values() -> None:
    result = helm("lint", str(CHART), "--set", "webhook.failurePolicy=Sometimes")
    assert result.returncode != 0 and "failurePolicy" in result.stdout + result.stderr


def test_webhook_without_certificates_fails_with_a_clear_message() -> None:
    result = helm("template", "moe", str(CHART), "--set", "webhook.enabled=true")
    assert result.returncode != 0
    assert "needs cert-manager" in result.stderr


def test_chart_crds_equal_the_generated_crds() -> None:
    for crd in (ROOT / "crds").glob("*.yaml"):
        assert (CHART / "crds" / crd.name).read_text() == crd.read_text(), crd.name


def _granted(documents: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    granted = set()
    for document in documents:
        if document["kind"] in ("Role", "ClusterRole"):
            for rule in document["rules"]:
                for group in rule["apiGroups"]:
                    for resource in rule["resources"]:
                        for verb in rule["verbs"]:
                            granted.add((group, resource, verb))
    return granted


def _needed(calls: tuple[tuple[str, str, tuple[str, ...]], ...]) -> set[tuple[str, str, str]]:
    return {(group, resource, verb) for group, resource, verbs in calls for verb in verbs}


def test_rbac_grants_exactly_the_calls_the_operator_makes() -> None:
    cluster_wide = template([])
    assert {d["kind"] for d in cluster_wide} >= {"ClusterRole", "ClusterRoleBinding"}
    assert _granted(cluster_wide) == _needed(
        API_CALLS + KOPF_API_CALLS + CLUSTER_WIDE_CALLS + OWNER_REFERENCE_GRANTS
    )
    namespaced = template(["--set", "watchNamespace=inference"])
    roles = [d for d in namespaced if d["kind"] in ("Role", "ClusterRole")]
    assert [r["kind"] for r in roles] == ["Role"]
    assert roles[0]["metadata"]["namespace"] == "inference"
    assert _granted(namespaced) == _needed(API_CALLS + KOPF_API_CALLS + OWNER_REFERENCE_GRANTS)


def test_namespaced_mode_with_a_list_grants_each_namespace_and_nothing_cluster_wide() -> None:
    """watchNamespaces: a Role and RoleBinding per namespace (the single watchNamespace is
    added), the operator started with one --namespace each, the webhook limited to them."""
    extra = ["--set", "watchNamespaces={team-a,team-b}", "--set", "watchNamespace=team-c"]
    extra += ["--set", "webhook.enabled=true", "--set", "webhook.tls.secretName=tls"]
    extra += ["--set", "webhook.tls.caBundle=Y2E="]
    documents = template(extra)
    kinds = [d["kind"] for d in documents]
    assert "ClusterRole" not in kinds and "ClusterRoleBinding" not in kinds
    wanted = ["team-a", "team-b", "team-c"]
    for kind in ("Role", "RoleBinding"):
        found = sorted(d["metadata"]["namespace"] for d in documents if d["kind"] == kind)
        assert found == wanted, kind
    needed = _needed(API_CALLS + KOPF_API_CALLS + OWNER_REFERENCE_GRANTS)
    for role in (d for d in documents if d["kind"] == "Role"):
        assert _granted([role]) == needed
    for binding in (d for d in documents if d["kind"] == "RoleBinding"):
        assert binding["roleRef"]["kind"] == "Role"
        assert binding["subjects"][0]["namespace"] == "moe-system"
    (deployment,) = [d for d in documents if d["kind"] == "Deployment"]
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert [a for a in args if "namespace" in a] == [f"--namespace={n}" for n in wanted]
    (webhook,) = [d for d in documents if d["kind"] == "ValidatingWebhookConfiguration"]
    (expression,) = webhook["webhooks"][0]["namespaceSelector"]["matchExpressions"]
    assert expression == {
        "key": "kubernetes.io/metadata.name",
        "operator": "In",
        "values": wanted,
    }


def test_dashboards_are_the_generated_ones_and_labelled() -> None:
    for name, content in dashboards.dashboards().items():
        assert (dashboards.OUT_DIR / name).read_text() == dashboards.render(content), (
            f"{name} drifted: run python -m moe_operator.dashboards"
        )
    configmaps = [d for d in template([]) if d["kind"] == "ConfigMap"]
    assert len(configmaps) == len(dashboards.dashboards())
    for configmap in configmaps:
        assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
        (payload,) = configmap["data"].values()
        assert json.loads(payload)["uid"].startswith("moe-")


def _grafana_free(expr: str) -> str:
    return (
        expr.replace("$__rate_interval", "5m")
        .replace("$namespace", ".*")
        .replace("$deployment", ".*")
    )


def declared_metrics() -> set[str]:
    names = set()
    for spec in worker_metrics.SPECS:
        kind = spec.kind
        if kind == "counter":
            names.add(spec.name if spec.name.endswith("_total") else spec.name + "_total")
        elif kind == "histogram":
            names.update(spec.name + suffix for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(spec.name)
    for op in operator_metrics.SPECS:
        if op.kind == "histogram":
            names.update(op.name + suffix for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(op.name)
    return names


PROMQL_WORDS = {
    "sum",
    "min",
    "max",
    "by",
    "rate",
    "increase",
    "changes",
    "histogram_quantile",
    "or",
    "and",
    "on",
    "le",
    "count",
    "avg",
}


def test_every_dashboard_and_alert_query_parses_and_names_declared_metrics(
    tmp_path: Path,
) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is missing: `make setup` installs Debian's prometheus package")
    exprs = [_grafana_free(e) for e in dashboards.queries()]
    rules = template(["--set", "alerts.enabled=true", "--api-versions", "monitoring.coreos.com/v1"])
    rule = next(d for d in rules if d["kind"] == "PrometheusRule")
    exprs += [r["expr"] for r in rule["spec"]["groups"][0]["rules"]]
    path = tmp_path / "rules.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "groups": [
                    {
                        "name": "q",
                        "rules": [{"record": f"q:{i}", "expr": e} for i, e in enumerate(exprs)],
                    }
                ]
            }
        )
    )
    check = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    declared = declared_metrics()
    for expr in exprs:
        bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\"[^\"]*\"", " ", expr)
        for word in re.findall(r"[a-z_][a-z0-9_]*", bare):
            if word in PROMQL_WORDS or not word.startswith("moe_"):
                continue
            assert word in declared, f"{word} in {expr!r} is not a declared metric"


def _stages(text: str) -> dict[str, list[str]]:
    stages: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        match = re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line)
        if match:
            current = match.group(1)
            stages[current] = []
        elif current and line and not line.startswith("#"):
            stages[current].append(line)
    return stages


def test_dockerfile_targets_match_the_chart_and_the_pod_template() -> None:
    stages = _stages((ROOT / "Dockerfile").read_text())
    assert {"operator", "worker"} <= set(stages)
    operator_lines = "\n".join(stages["operator"])
    worker_lines = "\n".join(stages["worker"])
    assert "torch" not in operator_lines and "[operator]" in operator_lines
    assert "[worker]" in worker_lines
    assert "python -m moe_worker.eplb.policy.aot" in worker_lines  # the kernels, built ahead
    assert 'ENTRYPOINT ["kopf", "run", "-m", "moe_operator.handlers"]' in operator_lines
    # Users: the chart's runAsUser for the operator, the builders' for the workers.
    deployment = next(d for d in template([]) if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert "command" not in container  # the chart relies on the image's entrypoint
    assert f"USER {container['securityContext']['runAsUser']}" in operator_lines
    assert f"USER {builders.WORKER_USER}" in worker_lines
    # The pod template's command is what the worker image provides.
    example = yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())
    from moe_operator.api import MoEDeployment

    sts = builders.stateful_set(MoEDeployment.model_validate(example))
    command = sts["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:2] == ["moe-eplb", "worker"]
    assert 'ENTRYPOINT ["moe-eplb", "worker"]' in worker_lines
    assert 'moe-eplb = "moe_operator.cli:main"' in (ROOT / "pyproject.toml").read_text()


def test_monitoring_keeps_the_operators_labels_and_takes_extra_ones() -> None:
    """honorLabels keeps the operator series' own namespace label (else it becomes
    exported_namespace and every query by namespace is empty); extra labels let a Prometheus
    selector (kube-prometheus-stack's release label) pick the objects up."""
    documents = template(
        [
            "--api-versions",
            "monitoring.coreos.com/v1",
            "--set",
            "alerts.enabled=true",
            "--set",
            "serviceMonitor.labels.release=kps",
            "--set",
            "alerts.labels.release=kps",
        ]
    )
    monitor = next(d for d in documents if d["kind"] == "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["honorLabels"] is True
    assert monitor["metadata"]["labels"]["release"] == "kps"
    rule = next(d for d in documents if d["kind"] == "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "kps"


def test_the_chart_works_as_a_subchart() -> None:
    """A parent chart's global values reach every subchart; the values schema accepts them."""
    result = helm(
        "template", "moe", str(CHART), "--namespace", "moe-system", "--set", "global.region=eu"
    )
    assert result.returncode == 0, result.stderr


def test_names_annotations_and_security_contexts_are_overridable() -> None:
    default = template([])
    operator = next(d for d in default if d["kind"] == "Deployment")
    pod = operator["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    changed = template(
        [
            "--set",
            "fullnameOverride=eplb",
            "--set",
            "podAnnotations.example\\.com/team=inference",
            "--set",
            "podSecurityContext.fsGroup=2000",
            "--set",
            "securityContext.runAsUser=12345",
        ]
    )
    operator = next(d for d in changed if d["kind"] == "Deployment")
    assert operator["metadata"]["name"] == "eplb"
    template_ = operator["spec"]["template"]
    assert template_["metadata"]["annotations"] == {"example.com/team": "inference"}
    assert template_["spec"]["securityContext"]["fsGroup"] == 2000
    assert template_["spec"]["containers"][0]["securityContext"]["runAsUser"] == 12345
    named = template(["--set", "nameOverride=eplb-operator"])
    assert next(d for d in named if d["kind"] == "Deployment")["metadata"]["name"] == (
        "moe-eplb-operator"
    )

"""A real Prometheus (Debian's package) on 127.0.0.1 for end-to-end tests."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from distributed import free_port


def chart_service_monitor(extra: list[str] | None = None) -> dict[str, Any]:
    """The operator's ServiceMonitor as the Helm chart renders it (monitoring CRDs present)."""
    helm = Path(sys.executable).parent / "helm"
    chart = Path(__file__).resolve().parent.parent / "helm" / "moe-operator"
    result = subprocess.run(
        [str(helm), "template", "moe", str(chart), "--api-versions", "monitoring.coreos.com/v1"]
        + (extra or []),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    documents = [d for d in yaml.safe_load_all(result.stdout) if d]
    return next(d for d in documents if d["kind"] == "ServiceMonitor")


def start_prometheus(
    tmp_path: Path,
    targets: list[str],
    namespace: str,
    operator: tuple[str, str] | None = None,
) -> tuple[subprocess.Popen[bytes], str]:
    """Prometheus scraping ``targets`` every second (labelled ``namespace``, as a PodMonitor's
    pods in that namespace are); (process, URL). ``operator``: (target, its own namespace),
    scraped as the chart's ServiceMonitor says (its ``honorLabels``), labelled with the
    operator's namespace as Kubernetes service discovery labels it. Every query it answers is
    logged to ``tmp_path / "queries.log"`` (see ``logged_queries``)."""
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.fail("prometheus is missing: `make setup` installs Debian's prometheus package")
    port = free_port()
    config = {
        "global": {
            "scrape_interval": "1s",
            "evaluation_interval": "1s",
            "query_log_file": str(tmp_path / "queries.log"),
        },
        "scrape_configs": [
            {
                "job_name": "moe",
                "static_configs": [{"targets": targets, "labels": {"namespace": namespace}}],
            }
        ],
    }
    if operator is not None:
        endpoint = chart_service_monitor()["spec"]["endpoints"][0]
        config["scrape_configs"].append(
            {
                "job_name": "moe-operator",
                "honor_labels": bool(endpoint.get("honorLabels", False)),
                "static_configs": [
                    {"targets": [operator[0]], "labels": {"namespace": operator[1]}}
                ],
            }
        )
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    server = subprocess.Popen(
        [
            prometheus,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return server, f"http://127.0.0.1:{port}"


def logged_queries(tmp_path: Path) -> list[str]:
    """The PromQL expressions the Prometheus of ``start_prometheus(tmp_path, ...)`` answered."""
    log = tmp_path / "queries.log"
    if not log.exists():
        return []
    lines = log.read_text().splitlines()
    return [json.loads(line)["params"]["query"] for line in lines if line.strip()]


def query(base: str, expr: str) -> list[dict[str, Any]]:
    """An instant query's result vector (raises OSError while Prometheus is not up)."""
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as response:
        answer = json.load(response)
    assert answer["status"] == "success", answer
    return list(answer["data"]["result"])


def for_prometheus(expr: str, namespace: str = ".*", deployment: str = ".*") -> str:
    """A dashboard query with Grafana's variables filled over a short run: "All" by default,
    or the ``namespace`` and ``deployment`` a user picks."""
    return (
        expr.replace("$__rate_interval", "20s")
        .replace('namespace=~"$namespace"', f'namespace=~"{namespace}"')
        .replace('deployment=~"$deployment"', f'deployment=~"{deployment}"')
    )

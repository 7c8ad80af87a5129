"""Real Prometheus (Debian's, on 127.0.0.1) scrapes two worker ranks; every query of the
"MoE EPLB overview" dashboard returns data from it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from distributed import free_port
from moe_operator.dashboards import OVERVIEW

pytestmark = pytest.mark.slow


def query(base: str, expr: str) -> list[dict[str, Any]]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as response:
        answer = json.load(response)
    assert answer["status"] == "success", answer
    return list(answer["data"]["result"])


def for_prometheus(expr: str) -> str:
    """Grafana's variables as Grafana would fill them for "All" over a short test run."""
    return (
        expr.replace("$__rate_interval", "20s")
        .replace('namespace=~"$namespace"', 'namespace=~".*"')
        .replace('deployment=~"$deployment"', 'deployment=~".*"')
    )


def test_every_overview_panel_returns_data(tmp_path: Path) -> None:
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.fail("prometheus is missing: `make setup` installs Debian's prometheus package")
    metrics_port = free_port(consecutive=2)
    config = {
        "deployment": "e2e",
        "epSize": 2,
        "steps": 0,
        "device": "cpu",
        "model": {"numExperts": 8, "numLayers": 2, "hiddenSize": 16, "intermediateSize": 8},
        "eplb": {"numRedundantExperts": 2, "windowSize": 20, "stepInterval": 40},
        "workload": {"kind": "drift", "tokensPerStep": 32, "driftPeriod": 100},
        "metrics": {"port": metrics_port, "updateInterval": 10},
        "control": {"port": 0},
    }
    (tmp_path / "worker.yaml").write_text(yaml.safe_dump(config))
    env = {
        **os.environ,
        "POD_NAME": "e2e-0",
        "LOCAL_WORLD_SIZE": "2",
        "WORLD_SIZE": "2",
        "MASTER_PORT": str(free_port()),
    }
    env.pop("RANK", None)
    workers = subprocess.Popen(
        [sys.executable, "-m", "moe_worker", "--config", str(tmp_path / "worker.yaml")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    web_port = free_port()
    scrape = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {
                "job_name": "moe-worker",
                "static_configs": [
                    {
                        "targets": [f"127.0.0.1:{metrics_port}", f"127.0.0.1:{metrics_port + 1}"],
                        "labels": {"namespace": "e2e"},
                    }
                ],
            }
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(scrape))
    server = subprocess.Popen(
        [
            prometheus,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{web_port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{web_port}"
    try:
        missing: list[str] = []
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            assert workers.poll() is None, workers.stderr.read().decode() if workers.stderr else ""
            try:
                missing = [p.title for p in OVERVIEW if not query(base, for_prometheus(p.expr))]
            except OSError:
                missing = ["(prometheus not up yet)"]
            if not missing:
                break
            time.sleep(2)
        assert not missing, f"panels without data: {missing}"
        # The data is the workers': two ranks, and at least one committed rebalance.
        ranks = query(base, 'count(moe_ep_size{deployment="e2e"})')
        assert float(ranks[0]["value"][1]) == 2
        rebalances = query(base, 'sum(moe_rebalances_total{deployment="e2e",result="ok"})')
        assert float(rebalances[0]["value"][1]) >= 1
    finally:
        server.terminate()
        os.killpg(workers.pid, signal.SIGTERM)
        workers.wait(timeout=60)
        server.wait(timeout=30)

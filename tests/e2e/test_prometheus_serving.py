"""Real Prometheus (Debian's) scrapes two ranks of `moe-eplb serve` while the load generator
drives them: every panel of the "MoE EPLB serving" dashboard (the speculative-decoding ones too:
the ranks serve with an MoE draft model) and the time-to-first-token alert's expression return
data from it."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from pathlib import Path

import pytest

from hf_checkpoints import save_checkpoint
from moe_operator.dashboards import SERVING
from moe_operator.loadgen.runner import run_traffic
from moe_worker.config import TrafficConfig
from prometheus_server import for_prometheus, query, start_prometheus
from serving_harness import ROOT, ServeProcess

pytestmark = pytest.mark.slow
RULES = ROOT / "helm" / "moe-operator" / "templates" / "prometheusrule.yaml"


def alert_expression(name: str) -> str:
    """The alert's expression in the chart, without its threshold."""
    text = RULES.read_text()
    match = re.search(rf"alert: {name}\n\s+expr: (.+?) > \{{\{{", text)
    assert match, f"no alert {name} with a threshold in {RULES}"
    return match.group(1).replace("[5m]", "[20s]")


def test_every_serving_panel_and_the_ttft_alert_return_data(tmp_path: Path) -> None:
    model_dir = save_checkpoint(tmp_path / "qwen3", "qwen3_moe")
    draft_dir = save_checkpoint(tmp_path / "draft", "qwen3_moe", seed=1)
    config = {"deployment": "served", "serving": {"maxModelLen": 128}}
    draft = ("--draft", str(draft_dir))
    with ServeProcess(model_dir, 2, config, tmp_path, extra_args=draft) as server:
        targets = [url.removeprefix("http://") for url in server.rank_urls]
        assert len(targets) == 2
        prometheus, base = start_prometheus(tmp_path, targets, "e2e")
        traffic = TrafficConfig.model_validate(
            {
                "rateProfile": [{"atS": 0, "requestsPerS": 8}],
                "durationS": 90,
                "concurrency": 8,
                "promptWords": {"mean": 6, "kind": "uniform"},
                "outputTokens": {"mean": 6},
                "driftPeriodS": 5,
            }
        )
        stop = threading.Event()
        load = threading.Thread(
            target=lambda: asyncio.run(run_traffic(server.url, traffic, should_stop=stop.is_set)),
            daemon=True,
        )
        load.start()
        expressions = {p.title: for_prometheus(p.expr) for p in SERVING}
        expressions["alert MoETimeToFirstTokenHigh"] = alert_expression("MoETimeToFirstTokenHigh")
        missing = list(expressions)
        deadline = time.monotonic() + 150
        try:
            while missing and time.monotonic() < deadline and load.is_alive():
                try:
                    missing = [
                        title for title, expr in expressions.items() if not query(base, expr)
                    ]
                except OSError:  # Prometheus not up yet
                    missing = ["(prometheus not up yet)"]
                time.sleep(0.5)
            served = query(
                base, 'sum by (rank) (moe_request_success_total{deployment="served"}) > 0'
            )
        finally:
            stop.set()
            prometheus.terminate()
            prometheus.wait(timeout=30)
        assert not missing, f"queries without data: {missing}"
        assert len(served) == 2  # both ranks served requests
        load.join(timeout=60)  # the requests in flight end; no new ones are sent
        assert not load.is_alive()

"""Real Prometheus (Debian's, on 127.0.0.1) scrapes two worker ranks; every query of the
"MoE EPLB overview" dashboard returns data from it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from distributed import free_port
from moe_operator.dashboards import OVERVIEW
from prometheus_server import for_prometheus, query, start_prometheus

pytestmark = pytest.mark.slow


class Stack:
    def __init__(self, base: str, metrics_port: int, workers: subprocess.Popen[bytes]) -> None:
        self.base, self.metrics_port, self.workers = base, metrics_port, workers


@pytest.fixture
def stack(tmp_path: Path) -> Any:
    """Two worker ranks (one pod's launcher) scraped every second by a real Prometheus."""
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
    server, base = start_prometheus(
        tmp_path, [f"127.0.0.1:{metrics_port}", f"127.0.0.1:{metrics_port + 1}"], "e2e"
    )
    try:
        yield Stack(base, metrics_port, workers)
    finally:
        server.terminate()
        os.killpg(workers.pid, signal.SIGTERM)
        workers.wait(timeout=60)
        server.wait(timeout=30)


def steps_done(metrics_url: str) -> float:
    """moe_steps_total of the rank serving ``metrics_url``."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "moe_steps_total":
                return float(sample.value)
    raise AssertionError(f"{metrics_url} exports no moe_steps_total")


def test_every_overview_panel_returns_data(stack: Stack) -> None:
    base, workers = stack.base, stack.workers
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
        time.sleep(0.5)
    assert not missing, f"panels without data: {missing}"
    # The data is the workers': two ranks, and at least one committed rebalance.
    ranks = query(base, 'count(moe_ep_size{deployment="e2e"})')
    assert float(ranks[0]["value"][1]) == 2
    rebalances = query(base, 'sum(moe_rebalances_total{deployment="e2e",result="ok"})')
    assert float(rebalances[0]["value"][1]) >= 1


async def test_prometheus_and_direct_scrape_give_the_same_snapshot(stack: Stack) -> None:
    """The operator's two metrics sources agree on the same running ranks."""
    import asyncio

    from moe_operator.metrics_source import MetricsUnavailable, PrometheusSource, ScrapeSource

    prometheus = PrometheusSource(stack.base, "e2e", "e2e", window="10s")
    scrape = ScrapeSource([f"http://127.0.0.1:{stack.metrics_port + r}/metrics" for r in range(2)])
    from_prometheus = None
    # Past start-up and the first placement compile: Prometheus' 10 s rate window must lie
    # wholly after the first committed rebalance, so both sources see a steady rate.
    steady = 'sum(moe_rebalances_total{deployment="e2e",result="ok"} offset 10s) >= 1'
    deadline = time.monotonic() + 120
    while True:
        try:
            if query(stack.base, steady):
                break
        except OSError:  # Prometheus not up yet
            pass
        assert time.monotonic() < deadline, "no rebalance committed 10 s ago within 120 s"
        await asyncio.sleep(0.5)
    for _ in range(150):
        try:
            from_prometheus = await prometheus.snapshot()
            if len(from_prometheus.rank_tokens_per_s) == 2 and all(
                x > 0 for x in from_prometheus.rank_tokens_per_s
            ):
                break
        except MetricsUnavailable:
            pass
        await asyncio.sleep(1)
    assert from_prometheus is not None
    with pytest.raises(MetricsUnavailable, match="two scrapes"):
        await scrape.snapshot()  # the first direct scrape has nothing to take a rate against
    # The direct rate spans the ranks' work between two scrapes: let rank 0 run what
    # Prometheus' rate says is about 5 s of steps (tokensPerStep 32) before the second one.
    rank0 = f"http://127.0.0.1:{stack.metrics_port}/metrics"
    wanted = steps_done(rank0) + 5 * from_prometheus.rank_tokens_per_s[0] / 32
    deadline = time.monotonic() + 60
    while steps_done(rank0) < wanted:
        assert time.monotonic() < deadline, "rank 0 made too little progress within 60 s"
        await asyncio.sleep(0.5)
    direct = await scrape.snapshot()
    from_prometheus = await prometheus.snapshot()
    assert direct.ep_size == from_prometheus.ep_size == 2
    assert len(direct.rank_tokens_per_s) == len(from_prometheus.rank_tokens_per_s) == 2
    # Both measure the same steady token rate (each rank processes tokensPerStep per step).
    for a, b in zip(direct.rank_tokens_per_s, from_prometheus.rank_tokens_per_s, strict=True):
        assert a > 0 and b > 0 and 0.3 < a / b < 3.0
    assert direct.balancedness is not None and from_prometheus.balancedness is not None
    assert 0 < direct.balancedness <= 1 and 0 < from_prometheus.balancedness <= 1
    assert abs(time.time() - from_prometheus.taken_at) < 10
    # A Prometheus that is not there is "unavailable", not a crash.
    with pytest.raises(MetricsUnavailable, match="127.0.0.1:1"):
        await PrometheusSource("http://127.0.0.1:1", "e2e", "e2e", timeout=2).snapshot()

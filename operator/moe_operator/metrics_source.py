"""Where the policy's metrics come from: the Prometheus HTTP API (PromQL) when a URL is
configured, otherwise a direct scrape of the ranks' /metrics. Both give a ``policy.Snapshot``.

The parsing is pure (``snapshot_from_vectors``, ``snapshot_from_scrapes``); the classes only add
the HTTP (aiohttp).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from .policy import Snapshot

RATE_WINDOW = "1m"


class MetricsUnavailable(Exception):
    """No usable metrics (unreachable source, no series, or too few samples for a rate)."""


def promql(namespace: str, deployment: str, window: str = RATE_WINDOW) -> dict[str, str]:
    """The queries a snapshot needs, for one deployment."""
    sel = f'namespace="{namespace}", deployment="{deployment}"'
    return {
        "taken_at": f"max(timestamp(moe_ep_size{{{sel}}}))",
        "ep_size": f"max(moe_ep_size{{{sel}}})",
        "balancedness": f"min(moe_balancedness{{{sel}}})",
        "rank_load": f"sum by (rank) (rate(moe_tokens_processed_total{{{sel}}}[{window}]))",
        "rebalancing": f"max(moe_rebalancing{{{sel}}})",
        "mapping_generation": f"max(moe_mapping_generation{{{sel}}})",
        "topology_generation": f"max(moe_topology_generation{{{sel}}})",
    }


def snapshot_from_vectors(results: Mapping[str, Sequence[Mapping[str, Any]]]) -> Snapshot:
    """A snapshot from instant-vector results (Prometheus' ``data.result`` per query name)."""

    def scalar(name: str) -> float | None:
        vector = results.get(name) or []
        return float(vector[0]["value"][1]) if vector else None

    taken_at, ep_size = scalar("taken_at"), scalar("ep_size")
    if taken_at is None or ep_size is None:
        raise MetricsUnavailable("no moe_ep_size series for the deployment")
    loads = sorted(
        (int(item["metric"].get("rank", 0)), float(item["value"][1]))
        for item in results.get("rank_load") or []
    )
    return Snapshot(
        taken_at=taken_at,
        ep_size=int(ep_size),
        balancedness=scalar("balancedness"),
        rank_tokens_per_s=tuple(load for _, load in loads),
        rebalancing=bool(scalar("rebalancing") or 0),
        mapping_generation=int(scalar("mapping_generation") or 0),
        topology_generation=int(scalar("topology_generation") or 0),
    )


@dataclass
class RankScrape:
    """What one rank's /metrics said at ``taken_at``."""

    taken_at: float
    ep_size: int
    balancedness: float | None
    tokens_total: float
    rebalancing: bool
    mapping_generation: int
    topology_generation: int


def parse_scrape(text: str, taken_at: float) -> RankScrape:
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[sample.name] = sample.value
    if "moe_ep_size" not in values:
        raise MetricsUnavailable("the scrape has no moe_ep_size")
    return RankScrape(
        taken_at=taken_at,
        ep_size=int(values["moe_ep_size"]),
        balancedness=values.get("moe_balancedness"),
        tokens_total=values.get("moe_tokens_processed_total", 0.0),
        rebalancing=bool(values.get("moe_rebalancing", 0)),
        mapping_generation=int(values.get("moe_mapping_generation", 0)),
        topology_generation=int(values.get("moe_topology_generation", 0)),
    )


def snapshot_from_scrapes(
    current: Sequence[RankScrape], previous: Sequence[RankScrape] | None
) -> Snapshot:
    """A snapshot from one scrape per rank (rank order) and the previous round's, for rates."""
    if not current:
        raise MetricsUnavailable("no rank answered")
    if previous is None or len(previous) != len(current):
        raise MetricsUnavailable("a rate needs two scrapes of the same ranks")
    loads = []
    for now, before in zip(current, previous, strict=True):
        elapsed = now.taken_at - before.taken_at
        if elapsed <= 0 or now.tokens_total < before.tokens_total:
            raise MetricsUnavailable("counter reset or no time between scrapes")
        loads.append((now.tokens_total - before.tokens_total) / elapsed)
    balances = [r.balancedness for r in current if r.balancedness is not None]
    return Snapshot(
        taken_at=min(r.taken_at for r in current),
        ep_size=max(r.ep_size for r in current),
        balancedness=min(balances) if balances else None,
        rank_tokens_per_s=tuple(loads),
        rebalancing=any(r.rebalancing for r in current),
        mapping_generation=max(r.mapping_generation for r in current),
        topology_generation=max(r.topology_generation for r in current),
    )


@dataclass
class PrometheusSource:
    """Snapshots from the Prometheus HTTP API."""

    url: str
    namespace: str
    deployment: str
    timeout: float = 10.0
    window: str = RATE_WINDOW  # of the per-rank load rate

    async def snapshot(self) -> Snapshot:
        results: dict[str, Any] = {}
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as http:
                for name, expr in promql(self.namespace, self.deployment, self.window).items():
                    url = self.url.rstrip("/") + "/api/v1/query"
                    async with http.get(url, params={"query": expr}) as response:
                        answer = await response.json()
                    if answer.get("status") != "success":
                        raise MetricsUnavailable(f"{expr}: {answer.get('error')}")
                    results[name] = answer["data"]["result"]
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise MetricsUnavailable(f"Prometheus at {self.url}: {exc}") from exc
        return snapshot_from_vectors(results)


SCRAPE_RATE_WINDOW_S = 5.0


def rate_base(
    history: Sequence[list[RankScrape]], current: list[RankScrape], window_s: float
) -> list[RankScrape] | None:
    """The round a rate over ``current`` is taken from: the oldest earlier round of the same
    ranks within ``window_s`` seconds (a rate over a few seconds, as Prometheus' ``rate``
    over a window, not over one noisy second), else the latest earlier one; None if none."""
    now = min(r.taken_at for r in current)
    same = [round_ for round_ in history if len(round_) == len(current)]
    within = [r for r in same if now - min(s.taken_at for s in r) <= window_s]
    if within:
        return within[0]
    return same[-1] if same else None


@dataclass
class ScrapeSource:
    """Snapshots from the ranks' /metrics directly (rates over the rounds of the last
    ``window_s`` seconds)."""

    urls: list[str]
    timeout: float = 5.0
    window_s: float = SCRAPE_RATE_WINDOW_S
    _history: list[list[RankScrape]] = field(default_factory=list, init=False)

    async def snapshot(self) -> Snapshot:
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        scrapes = []
        try:
            async with aiohttp.ClientSession(timeout=timeout) as http:
                for url in self.urls:
                    async with http.get(url) as response:
                        text = await response.text()
                    scrapes.append(parse_scrape(text, time.time()))
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._history.clear()
            raise MetricsUnavailable(f"scrape failed: {exc}") from exc
        previous = rate_base(self._history, scrapes, self.window_s)
        now = min(r.taken_at for r in scrapes)
        self._history = [
            r for r in self._history if now - min(s.taken_at for s in r) <= self.window_s
        ] + [scrapes]
        return snapshot_from_scrapes(scrapes, previous)

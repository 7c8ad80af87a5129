"""The operator's remap/resize policy over simulated metric time series."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_operator.api import MoEDeployment
from moe_operator.policy import (
    Decision,
    PolicyMemory,
    Snapshot,
    decide,
    memory_from_status,
    memory_to_status,
)

ROOT = Path(__file__).resolve().parents[2]
BASE = yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())


def spec(**elastic: object):  # type: ignore[no-untyped-def]
    document = copy.deepcopy(BASE)
    document["spec"]["remap"] = {
        "balancednessThreshold": 0.9,
        "sustainedSeconds": 30,
        "minIntervalSeconds": 120,
    }
    document["spec"]["elastic"] = {
        "enabled": True,
        "minExpertParallelSize": 2,
        "maxExpertParallelSize": 6,
        "tokensPerRankLow": 1000,
        "tokensPerRankHigh": 4000,
        "sustainedSeconds": 60,
        "scaleUpCooldownSeconds": 120,
        "scaleDownCooldownSeconds": 300,
        **elastic,
    }
    return MoEDeployment.model_validate(document).spec


class World:
    """A deployment whose metrics the test scripts; actions take effect after ``lag`` s."""

    def __init__(self, ep_size: int = 2, lag: float = 20.0) -> None:
        self.ep_size, self.lag = ep_size, lag
        self.mapping_generation = 0
        self.applying: list[tuple[float, str, int]] = []
        self.memory = PolicyMemory()
        self.actions: list[tuple[float, str, int]] = []

    def run(self, spec_, series, until: float, dt: float = 5.0) -> list[tuple[float, str, int]]:  # type: ignore[no-untyped-def]
        t = 0.0
        while t <= until:
            for item in [a for a in self.applying if a[0] <= t]:
                self.applying.remove(item)
                if item[1] == "remap":
                    self.mapping_generation += 1
                else:
                    self.ep_size = item[2]
            balancedness, total_load = series(t, self)
            load = total_load / self.ep_size
            snap = Snapshot(
                taken_at=t - 1,
                ep_size=self.ep_size,
                balancedness=balancedness,
                rank_tokens_per_s=(load,) * self.ep_size,
                rebalancing=bool(self.applying),
                mapping_generation=self.mapping_generation,
            )
            decision: Decision = decide(spec_, self.memory, snap, t)
            # The memory goes through the status and back, as in the operator.
            self.memory = memory_from_status(memory_to_status(decision.memory))
            if decision.verb in ("remap", "resize"):
                self.actions.append((t, decision.verb, decision.target_ep_size))
                self.applying.append((t + self.lag, decision.verb, decision.target_ep_size))
            t += dt
        return self.actions


def test_remap_after_sustained_low_balancedness_then_respects_the_interval() -> None:
    world = World()

    # Balancedness 0.7 until a remap lands, then 0.95; drift brings it down again at t=200.
    def series(t, w):  # type: ignore[no-untyped-def]
        if w.mapping_generation == 0 or t >= 200:
            return 0.7, 4000.0
        return 0.95, 4000.0

    actions = world.run(spec(), series, until=400)
    remaps = [a for a in actions if a[1] == "remap"]
    assert remaps[0][0] == 30  # below since t=0, sustained 30 s
    assert remaps[1][0] >= max(remaps[0][0] + 120, 200 + 30)
    assert all(b[0] - a[0] >= 120 for a, b in zip(remaps, remaps[1:], strict=False))


def test_no_remap_on_a_brief_dip() -> None:
    world = World()
    actions = world.run(spec(), lambda t, w: (0.7 if 50 <= t < 70 else 0.95, 4000.0), until=300)
    assert actions == []


def test_scale_up_one_step_at_a_time_within_max_with_cooldown() -> None:
    world = World()
    actions = world.run(spec(), lambda t, w: (0.95, 30000.0), until=1200)
    sizes = [a[2] for a in actions if a[1] == "resize"]
    assert sizes == [3, 4, 5, 6]  # one rank (gpusPerPod 1) per step, stops at max 6
    times = [a[0] for a in actions if a[1] == "resize"]
    assert times[0] == 60
    assert all(b - a >= 120 for a, b in zip(times, times[1:], strict=False))


def test_scale_down_to_min_and_never_while_an_action_is_unfinished() -> None:
    world = World(ep_size=6, lag=100)
    actions = world.run(spec(), lambda t, w: (0.95, 1000.0), until=3000)
    sizes = [a[2] for a in actions if a[1] == "resize"]
    assert sizes == [5, 4, 3, 2]
    times = [a[0] for a in actions if a[1] == "resize"]
    assert all(b - a >= 300 for a, b in zip(times, times[1:], strict=False))


def test_oscillating_load_does_not_flap() -> None:
    """Load swinging across the band every 40 s (shorter than sustainedSeconds): no resizes."""
    world = World(ep_size=4)

    def series(t, w):  # type: ignore[no-untyped-def]
        return 0.95, (20000.0 if (t // 40) % 2 == 0 else 2000.0)

    assert world.run(spec(), series, until=2000) == []


def test_hysteresis_blocks_a_scale_down_that_would_scale_back_up() -> None:
    # 4 ranks at 900 tokens/s each (below low=1000); at 3 ranks it would be 1200, fine;
    # with high=1100 it would be above high x 0.8 = 880: blocked.
    world = World(ep_size=4)
    actions = world.run(
        spec(tokensPerRankLow=1000, tokensPerRankHigh=1100),
        lambda t, w: (0.95, 3600.0),
        until=1000,
    )
    assert actions == []


def test_missing_or_stale_metrics_mean_no_action() -> None:
    s = spec()
    assert decide(s, PolicyMemory(), None, 100.0).verb == "unavailable"
    stale = Snapshot(taken_at=0.0, ep_size=2, balancedness=0.1, rank_tokens_per_s=(1e9, 1e9))
    decision = decide(s, PolicyMemory(), stale, 1000.0)
    assert decision.verb == "unavailable" and "old" in decision.reason


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(min_value=0.0, max_value=50000.0), min_size=5, max_size=80),
    st.lists(st.floats(min_value=0.3, max_value=1.0), min_size=5, max_size=80),
)
def test_any_series_stays_within_bounds_and_cooldowns(loads, balances) -> None:  # type: ignore[no-untyped-def]
    world = World(ep_size=4, lag=10)
    s = spec()

    def series(t, w):  # type: ignore[no-untyped-def]
        i = int(t // 5)
        return balances[i % len(balances)], loads[i % len(loads)]

    actions = world.run(s, series, until=5 * 2 * max(len(loads), len(balances)))
    resizes = [a for a in actions if a[1] == "resize"]
    sizes = [4] + [a[2] for a in resizes]
    assert all(2 <= n <= 6 for n in sizes)
    assert all(abs(b - a) == 1 for a, b in zip(sizes, sizes[1:], strict=False))
    ups = [a[0] for a, before in zip(resizes, sizes, strict=False) if a[2] > before]
    downs = [a[0] for a, before in zip(resizes, sizes, strict=False) if a[2] < before]
    assert all(b - a >= 120 for a, b in zip(ups, ups[1:], strict=False))
    assert all(b - a >= 300 for a, b in zip(downs, downs[1:], strict=False))
    remaps = [a[0] for a in actions if a[1] == "remap"]
    assert all(b - a >= 120 for a, b in zip(remaps, remaps[1:], strict=False))
    assert not any(math.isnan(a[0]) for a in actions)


def test_scraped_rates_span_the_window_not_one_noisy_second() -> None:
    from moe_operator.metrics_source import RankScrape, rate_base, snapshot_from_scrapes

    def round_(t: float, tokens: list[float]) -> list[RankScrape]:
        return [RankScrape(t, len(tokens), 0.9, n, False, 0, 0) for n in tokens]

    # rank 0 serves in bursts (its counter: 1000, 1200, 1200, 1200, 1200, then 1500), rank 1
    # steadily (100 tokens a second)
    bursts = [1000.0, 1200.0, 1200.0, 1200.0, 1200.0]
    history = [round_(t, [bursts[t - 10], 100.0 * t]) for t in range(10, 15)]
    current = round_(15, [1500.0, 1500.0])
    base = rate_base(history, current, window_s=5.0)
    assert base is history[0]  # t = 10: five seconds back
    assert snapshot_from_scrapes(current, base).rank_tokens_per_s == (100.0, 100.0)
    # a one-second rate would have read the burst: 300 tokens/s on rank 0
    assert snapshot_from_scrapes(current, history[-1]).rank_tokens_per_s[0] == 300.0
    # after a resize the ranks differ: only rounds of the same ranks count
    assert rate_base(history, round_(15, [1.0, 2.0, 3.0]), 5.0) is None
    # nothing within the window: the latest earlier round
    assert rate_base(history, round_(40, [4000.0, 4000.0]), 5.0) is history[-1]


def test_an_external_scaler_owns_the_size_and_the_operator_never_fights_it() -> None:
    """elastic.scaler external: an HPA-style scaler sets the EP size (replicas = ceil(current
    x load / target), within its bounds, as an HPA computes them from the scale subresource);
    the operator's policy never writes a size of its own, whatever the load, but still remaps."""
    external = spec(scaler="external")
    world = World(ep_size=2)
    written: list[tuple[float, int]] = []

    def series(t, w):  # type: ignore[no-untyped-def]
        total = 30000.0 if t < 600 else 2000.0  # a burst, then quiet
        # the external scaler: target 4000 tokens/s per rank, bounds 2..6
        per_rank = total / w.ep_size
        desired = min(6, max(2, math.ceil(w.ep_size * per_rank / 4000.0)))
        if desired != w.ep_size and not w.applying:
            written.append((t, desired))
            w.applying.append((t + w.lag, "resize", desired))
        balance = 0.7 if w.mapping_generation == 0 else 0.95
        return balance, total

    actions = world.run(external, series, until=1200)
    assert [a for a in actions if a[1] == "resize"] == []  # the operator wrote no size
    assert [a[1] for a in actions] == ["remap"]  # but it did remap the low balancedness
    assert [size for _, size in written] == [6, 2]  # the scaler's sizes were carried out
    assert world.ep_size == 2
    # the same world with the operator as the scaler: it sizes by its own band
    owned = World(ep_size=2).run(spec(), lambda t, w: (0.95, 30000.0), until=300)
    assert [a[2] for a in owned if a[1] == "resize"][:1] == [3]

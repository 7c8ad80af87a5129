"""The load generator's traffic plan and statistics (pure)."""

from __future__ import annotations

from collections import Counter

import pytest
from pydantic import ValidationError

from moe_operator.loadgen.stats import RequestRecord, percentile, summarize
from moe_operator.loadgen.traffic import (
    TrafficPlan,
    arrival_times,
    draw_length,
    topic_vocabulary,
    topic_weights,
)
from moe_worker.config import LengthDistribution, RatePoint, TrafficConfig


def traffic(**fields: object) -> TrafficConfig:
    return TrafficConfig.model_validate({"concurrency": 4, **fields})


def test_arrivals_follow_the_rate_profile() -> None:
    profile = [RatePoint(at_s=0, requests_per_s=5), RatePoint(at_s=100, requests_per_s=50)]
    times = arrival_times(profile, 200.0, seed=1)
    slow = sum(1 for t in times if t < 100)
    fast = sum(1 for t in times if t >= 100)
    # Poisson counts: 500 +- 3 sigma (67) and 5000 +- 3 sigma (212)
    assert 433 <= slow <= 567 and 4788 <= fast <= 5212
    assert times == sorted(times) and 0 <= times[0] and times[-1] < 200
    assert arrival_times(profile, 200.0, seed=1) == times  # repeatable


def test_a_zero_rate_segment_sends_nothing() -> None:
    profile = [RatePoint(at_s=0, requests_per_s=0), RatePoint(at_s=10, requests_per_s=20)]
    assert min(arrival_times(profile, 20.0, seed=0)) >= 10


def test_topic_mix_is_skewed_and_its_hot_topic_rotates() -> None:
    config = traffic(topics=6, topic_skew=1.5, drift_period_s=10)
    before, after = topic_weights(config, 5.0), topic_weights(config, 15.0)
    assert sum(before) == pytest.approx(1) and before.index(max(before)) == 0
    assert after.index(max(after)) == 1 and after[1] == pytest.approx(before[0])
    plan = TrafficPlan(config)
    drawn = Counter(plan.request(i, 5.0).topic for i in range(3000))
    assert drawn.most_common(1)[0][0] == 0
    assert drawn[0] / 3000 == pytest.approx(before[0], abs=0.04)
    assert Counter(plan.request(i, 15.0).topic for i in range(3000)).most_common(1)[0][0] == 1


def test_requests_are_repeatable_and_topics_use_their_own_words() -> None:
    plan = TrafficPlan(traffic(prompt_words={"mean": 20}, output_tokens={"mean": 7}))
    first = plan.request(3, 1.0)
    assert first == plan.request(3, 1.0)
    assert len(first.prompt.split()) == 20 and first.max_tokens == 7
    assert set(first.prompt.split()) <= set(topic_vocabulary(first.topic))
    letters = [set("".join(topic_vocabulary(t))) for t in range(8)]
    assert min(len(a ^ b) for i, a in enumerate(letters) for b in letters[i + 1 :]) > 0


@pytest.mark.parametrize("kind", ["fixed", "uniform", "lognormal"])
def test_lengths_have_the_asked_mean(kind: str) -> None:
    import random

    rng = random.Random(0)
    distribution = LengthDistribution(mean=40, kind=kind, spread=0.5)
    values = [draw_length(distribution, rng) for _ in range(4000)]
    assert min(values) >= 1
    assert sum(values) / len(values) == pytest.approx(40, rel=0.05)
    if kind == "uniform":
        assert min(values) >= 20 and max(values) <= 60


def test_bad_traffic_is_refused_naming_the_field() -> None:
    with pytest.raises(ValidationError, match="concurrency: required"):
        TrafficConfig.model_validate({"durationS": 5})
    with pytest.raises(ValidationError, match="rateProfile: atS must start at 0"):
        TrafficConfig.model_validate({"rateProfile": [{"atS": 5, "requestsPerS": 1}]})


def test_summary_counts_and_percentiles() -> None:
    assert percentile([], 50) is None
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    ok = RequestRecord(0, 0, sent_at=1.0, first_token_at=1.1, finished_at=1.5, output_tokens=5)
    ok.chunk_gaps = [0.1] * 4
    ok.finish_reason = "length"
    failed = RequestRecord(1, 0, sent_at=1.0, error="HTTP 400", detail="max_tokens: ...")
    waiting = RequestRecord(2, 0, sent_at=1.2)
    summary = summarize([ok, failed, waiting], elapsed_s=2.0)
    assert summary["requests_completed"] == 1 and summary["requests_failed"] == 1
    assert summary["requests_in_flight"] == 1 and summary["failures"] == {"HTTP 400": 1}
    assert summary["ttft_p50_ms"] == pytest.approx(100) and summary["itl_p99_ms"] == pytest.approx(
        100
    )
    assert summary["e2e_p50_ms"] == pytest.approx(500) and summary["output_tokens_per_s"] == 2.5
    assert summary["finish_reasons"] == {"length": 1}

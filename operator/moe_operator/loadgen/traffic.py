"""What the load generator sends and when: pure functions of a ``TrafficConfig``.

Arrivals follow a piecewise-constant Poisson rate (the rate profile). Each request draws a topic
from a zipf-skewed mix whose ranking rotates by one every ``drift_period_s`` (so the hot topic,
and with it the experts the router prefers, moves), a prompt of that topic's words and an output
length. Request ``i`` is a function of (seed, i, send time) only, so runs repeat exactly.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from moe_worker.config import LengthDistribution, RatePoint, TrafficConfig

SYLLABLE_CONSONANTS = "bcdfghjklmnpqrstvwxz"
SYLLABLE_VOWELS = "aeiouy"
WORDS_PER_TOPIC = 48


@dataclass(frozen=True)
class PlannedRequest:
    """One request: its index, topic, prompt text and max_tokens."""

    index: int
    topic: int
    prompt: str
    max_tokens: int


def arrival_times(profile: list[RatePoint], duration_s: float, seed: int) -> list[float]:
    """Send times in [0, duration_s) of a Poisson process with the profile's rates."""
    rng = random.Random(f"arrivals:{seed}")
    times: list[float] = []
    bounds = [point.at_s for point in profile[1:]] + [duration_s]
    for point, end in zip(profile, bounds, strict=True):
        end = min(end, duration_s)
        at = point.at_s
        if point.requests_per_s <= 0:
            continue
        while True:
            at += rng.expovariate(point.requests_per_s)
            if at >= end:
                break
            times.append(at)
    return times


def topic_weights(config: TrafficConfig, at_s: float) -> list[float]:
    """Popularity of each topic at ``at_s`` (sums to 1): zipf over a ranking that rotates by
    one place every ``drift_period_s``."""
    shift = 0 if config.drift_period_s is None else int(at_s // config.drift_period_s)
    raw = [
        1.0 / ((topic - shift) % config.topics + 1) ** config.topic_skew
        for topic in range(config.topics)
    ]
    total = sum(raw)
    return [weight / total for weight in raw]


def draw_length(distribution: LengthDistribution, rng: random.Random) -> int:
    """One length from ``distribution`` (at least 1)."""
    mean, spread = distribution.mean, distribution.spread
    if distribution.kind == "fixed":
        value = float(mean)
    elif distribution.kind == "uniform":
        value = rng.uniform(mean * (1 - spread), mean * (1 + spread))
    else:
        sigma = math.sqrt(math.log1p(spread**2))
        value = rng.lognormvariate(math.log(mean) - sigma**2 / 2, sigma)
    return max(1, round(value))


def topic_vocabulary(topic: int) -> list[str]:
    """The words of ``topic``: built from syllables of its own letters (topics share few)."""
    rng = random.Random(f"topic:{topic}")
    consonants = rng.sample(SYLLABLE_CONSONANTS, 5)
    vowels = rng.sample(SYLLABLE_VOWELS, 2)
    words = []
    for _ in range(WORDS_PER_TOPIC):
        syllables = rng.randint(1, 3)
        words.append("".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(syllables)))
    return words


class TrafficPlan:
    """The requests of a run: ``request(i, at_s)`` is request i sent at ``at_s``."""

    def __init__(self, config: TrafficConfig) -> None:
        self.config = config
        self.vocabularies = [topic_vocabulary(topic) for topic in range(config.topics)]

    def send_times(self) -> list[float] | None:
        """Arrival times (rate profile), capped at max_requests; None for a closed loop."""
        if not self.config.rate_profile:
            return None
        times = arrival_times(self.config.rate_profile, self.config.duration_s, self.config.seed)
        if self.config.max_requests is not None:
            times = times[: self.config.max_requests]
        return times

    def request(self, index: int, at_s: float) -> PlannedRequest:
        rng = random.Random(f"request:{self.config.seed}:{index}")
        weights = topic_weights(self.config, at_s)
        topic = rng.choices(range(self.config.topics), weights)[0]
        words = draw_length(self.config.prompt_words, rng)
        prompt = " ".join(rng.choice(self.vocabularies[topic]) for _ in range(words))
        return PlannedRequest(index, topic, prompt, draw_length(self.config.output_tokens, rng))

"""Routing simulator: reproducible skewed and drifting expert popularity for synthetic models.

Per step it yields hidden states [T, H] and, per layer, the experts each token is routed to
([T, k], k distinct experts drawn from the layer's popularity [E]). Seeded by (seed, rank, step).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from moe_worker.config import ModelConfig, WorkloadConfig
from moe_worker.eplb.loadfile import read_loads


@dataclass
class Batch:
    hidden: torch.Tensor  # [T, H]
    routed: list[torch.Tensor]  # per layer [T, k]
    token_offset: int


def _zipf(num_experts: int, exponent: float) -> np.ndarray:
    weights = 1.0 / np.arange(1, num_experts + 1) ** exponent
    return weights / weights.sum()


class RoutingSimulator:
    def __init__(
        self,
        workload: WorkloadConfig,
        model: ModelConfig,
        num_layers: int,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        """``world``: ranks serving (an offered load is split over them; a resize sets it)."""
        self.workload = workload
        self.model = model
        self.num_layers = num_layers
        self.rank = rank
        self.world = world
        rng = np.random.default_rng(workload.seed)
        experts = model.num_experts
        # A fixed random order of experts per layer, so hot experts differ between layers.
        self.order = np.stack([rng.permutation(experts) for _ in range(num_layers)])
        if workload.kind == "trace":
            assert workload.trace_path is not None
            trace = read_loads(workload.trace_path)
            if trace.ndim != 2 or not np.isfinite(trace).all() or (trace < 0).any():
                raise ValueError("workload.tracePath: loads must be finite, >= 0, shape [L, E]")
            if trace.shape[1] != experts:
                raise ValueError(f"trace has {trace.shape[1]} experts, the model {experts}")
            rows = np.resize(np.arange(trace.shape[0]), num_layers)
            self.trace = trace[rows] / trace[rows].sum(axis=1, keepdims=True)

    def popularity(self, step: int) -> np.ndarray:
        """Expert popularity per layer at ``step``: [L, E], rows sum to 1."""
        experts = self.model.num_experts
        kind = self.workload.kind
        if kind == "uniform":
            return np.full((self.num_layers, experts), 1.0 / experts)
        if kind == "trace":
            return self.trace
        base = _zipf(experts, self.workload.zipf_exponent)
        shift = 0
        if kind == "drift":
            shift = int(experts * (step % self.workload.drift_period) / self.workload.drift_period)
        out = np.empty((self.num_layers, experts))
        for layer in range(self.num_layers):
            out[layer, np.roll(self.order[layer], shift)] = base
        return out

    def batch(self, step: int) -> Batch:
        tokens = self.workload.rank_tokens(step, self.rank, self.world)
        generator = torch.Generator().manual_seed(
            (self.workload.seed * 1_000_003 + self.rank * 10_007 + step) % (2**63)
        )
        hidden = torch.randn((tokens, self.model.hidden_size), generator=generator)
        popularity = torch.from_numpy(self.popularity(step)).float()
        routed = [
            torch.multinomial(
                popularity[layer].expand(tokens, -1), self.model.top_k, generator=generator
            )
            for layer in range(self.num_layers)
        ]
        return Batch(
            hidden=hidden, routed=routed, token_offset=(self.rank * 1_000_003 + step * tokens)
        )

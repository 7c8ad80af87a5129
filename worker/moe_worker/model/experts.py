"""Expert weights: the SwiGLU FFN, where weights come from, and the slots a rank holds.

Routed expert tensors (one expert): w_gate [I, H], w_up [I, H], w_down [H, I].
A rank's slots stack them: [S, I, H], [S, I, H], [S, H, I].
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol

import torch

from moe_worker.config import ModelConfig

from .ep_experts import gated_ffn
from .router import RouterWeights


@dataclass
class SharedExperts:
    """Always-on experts (one fused FFN), optionally scaled by sigmoid(x @ gate) (Qwen2-MoE)."""

    w_gate: torch.Tensor  # [I_s, H]
    w_up: torch.Tensor  # [I_s, H]
    w_down: torch.Tensor  # [H, I_s]
    gate: torch.Tensor | None = None  # [1, H]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = gated_ffn(x, self.w_gate, self.w_up, self.w_down)
        if self.gate is not None:
            out = out * torch.sigmoid(x @ self.gate.t())
        return out


class WeightSource(Protocol):
    """Where a model's weights come from; any rank can fetch any expert on its own."""

    config: ModelConfig

    def router(self, layer: int) -> RouterWeights: ...

    def expert(self, layer: int, expert: int) -> dict[str, torch.Tensor]: ...

    def shared(self, layer: int) -> SharedExperts | None: ...


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def seeded_generator(*key: object) -> torch.Generator:
    """A CPU generator seeded by a hash of ``key`` (the same on every rank and run)."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


class SyntheticSource:
    """Seeded random weights: each tensor depends only on (seed, layer, expert, name)."""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.dtype = DTYPES[config.dtype]

    def _randn(self, shape: tuple[int, ...], scale: float, *key: object) -> torch.Tensor:
        values = torch.randn(shape, generator=seeded_generator(self.config.seed, *key)) * scale
        return values.to(self.dtype)

    def router(self, layer: int) -> RouterWeights:
        c = self.config
        gate = self._randn((c.num_experts, c.hidden_size), c.hidden_size**-0.5, layer, "gate")
        bias = None
        if c.score_bias:
            bias = self._randn((c.num_experts,), 0.1, layer, "bias").float()
        return RouterWeights(gate=gate, score_bias=bias)

    def expert(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        c = self.config
        h, i = c.hidden_size, c.intermediate_size
        return {
            "w_gate": self._randn((i, h), h**-0.5, layer, expert, "w_gate"),
            "w_up": self._randn((i, h), h**-0.5, layer, expert, "w_up"),
            "w_down": self._randn((h, i), i**-0.5, layer, expert, "w_down"),
        }

    def shared(self, layer: int) -> SharedExperts | None:
        c = self.config
        if c.num_shared_experts == 0:
            return None
        h, i = c.hidden_size, c.intermediate_size * c.num_shared_experts
        return SharedExperts(
            w_gate=self._randn((i, h), h**-0.5, layer, "shared", "w_gate"),
            w_up=self._randn((i, h), h**-0.5, layer, "shared", "w_up"),
            w_down=self._randn((h, i), i**-0.5, layer, "shared", "w_down"),
        )


class FingerprintSource(SyntheticSource):
    """Synthetic weights whose every element encodes (layer, expert, tensor): for move tests.

    Element value = 100000 * layer + 10 * expert + tensor index + a small position pattern, so a
    slot holding the wrong expert (or a torn copy) is detected exactly.
    """

    def expert(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        weights = super().expert(layer, expert)
        out = {}
        for index, (name, tensor) in enumerate(weights.items()):
            pattern = torch.arange(tensor.numel(), dtype=torch.float32).reshape(tensor.shape) % 7
            code = 100000.0 * layer + 10.0 * expert + index
            out[name] = (code + pattern * 1e-3).to(self.dtype)
        return out

    @staticmethod
    def decode(tensor: torch.Tensor) -> tuple[int, int, int]:
        """(layer, expert, tensor index) that a fingerprinted tensor encodes."""
        code = int(round(float(tensor.float().flatten()[0])))
        return code // 100000, (code % 100000) // 10, code % 10

"""Expert weights: the SwiGLU FFN, where weights come from, and the slots a rank holds.

Routed expert tensors (one expert): w_gate [I, H], w_up [I, H], w_down [H, I].
A rank's slots stack them: [S, I, H], [S, I, H], [S, H, I].
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from moe_worker.config import ModelConfig

from .router import RouterWeights

EXPERT_TENSORS = ("w_gate", "w_up", "w_down")


def swiglu(
    x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor
) -> torch.Tensor:
    """SwiGLU FFN: x [N, H] -> [N, H] with w_gate/w_up [I, H], w_down [H, I]."""
    return (F.silu(x @ w_gate.t()) * (x @ w_up.t())) @ w_down.t()


@dataclass
class SharedExperts:
    """Always-on experts (one fused FFN), optionally scaled by sigmoid(x @ gate) (Qwen2-MoE)."""

    w_gate: torch.Tensor  # [I_s, H]
    w_up: torch.Tensor  # [I_s, H]
    w_down: torch.Tensor  # [H, I_s]
    gate: torch.Tensor | None = None  # [1, H]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = swiglu(x, self.w_gate, self.w_up, self.w_down)
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


def _generator(*key: object) -> torch.Generator:
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


class SyntheticSource:
    """Seeded random weights: each tensor depends only on (seed, layer, expert, name)."""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.dtype = DTYPES[config.dtype]

    def _randn(self, shape: tuple[int, ...], scale: float, *key: object) -> torch.Tensor:
        values = torch.randn(shape, generator=_generator(self.config.seed, *key)) * scale
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


def load_slots(
    source: WeightSource, layer: int, experts: list[int], device: torch.device
) -> dict[str, torch.Tensor]:
    """Stacked weights of the given experts (one per slot): name -> [S, ...]."""
    per_slot = [source.expert(layer, e) for e in experts]
    return {name: torch.stack([w[name] for w in per_slot]).to(device) for name in EXPERT_TENSORS}

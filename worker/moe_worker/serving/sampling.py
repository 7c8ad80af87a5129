"""Next-token choice per sequence: greedy (temperature 0) or temperature + top-p sampling.

Each request samples with its own ``torch.Generator`` (seeded from the request's ``seed`` when
given), so its tokens do not depend on what else shares the batch.
"""

from __future__ import annotations

import torch

from .backend import SamplingParams


def request_generator(params: SamplingParams) -> torch.Generator | None:
    """The request's own generator (None for greedy): seeded by ``params.seed`` or at random."""
    if params.temperature == 0:
        return None
    generator = torch.Generator()
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed)
    return generator


def token_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution a sampled request draws from: softmax(``logits`` [V] / temperature),
    cut to the top-p nucleus (not renormalised: ``multinomial`` takes weights). [V] float32 CPU.
    """
    probs = torch.softmax(logits.float().cpu() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        sorted_probs = torch.where(before < params.top_p, sorted_probs, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return probs


def sample_with_probs(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> tuple[int, torch.Tensor | None]:
    """One token id from ``logits`` [V] (any float dtype, any device), and the distribution it
    was drawn from (``token_probs``; None for greedy)."""
    if params.temperature == 0 or generator is None:
        return int(torch.argmax(logits).item()), None
    probs = token_probs(logits, params)
    return int(torch.multinomial(probs, 1, generator=generator).item()), probs


def sample_token(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> int:
    """One token id from ``logits`` [V] (any float dtype, any device)."""
    return sample_with_probs(logits, params, generator)[0]

"""Speculative decoding's decision: which of the draft's proposed tokens the main model keeps.

The draft proposes ``k`` tokens ``d_1 .. d_k``; one main-model forward over the last known
token and the proposals gives ``k + 1`` rows of logits. Greedy requests keep proposals while
they equal the main model's argmax and then take the main model's own argmax, so the output is
exactly the main model's greedy output. Sampled requests use rejection sampling: ``d_i`` is
kept with probability ``min(1, p_i(d_i) / q_i(d_i))`` (``p``: the main model's distribution,
``q``: the draft's, both after temperature and top-p); the first rejected position draws from
``max(0, p_i - q_i)`` renormalised, and when all are kept a bonus token is drawn from
``p_{k+1}``. Every emitted token is then distributed as the main model alone would sample it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .backend import SamplingParams
from .sampling import token_probs


@dataclass(frozen=True)
class Verdict:
    """The tokens one verification emits: the kept proposals then one token of the main
    model's (a correction or a bonus); ``accepted`` proposals were kept (0..k)."""

    tokens: list[int]
    accepted: int


def verify_greedy(proposed: list[int], target_logits: torch.Tensor) -> Verdict:
    """``proposed`` [k] draft tokens; ``target_logits`` [k + 1, V] the main model's rows."""
    best = torch.argmax(target_logits, dim=-1).tolist()
    accepted = 0
    while accepted < len(proposed) and proposed[accepted] == best[accepted]:
        accepted += 1
    return Verdict([*proposed[:accepted], int(best[accepted])], accepted)


def verify_sampled(
    proposed: list[int],
    draft_probs: list[torch.Tensor],
    target_logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator,
) -> Verdict:
    """Rejection sampling. ``draft_probs``: the draft's distribution [V] behind each proposal
    (``token_probs``); ``target_logits`` [k + 1, V]; ``generator``: the request's own."""
    for position, token in enumerate(proposed):
        target = token_probs(target_logits[position], params)
        target = target / target.sum()
        draft = draft_probs[position] / draft_probs[position].sum()
        keep = float(target[token]) / max(float(draft[token]), 1e-30)
        if float(torch.rand((), generator=generator)) < keep:
            continue
        residual = torch.clamp(target - draft, min=0.0)
        weights = residual if float(residual.sum()) > 0 else target
        correction = int(torch.multinomial(weights, 1, generator=generator).item())
        return Verdict([*proposed[:position], correction], position)
    bonus = token_probs(target_logits[len(proposed)], params)
    return Verdict(
        [*proposed, int(torch.multinomial(bonus, 1, generator=generator).item())], len(proposed)
    )

"""Router: scores every expert for every token and picks the top-k.

Shapes: hidden [T, H], gate [E, H], score bias [E]; returns ids [T, k] int64, weights [T, k].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_worker.config import ModelConfig


@dataclass
class RouterWeights:
    gate: torch.Tensor  # [E, H]
    score_bias: torch.Tensor | None = None  # [E], only for selection (DeepSeek-V3 style)


def route(
    hidden: torch.Tensor, weights: RouterWeights, config: ModelConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing: (expert ids [T, k], combine weights [T, k] float32).

    softmax or sigmoid scores; grouped top-k keeps the ``topk_groups`` best expert groups
    (group score: max for softmax, sum of the two best for sigmoid); the score-correction bias
    only changes which experts are selected, never the combine weights; weights are
    renormalised when configured, then scaled by ``routed_scaling_factor``.
    """
    logits = hidden.float() @ weights.gate.float().t()  # [T, E]
    scores = logits.softmax(dim=-1) if config.scoring == "softmax" else logits.sigmoid()
    selection = scores
    if weights.score_bias is not None:
        selection = scores + weights.score_bias.float()
    if config.num_expert_groups > 1:
        tokens, experts = selection.shape
        grouped = selection.view(tokens, config.num_expert_groups, -1)
        if config.scoring == "sigmoid":
            group_score = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(dim=-1)
        else:
            group_score = grouped.max(dim=-1).values
        keep = group_score.topk(config.topk_groups, dim=-1).indices  # [T, topk_groups]
        mask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep, True)
        mask = mask.unsqueeze(-1).expand_as(grouped).reshape(tokens, experts)
        selection = selection.masked_fill(~mask, float("-inf"))
    ids = selection.topk(config.top_k, dim=-1).indices
    combine = scores.gather(1, ids)
    if config.renormalize:
        combine = combine / combine.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    return ids, combine * config.routed_scaling_factor


def combine_weights_for(
    hidden: torch.Tensor, ids: torch.Tensor, weights: RouterWeights, config: ModelConfig
) -> torch.Tensor:
    """Combine weights [T, k] for given (e.g. simulated) expert ids, scored as ``route`` does."""
    logits = hidden.float() @ weights.gate.float().t()
    scores = logits.softmax(dim=-1) if config.scoring == "softmax" else logits.sigmoid()
    combine = scores.gather(1, ids)
    if config.renormalize:
        combine = combine / combine.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    return combine * config.routed_scaling_factor

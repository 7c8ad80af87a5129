"""Worker configuration models, shared with the operator. Torch-free (a boundary test checks).

Field names are camelCase on the wire (YAML/JSON, the CRD) and snake_case in Python.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

# The names registered in moe_worker.eplb.policy.POLICIES (a contract test keeps them equal;
# importing the registry here would pull numba into every config reader).
PolicyName = Literal["balanced", "deepseek", "incremental"]
CommunicatorName = Literal["auto", "torch_nccl", "torch_gloo", "pynccl"]


class WireModel(BaseModel):
    """camelCase aliases, unknown fields rejected, population by either name."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class EPLBConfig(WireModel):
    """Expert-parallel load balancing: when to rebalance, how to place, how to move weights."""

    enabled: bool = Field(True, description="Record expert load and rebalance.")
    window_size: int = Field(1000, gt=0, description="Steps of per-expert load kept in the window.")
    step_interval: int = Field(3000, gt=0, description="Steps between periodic rebalances.")
    num_redundant_experts: int = Field(
        0, ge=0, description="Physical slots beyond one per logical expert, over all ranks."
    )
    log_balancedness: bool = Field(False, description="Log balancedness every interval steps.")
    log_balancedness_interval: int = Field(
        1, gt=0, description="Steps between balancedness log lines."
    )
    use_async: bool = Field(
        True, description="Transfer weights in the background and commit layer by layer."
    )
    policy: PolicyName = Field(
        "incremental", description="Placement policy for rebalances (a registered name)."
    )
    communicator: CommunicatorName = Field(
        "auto", description="Weight-exchange backend; auto picks by platform and mode."
    )

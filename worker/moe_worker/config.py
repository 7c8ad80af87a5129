"""Worker configuration models, shared with the operator. Torch-free (a boundary test checks).

Field names are camelCase on the wire (YAML/JSON, the CRD) and snake_case in Python.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

# The names registered in moe_worker.eplb.policy.POLICIES (a contract test keeps them equal;
# importing the registry here would pull numba into every config reader).
PolicyName = Literal["balanced", "deepseek", "incremental"]
CommunicatorName = Literal["auto", "torch_nccl", "torch_gloo", "pynccl"]
# The synthetic families of moe_worker.model.families.FAMILIES (a contract test keeps them
# equal); checkpoints may also be of the checkpoint-only families there (dense, vision-language).
FamilyName = Literal["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3"]


class WireModel(BaseModel):
    """camelCase aliases, unknown fields rejected, population by either name."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        strict=True,
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
    moved_fraction: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Move budget of a rebalance or resize for the incremental policy: at most "
        "this fraction of all expert copies, spent where a copy buys the most balancedness "
        "(other policies re-plan whole); unset: the policy's own target decides.",
    )
    replica_shares: bool = Field(
        False,
        description="Split each expert's tokens over its replicas by fitted shares instead of "
        "evenly, and choose the incremental policy's moves with them: the same balance for a "
        "fraction of the moved copies (incremental policy only).",
    )
    communicator: CommunicatorName = Field(
        "auto", description="Weight-exchange backend; auto picks by platform and mode."
    )
    rebalance_timeout_s: float = Field(
        120.0, gt=0, description="Deadline of a rebalance; past it every rank abandons it."
    )
    initial_placement_file: str | None = Field(
        None,
        description="Placement to start from (the JSON of `moe-eplb plan --out`, phy2log "
        "[MoE layers, slots]); unset: slot p holds expert p mod numExperts.",
    )

    def policy_options(self) -> dict[str, Any]:
        """Options of ``compute_placement`` for this config's policy."""
        options: dict[str, Any] = {}
        if self.policy == "incremental" and self.moved_fraction is not None:
            options["moved_fraction"] = self.moved_fraction
        if self.policy == "incremental" and self.replica_shares:
            options["shares"] = True
        return options


class ModelSpec(WireModel):
    """An MoE model: synthetic (seeded random, any size) or an HF-format checkpoint directory."""

    source: Literal["synthetic", "checkpoint"] = Field("synthetic", description="Weight source.")
    path: str | None = Field(None, description="Checkpoint directory (config.json + safetensors).")
    seed: int = Field(0, ge=0, description="Seed of synthetic weights.")
    family: FamilyName = Field(
        "qwen3_moe", description="Model family of a synthetic model (transformers' model_type)."
    )
    num_layers: int = Field(2, gt=0, description="MoE layers (synthetic).")
    hidden_size: int = Field(64, gt=0, description="Hidden size H (synthetic).")
    num_experts: int = Field(16, gt=0, description="Routed (logical) experts per layer E.")
    top_k: int = Field(2, gt=0, description="Experts per token.")
    intermediate_size: int = Field(32, gt=0, description="Routed expert FFN size I (synthetic).")
    num_shared_experts: int = Field(0, ge=0, description="Shared experts per layer (synthetic).")
    scoring: Literal["softmax", "sigmoid"] = Field("softmax", description="Router scoring.")
    renormalize: bool = Field(True, description="Renormalise the top-k weights to sum to 1.")
    num_expert_groups: int = Field(1, gt=0, description="Expert groups for grouped top-k.")
    topk_groups: int = Field(1, gt=0, description="Groups a token may route into.")
    score_bias: bool = Field(False, description="Score-correction bias for selection (V3).")
    routed_scaling_factor: float = Field(1.0, gt=0, description="Scale of the routed output.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Weights.")
    rms_norm_eps: float = Field(1e-6, gt=0, description="RMSNorm epsilon between layers.")

    @model_validator(mode="after")
    def _consistent(self) -> ModelSpec:
        if self.source == "checkpoint" and not self.path:
            raise ValueError("path: required when source is checkpoint")
        if self.source == "synthetic" and self.path:
            raise ValueError("path: only valid when source is checkpoint")
        if self.top_k > self.num_experts:
            raise ValueError(f"topK ({self.top_k}) must be <= numExperts ({self.num_experts})")
        if self.num_experts % self.num_expert_groups:
            raise ValueError("numExperts must be divisible by numExpertGroups")
        if self.topk_groups > self.num_expert_groups:
            raise ValueError("topkGroups must be <= numExpertGroups")
        per_group = self.num_experts // self.num_expert_groups
        if self.top_k > self.topk_groups * per_group:
            raise ValueError("topK must be <= topkGroups x experts per group")
        return self


class DraftModelConfig(ModelSpec):
    """A speculative draft model: proposes ``numSpeculativeTokens`` tokens that the main model
    verifies in one forward. It shares the main model's tokenizer (same vocabulary); its MoE
    layers run expert-parallel and EPLB balances them like the main model's."""

    num_speculative_tokens: int = Field(
        3, ge=1, le=16, description="Tokens the draft proposes per step (k)."
    )


class ModelConfig(ModelSpec):
    """The served model (for checkpoints: the experts per layer of its MoE layers; a main
    model without MoE layers needs an MoE draft for EPLB), and an optional draft model."""

    draft: DraftModelConfig | None = Field(
        None, description="Speculative decoding: the draft model (serving only)."
    )


class WorkloadConfig(WireModel):
    """Where batches come from: the routing simulator for synthetic models."""

    kind: Literal["uniform", "zipf", "drift", "trace"] = Field("zipf", description="Load shape.")
    tokens_per_step: int = Field(64, gt=0, description="Tokens per rank per step.")
    zipf_exponent: float = Field(1.2, gt=0, description="Skew s of zipf: popularity ~ 1/rank^s.")
    drift_period: int = Field(200, gt=0, description="Steps for drifting hot spots to rotate once.")
    trace_path: str | None = Field(None, description="Per-expert count trace [L, E] (.json/.npy).")
    seed: int = Field(0, ge=0, description="Seed of the simulator.")
    offered_tokens_per_step: int | None = Field(
        None,
        gt=0,
        description="Tokens per step offered to the whole deployment, split over the ranks "
        "serving, so a resize changes each rank's share (unset: tokensPerStep on every rank).",
    )
    load_profile: list[float] = Field(
        default_factory=list,
        description="Factors on the offered load, each held for profilePeriodSteps steps, "
        "cycling (e.g. [1, 3, 1]: a burst); empty: constant.",
    )
    profile_period_steps: int = Field(200, gt=0, description="Steps each loadProfile factor lasts.")
    steps_per_second: float | None = Field(
        None, gt=0, description="Pace the step loop at this rate (unset: as fast as it runs)."
    )

    @model_validator(mode="after")
    def _trace_needs_path(self) -> WorkloadConfig:
        if (self.kind == "trace") != (self.trace_path is not None):
            raise ValueError("tracePath: required exactly when kind is trace")
        if any(factor <= 0 for factor in self.load_profile):
            raise ValueError("loadProfile: every factor must be > 0")
        return self

    def factor(self, step: int) -> float:
        """The load profile's factor at ``step`` (1 without a profile)."""
        if not self.load_profile:
            return 1.0
        return self.load_profile[(step // self.profile_period_steps) % len(self.load_profile)]

    def rank_tokens(self, step: int, rank: int, world: int) -> int:
        """Tokens rank ``rank`` of ``world`` processes at ``step`` (at least 1)."""
        if self.offered_tokens_per_step is None:
            return max(1, round(self.tokens_per_step * self.factor(step)))
        total = round(self.offered_tokens_per_step * self.factor(step))
        share, extra = divmod(total, world)
        return max(1, share + (1 if rank < extra else 0))


class RatePoint(WireModel):
    """From ``at_s`` seconds into the run, requests arrive at ``requests_per_s`` (Poisson)."""

    at_s: float = Field(..., ge=0, description="Seconds from the start of the run.")
    requests_per_s: float = Field(..., ge=0, description="Arrival rate from then on (0: none).")


class LengthDistribution(WireModel):
    """A length drawn per request: ``fixed`` (the mean), ``uniform`` (mean +- spread * mean) or
    ``lognormal`` (mean, coefficient of variation ``spread``); at least 1."""

    mean: int = Field(..., gt=0, description="Mean length.")
    kind: Literal["fixed", "uniform", "lognormal"] = Field("fixed", description="Shape.")
    spread: float = Field(0.5, ge=0, le=1, description="Relative width (uniform) or CV.")


class TrafficConfig(WireModel):
    """Request traffic of the load generator (``moe-eplb bench-serve``): when requests arrive,
    how long their prompts and outputs are, and which topics they draw from (a skewed mix whose
    hot topic rotates, so the experts the router picks shift over time)."""

    duration_s: float = Field(60.0, gt=0, description="Seconds to send requests for.")
    max_requests: int | None = Field(None, gt=0, description="Stop after this many requests.")
    concurrency: int | None = Field(
        None,
        gt=0,
        description="Requests in flight at most; without a rate profile, this many clients each "
        "send their next request when the last one ends.",
    )
    rate_profile: list[RatePoint] = Field(
        default_factory=list,
        description="Arrival rate over time, piecewise constant (empty: closed loop).",
    )
    prompt_words: LengthDistribution = Field(
        default_factory=lambda: LengthDistribution(mean=32), description="Prompt length, words."
    )
    output_tokens: LengthDistribution = Field(
        default_factory=lambda: LengthDistribution(mean=32), description="max_tokens per request."
    )
    ignore_eos: bool = Field(True, description="Generate max_tokens whatever the model samples.")
    topics: int = Field(8, gt=0, le=64, description="Topics in the prompt mix.")
    topic_skew: float = Field(1.2, ge=0, description="Zipf exponent of topic popularity.")
    drift_period_s: float | None = Field(
        None, gt=0, description="Seconds after which the popularity ranking rotates by one."
    )
    seed: int = Field(0, ge=0, description="Seed of arrivals, lengths and prompts.")

    @model_validator(mode="after")
    def _closed_loop_needs_clients(self) -> TrafficConfig:
        if not self.rate_profile and self.concurrency is None:
            raise ValueError("concurrency: required when rateProfile is empty (closed loop)")
        times = [point.at_s for point in self.rate_profile]
        if times != sorted(times) or (times and times[0] != 0):
            raise ValueError("rateProfile: atS must start at 0 and increase")
        return self


class MetricsConfig(WireModel):
    """Prometheus metrics served by every rank."""

    enabled: bool = Field(True, description="Serve /metrics, /healthz and /readyz.")
    port: int = Field(
        9400, ge=0, lt=65536, description="Port of rank 0 on a host; local rank r uses port + r."
    )
    per_expert: bool = Field(False, description="Export per-expert load (layer x expert series).")
    update_interval: int = Field(10, gt=0, description="Steps between balancedness updates.")


class ControlConfig(WireModel):
    """The leader's control API (bearer token from a file or MOE_CONTROL_TOKEN)."""

    enabled: bool = Field(True, description="Serve the control API on the leader (rank 0).")
    port: int = Field(9390, ge=0, lt=65536, description="Port of the control API.")
    token_file: str | None = Field(None, description="File holding the bearer token.")


class ElasticConfig(WireModel):
    """Live resizes and recovery from a dead rank."""

    collective_timeout_s: float = Field(
        60.0, gt=0, description="A collective waiting this long on a peer fails (hung rank)."
    )
    replacement_timeout_s: float = Field(
        300.0,
        gt=0,
        description="After a rank dies, how long the survivors wait for its replacement.",
    )
    join_timeout_s: float = Field(
        3600.0, gt=0, description="How long a joining rank waits to be taken into a generation."
    )
    drain_timeout_s: float = Field(
        120.0,
        gt=0,
        description="A scale-down waits this long at most for the leaving ranks to finish "
        "their requests (they admit no new ones meanwhile); what is left after it fails.",
    )
    leader_rejoin_window_s: float = Field(
        2.0,
        ge=0,
        description=(
            "A starting leader (rank 0) first waits this long for survivors of a group it led "
            "before it died; if any report, it takes them back instead of starting afresh."
        ),
    )


class ServingLimits(WireModel):
    """The OpenAI-compatible API of every rank and its batching limits (a MoEDeployment's
    ``spec.serving``)."""

    port: int = Field(
        8000, ge=0, lt=65536, description="API port of rank 0 on a host; local rank r: port + r."
    )
    model_name: str | None = Field(
        None, max_length=256, description="Model id in the API (default: the checkpoint's name)."
    )
    max_model_len: int | None = Field(
        None,
        gt=1,
        description="Prompt + output tokens per sequence (default: the model's "
        "max_position_embeddings, at most 8192).",
    )
    max_running_requests: int = Field(
        64, gt=0, description="Sequences in a rank's running batch at most."
    )
    max_waiting_requests: int = Field(
        256, ge=0, description="Queued requests per rank beyond which requests get 503."
    )
    max_batch_tokens: int = Field(
        512, gt=0, description="Tokens per step per rank (decodes first, then prefill chunks)."
    )
    idle_wait_s: float = Field(
        1.0, gt=0, description="Longest wait of idle ranks before they check control flags."
    )

    @model_validator(mode="after")
    def _budget_holds_the_batch(self) -> ServingLimits:
        if self.max_batch_tokens < self.max_running_requests:
            raise ValueError(
                f"maxBatchTokens ({self.max_batch_tokens}) must be >= maxRunningRequests "
                f"({self.max_running_requests}): every running sequence decodes each step"
            )
        return self


class ServingConfig(ServingLimits):
    """Real inference: an OpenAI-compatible API per rank over a transformers model."""

    enabled: bool = Field(
        False,
        description="Serve requests with the real model (else the routing simulator drives "
        "the MoE layers, a benchmark mode).",
    )


class WorkerConfig(WireModel):
    """Everything one rank needs besides its rank and the rendezvous address."""

    deployment: str = Field(
        "local", min_length=1, max_length=253, description="Deployment name (metric label)."
    )
    metrics: MetricsConfig = Field(default_factory=lambda: MetricsConfig())
    control: ControlConfig = Field(default_factory=lambda: ControlConfig())
    model: ModelConfig = Field(default_factory=lambda: ModelConfig())
    eplb: EPLBConfig = Field(default_factory=lambda: EPLBConfig())
    workload: WorkloadConfig = Field(default_factory=lambda: WorkloadConfig())
    elastic: ElasticConfig = Field(default_factory=lambda: ElasticConfig())
    serving: ServingConfig = Field(default_factory=lambda: ServingConfig())
    check_outputs: bool = Field(
        False,
        description="Compare every step's output with a dense single-process reference "
        "(tests and demos; costs a dense forward per step).",
    )
    ep_size: int = Field(1, gt=0, description="EP ranks.")
    num_nodes: int = Field(
        1,
        gt=0,
        description="Nodes the ranks span, each holding an equal block of consecutive ranks "
        "(node-aware placement packs expert groups onto nodes; checked against the ranks' "
        "NODE_NAME, else placement goes flat).",
    )
    steps: int = Field(0, ge=0, description="Steps to run; 0 runs until stopped.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA if present.")

    @model_validator(mode="after")
    def _slots_divide(self) -> WorkerConfig:
        physical = self.model.num_experts + self.eplb.num_redundant_experts
        if physical % self.ep_size:
            raise ValueError(
                f"numExperts + eplb.numRedundantExperts ({physical}) must be divisible by "
                f"epSize ({self.ep_size})"
            )
        if self.model.draft is not None and not self.serving.enabled:
            raise ValueError("model.draft: speculative decoding needs serving.enabled: true")
        if self.ep_size % self.num_nodes:
            raise ValueError(f"numNodes: must divide epSize ({self.ep_size}), got {self.num_nodes}")
        return self

    @property
    def num_physical(self) -> int:
        return self.model.num_experts + self.eplb.num_redundant_experts

    @property
    def slots_per_rank(self) -> int:
        return self.num_physical // self.ep_size

    def resized(self, ep_size: int) -> WorkerConfig:
        """This config at ``ep_size`` ranks with the same slots per rank (elastic EP)."""
        redundant = ep_size * self.slots_per_rank - self.model.num_experts
        eplb = self.eplb.model_copy(update={"num_redundant_experts": redundant})
        return self.model_copy(update={"ep_size": ep_size, "eplb": eplb})


class RankEnv(WireModel):
    """This process's place in the group, from the environment the pod template sets.

    WORLD_SIZE is the size of the group the deployment starts with; a rank at or beyond it
    (a scale-up's new pod) joins the running group when a resize takes it in.
    """

    rank: int = Field(ge=0)
    world_size: int = Field(gt=0, description="Ranks of the initial group.")
    master_addr: str = "127.0.0.1"
    master_port: int = Field(29500, gt=0, lt=65536)

    @classmethod
    def from_environ(cls, environ: dict[str, str]) -> RankEnv:
        """RANK, or (in a StatefulSet pod) POD_NAME's ordinal x LOCAL_WORLD_SIZE + LOCAL_RANK
        (LOCAL_RANK 0 in a one-GPU pod, where no launcher sets it)."""
        rank = environ.get("RANK")
        if rank is None and "POD_NAME" in environ:
            ordinal = int(environ["POD_NAME"].rsplit("-", 1)[1])
            per_pod = int(environ.get("LOCAL_WORLD_SIZE", "1"))
            rank = str(ordinal * per_pod + int(environ.get("LOCAL_RANK", "0")))
        missing = [
            n for n, v in (("RANK", rank), ("WORLD_SIZE", environ.get("WORLD_SIZE"))) if v is None
        ]
        if missing:
            raise ValueError(f"environment lacks {', '.join(missing)}")
        assert rank is not None
        return cls(
            rank=int(rank),
            world_size=int(environ["WORLD_SIZE"]),
            master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(environ.get("MASTER_PORT", "29500")),
        )

"""The MoEDeployment API (group moe.eplb.dev, version v1alpha1): the single source of the CRD.

The EPLB, model, serving, workload (request traffic) and simulator sections reuse the worker's
own config models, so what the CRD accepts is exactly what a worker (or the load generator) can
run. Cross-field rules live in ``CROSS_FIELD_RULES``: the
same rule is checked here (pydantic) and in the API server (a CEL expression in the CRD).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from moe_worker.config import (
    EPLBConfig,
    ModelConfig,
    ServingLimits,
    TrafficConfig,
    WireModel,
    WorkloadConfig,
)

GROUP = "moe.eplb.dev"
VERSION = "v1alpha1"
KIND = "MoEDeployment"
PLURAL = "moedeployments"
SINGULAR = "moedeployment"
SHORT_NAMES = ["moed"]
QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|Mi|Gi|Ti|Pi|M|G|T|P|E|Ei)?$"


def _quantity_text(value: Any) -> Any:
    """A Kubernetes quantity may be written as a number (``cpu: 4``); kept as its text."""
    if isinstance(value, bool):
        return value  # rejected as not a string
    if isinstance(value, int):
        return str(value)
    return value


# A Kubernetes quantity: a number or a string such as "500m" or "32Gi" (int-or-string, as the
# core API's quantities are in the OpenAPI schema).
Quantity = Annotated[
    str,
    BeforeValidator(_quantity_text),
    Field(pattern=QUANTITY),
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": QUANTITY,  # a string's; an integer is a whole number of units
            "x-kubernetes-int-or-string": True,
        }
    ),
]


LABEL_KEY_PATTERN = r"^([a-z0-9.-]+/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
AFFINITY_KINDS = {"nodeAffinity", "podAffinity", "podAntiAffinity"}


class ApiModel(WireModel):
    """camelCase on the wire, unknown fields rejected (the worker config's conventions)."""


class ParallelismSpec(ApiModel):
    """How the experts are spread: EP ranks, GPUs per pod, slots per rank, nodes."""

    pods: int = Field(
        ge=1,
        le=4096,
        description=(
            "Pods of the group, the scale subresource's replicas (what `kubectl scale` and an "
            "HPA set); the EP size is pods x gpusPerPod."
        ),
    )
    gpus_per_pod: int = Field(1, ge=1, le=16, description="EP ranks (GPUs) in one pod.")
    slots_per_rank: int | None = Field(
        None,
        ge=1,
        le=4096,
        description=(
            "Physical expert slots per rank, fixed across elastic resizes; default: "
            "(experts + redundant) / EP size, taking elastic.minExpertParallelSize as the EP "
            "size when elastic is on."
        ),
    )
    num_nodes: int = Field(
        1,
        ge=1,
        le=1024,
        description="Nodes the pods span (pods divisible by it), for node-aware placement.",
    )

    @property
    def expert_parallel_size(self) -> int:
        """EP ranks in total: pods x gpusPerPod."""
        return self.pods * self.gpus_per_pod

    @property
    def ep_step(self) -> int:
        """The EP sizes a deployment may take are multiples of this: a pod on every node."""
        return self.gpus_per_pod * self.num_nodes


class CheckpointVolume(ApiModel):
    """Where a checkpoint model's files come from (mounted read-only at model.path)."""

    claim_name: str = Field(min_length=1, max_length=253, description="PersistentVolumeClaim.")
    mount_path: str = Field("/models", pattern=r"^/", description="Mount path in the pod.")


class RemapPolicy(ApiModel):
    """When the operator asks for an expert remap."""

    balancedness_threshold: float = Field(0.9, gt=0, le=1, description="Remap below this.")
    sustained_seconds: int = Field(60, ge=0, description="How long it must stay below.")
    min_interval_seconds: int = Field(300, ge=0, description="Least time between remaps.")


class ElasticPolicy(ApiModel):
    """When the operator resizes expert parallelism."""

    enabled: bool = Field(False, description="Resize EP live (without re-deploying).")
    scaler: Literal["operator", "external"] = Field(
        "operator",
        description="Who sets the EP size: the operator's policy (per-rank load band, via the "
        "scale subresource), or something external (an HPA, KEDA, a GitOps tool or a person, "
        "via the scale subresource or the spec): then the operator only carries the size out "
        "live and never writes it, so the two never fight.",
    )
    min_expert_parallel_size: int = Field(1, ge=1, description="Smallest EP size.")
    max_expert_parallel_size: int = Field(64, ge=1, description="Largest EP size.")
    tokens_per_rank_low: float = Field(1000.0, ge=0, description="Scale down below (tokens/s).")
    tokens_per_rank_high: float = Field(10000.0, gt=0, description="Scale up above (tokens/s).")
    sustained_seconds: int = Field(120, ge=0, description="How long load must stay outside.")
    scale_up_cooldown_seconds: int = Field(300, ge=0, description="Least time between ups.")
    scale_down_cooldown_seconds: int = Field(900, ge=0, description="Least time between downs.")


class MetricsSpec(ApiModel):
    """What the workers export and where the operator reads it."""

    port: int = Field(9400, ge=1024, le=65535, description="Metrics port of rank 0 in a pod.")
    per_expert: bool = Field(False, description="Export per-expert load series.")
    prometheus_url: str | None = Field(
        None, pattern=r"^https?://", description="Prometheus to query; unset: scrape the pods."
    )


class ControlSpec(ApiModel):
    """Rank 0's control API: remap, resize and state, behind the deployment's bearer token."""

    port: int = Field(
        9390,
        ge=1024,
        le=65535,
        description="Control port of rank 0 (the NetworkPolicy lets only the operator in).",
    )


class ResourceSpec(ApiModel):
    """Per-pod CPU and memory (GPUs come from parallelism.gpusPerPod)."""

    cpu: Quantity = Field("4", description="CPU request and limit.")
    memory: Quantity = Field("32Gi", description="Memory request and limit.")
    shm: Quantity = Field("8Gi", description="Size of the /dev/shm memory volume.")


class Toleration(ApiModel):
    key: str | None = None
    operator: Literal["Exists", "Equal"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = Field(None, ge=0)


class EnvVar(ApiModel):
    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=256)
    value: str = Field("", max_length=32768)


class PodOverrides(ApiModel):
    """What the worker pods' template takes beyond the defaults, as KServe, LWS and KubeAI
    users ask for: a gang scheduler, a runtime class, pull secrets, RDMA devices, IPC_LOCK,
    a longer start for big checkpoints, pod annotations."""

    scheduler_name: str | None = Field(
        None, max_length=253, description="Scheduler of the pods (e.g. a gang scheduler)."
    )
    runtime_class_name: str | None = Field(None, max_length=253, description="RuntimeClass.")
    image_pull_secrets: list[str] = Field(
        default_factory=list, description="Secrets to pull the worker image with."
    )
    annotations: dict[str, str] = Field(default_factory=dict, description="Pod annotations.")
    extra_resources: dict[str, Quantity] = Field(
        default_factory=dict,
        description="More extended resources per pod, requested and limited alike (e.g. "
        "rdma/hca_shared_devices_a: 1).",
    )
    add_capabilities: list[Literal["IPC_LOCK", "SYS_RESOURCE", "SYS_PTRACE", "NET_ADMIN"]] = Field(
        default_factory=list,
        description="Linux capabilities the worker keeps (all others dropped); IPC_LOCK "
        "for RDMA memory registration.",
    )
    startup_timeout_seconds: int = Field(
        600,
        ge=30,
        le=86400,
        description="How long a pod may take to start (load its checkpoint) before it is "
        "restarted.",
    )
    automount_service_account_token: bool = Field(
        False, description="Mount a service-account token (the workers call no Kubernetes API)."
    )


class MoEDeploymentSpec(ApiModel):
    """Desired state of a Mixture-of-Experts deployment with expert-parallel load balancing."""

    image: str = Field(min_length=1, max_length=1024, description="Worker image.")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        "IfNotPresent", description="Image pull policy."
    )
    model: ModelConfig = Field(default_factory=lambda: ModelConfig())
    checkpoint_volume: CheckpointVolume | None = Field(
        None, description="Volume with the checkpoint (model.source: checkpoint)."
    )
    parallelism: ParallelismSpec
    eplb: EPLBConfig = Field(default_factory=lambda: EPLBConfig())
    serving: ServingLimits = Field(
        default_factory=lambda: ServingLimits(),
        description="The OpenAI-compatible API every rank serves (Service <name>, port http).",
    )
    workload: TrafficConfig = Field(
        default_factory=lambda: TrafficConfig(concurrency=4),
        description="Request traffic that `moe-eplb run` (the local runtime) sends to the "
        "deployment's endpoint: rate profile, lengths and a skewed, drifting prompt mix.",
    )
    api_ingress: Literal["namespace", "any"] = Field(
        "namespace",
        description="Who the NetworkPolicy lets reach the API port: pods of the namespace, or "
        "any source (e.g. an ingress controller elsewhere). The control port stays the "
        "operator's alone.",
    )
    simulator: WorkloadConfig | None = Field(
        None,
        description="Benchmark mode: the routing simulator drives the MoE layers instead of "
        "requests (no API is served); unset: the ranks serve requests.",
    )
    remap: RemapPolicy = Field(default_factory=lambda: RemapPolicy())
    elastic: ElasticPolicy = Field(default_factory=lambda: ElasticPolicy())
    metrics: MetricsSpec = Field(default_factory=lambda: MetricsSpec())
    control: ControlSpec = Field(default_factory=lambda: ControlSpec())
    resources: ResourceSpec = Field(default_factory=lambda: ResourceSpec())
    node_selector: dict[str, str] = Field(default_factory=dict, description="Pod nodeSelector.")
    tolerations: list[Toleration] = Field(default_factory=list, description="Pod tolerations.")
    affinity: dict[str, Any] | None = Field(
        None,
        description="Pod affinity (nodeAffinity, podAffinity, podAntiAffinity), as in a Pod.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
    priority_class_name: str | None = Field(None, max_length=253, description="Pod priority.")
    service_account_name: str | None = Field(None, max_length=253, description="Pod identity.")
    env: list[EnvVar] = Field(default_factory=list, description="Extra worker environment.")
    pod: PodOverrides = Field(
        default_factory=lambda: PodOverrides(), description="Pod template escape hatches."
    )

    @field_validator("node_selector")
    @classmethod
    def _label_keys(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if not re.fullmatch(LABEL_KEY_PATTERN, key):
                raise ValueError(f"{key!r} is not a valid label key")
        return value

    @field_validator("affinity")
    @classmethod
    def _affinity_kinds(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        for key in value or {}:
            if key not in AFFINITY_KINDS:
                raise ValueError(f"{key!r} is not one of {', '.join(sorted(AFFINITY_KINDS))}")
        return value

    @model_validator(mode="after")
    def _cross_field(self) -> MoEDeploymentSpec:
        broken = [f"{r.field}: {r.message}" for r in CROSS_FIELD_RULES if not r.check(self)]
        if broken:
            raise ValueError("\n".join(broken))  # one line per rule, as CEL reports them
        return self

    @property
    def slots_per_rank(self) -> int:
        """Slots per rank: given, or enough for every expert plus the redundant ones at the
        reference EP size (the elastic minimum when elastic is on, else the EP size). It stays
        fixed across elastic resizes, so redundancy grows with the EP size."""
        if self.parallelism.slots_per_rank is not None:
            return self.parallelism.slots_per_rank
        physical = self.model.num_experts + self.eplb.num_redundant_experts
        reference = (
            self.elastic.min_expert_parallel_size
            if self.elastic.enabled
            else self.parallelism.expert_parallel_size
        )
        return -(-physical // reference)

    @property
    def base_ep_size(self) -> int:
        """The EP size written into the pod template and worker config. With elastic on it is
        the elastic minimum, so EP changes never roll pods: the group starts there and is
        resized live; otherwise it is the EP size (a change re-deploys)."""
        if self.elastic.enabled:
            return self.elastic.min_expert_parallel_size
        return self.parallelism.expert_parallel_size


# Fields fixed once a deployment exists (the model's shape and the pod's GPUs): checked by
# the webhook and, as CEL transition rules on update, by the API server itself.
IMMUTABLE_FIELDS: tuple[tuple[str, ...], ...] = (
    ("spec", "model", "source"),
    ("spec", "model", "numLayers"),
    ("spec", "model", "numExperts"),
    ("spec", "model", "hiddenSize"),
    ("spec", "model", "intermediateSize"),
    ("spec", "model", "topK"),
    ("spec", "parallelism", "gpusPerPod"),
)


@dataclass(frozen=True)
class CrossFieldRule:
    """One rule over several fields, as Python (operator, CLI) and as CEL (API server)."""

    field: str
    message: str
    cel: str
    check: Callable[[MoEDeploymentSpec], bool]


EP_SIZE_CEL = "(self.parallelism.pods * self.parallelism.gpusPerPod)"
EP_STEP_CEL = "(self.parallelism.gpusPerPod * self.parallelism.numNodes)"

CROSS_FIELD_RULES: tuple[CrossFieldRule, ...] = (
    CrossFieldRule(
        "spec.parallelism.slotsPerRank",
        "the EP size (pods x gpusPerPod) x slotsPerRank must be >= model.numExperts",
        f"!has(self.parallelism.slotsPerRank) || {EP_SIZE_CEL} * "
        "self.parallelism.slotsPerRank >= self.model.numExperts",
        lambda s: (
            s.parallelism.slots_per_rank is None
            or s.parallelism.expert_parallel_size * s.parallelism.slots_per_rank
            >= s.model.num_experts
        ),
    ),
    CrossFieldRule(
        "spec.elastic",
        "minExpertParallelSize <= the EP size (parallelism.pods x gpusPerPod) <= "
        "maxExpertParallelSize",
        f"!self.elastic.enabled || (self.elastic.minExpertParallelSize <= {EP_SIZE_CEL} && "
        f"{EP_SIZE_CEL} <= self.elastic.maxExpertParallelSize)",
        lambda s: (
            not s.elastic.enabled
            or s.elastic.min_expert_parallel_size
            <= s.parallelism.expert_parallel_size
            <= s.elastic.max_expert_parallel_size
        ),
    ),
    CrossFieldRule(
        "spec.elastic",
        "minExpertParallelSize and maxExpertParallelSize must be multiples of "
        "parallelism.gpusPerPod x numNodes (whole pods, as many on every node)",
        f"!self.elastic.enabled || (self.elastic.minExpertParallelSize % {EP_STEP_CEL} == 0 "
        f"&& self.elastic.maxExpertParallelSize % {EP_STEP_CEL} == 0)",
        lambda s: (
            not s.elastic.enabled
            or (
                s.elastic.min_expert_parallel_size % s.parallelism.ep_step == 0
                and s.elastic.max_expert_parallel_size % s.parallelism.ep_step == 0
            )
        ),
    ),
    CrossFieldRule(
        "spec.control.port",
        "must not be one of the metrics ports (metrics.port .. metrics.port + gpusPerPod - 1)",
        "self.control.port < self.metrics.port || "
        "self.control.port >= self.metrics.port + self.parallelism.gpusPerPod",
        lambda s: (
            not (s.metrics.port <= s.control.port < s.metrics.port + s.parallelism.gpus_per_pod)
        ),
    ),
    CrossFieldRule(
        "spec.elastic.tokensPerRankLow",
        "must be below tokensPerRankHigh",
        "self.elastic.tokensPerRankLow < self.elastic.tokensPerRankHigh",
        lambda s: s.elastic.tokens_per_rank_low < s.elastic.tokens_per_rank_high,
    ),
    CrossFieldRule(
        "spec.eplb.replicaShares",
        "replica shares are chosen by the incremental policy: eplb.policy must be incremental",
        "!self.eplb.replicaShares || self.eplb.policy == 'incremental'",
        lambda s: not s.eplb.replica_shares or s.eplb.policy == "incremental",
    ),
    CrossFieldRule(
        "spec.eplb.replicaShares",
        "share-aware moves keep no home node: parallelism.numNodes must be 1",
        "!self.eplb.replicaShares || self.parallelism.numNodes == 1",
        lambda s: not s.eplb.replica_shares or s.parallelism.num_nodes == 1,
    ),
    CrossFieldRule(
        "spec.checkpointVolume",
        "is required when model.source is checkpoint",
        "self.model.source != 'checkpoint' || has(self.checkpointVolume)",
        lambda s: s.model.source != "checkpoint" or s.checkpoint_volume is not None,
    ),
    CrossFieldRule(
        "spec.model.topK",
        "must be <= model.numExperts",
        "self.model.topK <= self.model.numExperts",
        lambda s: s.model.top_k <= s.model.num_experts,
    ),
    CrossFieldRule(
        "spec.model.path",
        "is required when model.source is checkpoint, and only then",
        "(self.model.source == 'checkpoint') == has(self.model.path)",
        lambda s: (s.model.source == "checkpoint") == (s.model.path is not None),
    ),
    CrossFieldRule(
        "spec.model.draft",
        "elastic resizes are not supported with a speculative draft model: elastic.enabled "
        "must be false",
        "!has(self.model.draft) || !self.elastic.enabled",
        lambda s: s.model.draft is None or not s.elastic.enabled,
    ),
    CrossFieldRule(
        "spec.model.draft",
        "speculative decoding serves requests: simulator must be unset",
        "!has(self.model.draft) || !has(self.simulator)",
        lambda s: s.model.draft is None or s.simulator is None,
    ),
    CrossFieldRule(
        "spec.model.draft.path",
        "is required when model.draft.source is checkpoint, and only then",
        "!has(self.model.draft) || "
        "(self.model.draft.source == 'checkpoint') == has(self.model.draft.path)",
        lambda s: (
            s.model.draft is None
            or (s.model.draft.source == "checkpoint") == (s.model.draft.path is not None)
        ),
    ),
    CrossFieldRule(
        "spec.model.draft.topK",
        "must be <= model.draft.numExperts",
        "!has(self.model.draft) || self.model.draft.topK <= self.model.draft.numExperts",
        lambda s: s.model.draft is None or s.model.draft.top_k <= s.model.draft.num_experts,
    ),
    CrossFieldRule(
        "spec.nodeSelector",
        "every key must be a label key (an optional DNS prefix and /, then a name)",
        f"!has(self.nodeSelector) || self.nodeSelector.all(k, k.matches('{LABEL_KEY_PATTERN}'))",
        lambda s: all(re.fullmatch(LABEL_KEY_PATTERN, k) for k in s.node_selector),
    ),
    CrossFieldRule(
        "spec.affinity",
        "may hold only nodeAffinity, podAffinity and podAntiAffinity",
        "!has(self.affinity) || self.affinity.all(k, k in "
        "['nodeAffinity', 'podAffinity', 'podAntiAffinity'])",
        lambda s: set(s.affinity or {}) <= AFFINITY_KINDS,
    ),
    CrossFieldRule(
        "spec.workload.concurrency",
        "is required when rateProfile is empty (closed loop)",
        "!has(self.workload) || has(self.workload.concurrency) || "
        "(has(self.workload.rateProfile) && size(self.workload.rateProfile) > 0)",
        lambda s: bool(s.workload.rate_profile) or s.workload.concurrency is not None,
    ),
    CrossFieldRule(
        "spec.parallelism.pods",
        "must be divisible by parallelism.numNodes (every node holds as many pods)",
        "self.parallelism.pods % self.parallelism.numNodes == 0",
        lambda s: s.parallelism.pods % s.parallelism.num_nodes == 0,
    ),
)


class Condition(ApiModel):
    type: Literal["Ready", "Progressing", "Degraded", "Rebalancing", "Resizing"]
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$", max_length=1024)
    message: str = Field("", max_length=32768)
    last_transition_time: str = Field(
        description="RFC 3339 time of the last status change.",
        json_schema_extra={"format": "date-time"},
    )
    observed_generation: int | None = Field(None, ge=0)


class PendingActionStatus(ApiModel):
    """An operator action started and not yet seen finished."""

    verb: Literal["remap", "resize"]
    started_at: float = Field(description="Epoch seconds.")
    target_ep_size: int = Field(0, ge=0)
    from_mapping_generation: int = Field(0, ge=0)


class PolicyStatus(ApiModel):
    """The policy's memory (epoch seconds), so an operator restart resumes its timers."""

    below_threshold_since: float | None = None
    load_high_since: float | None = None
    load_low_since: float | None = None
    last_remap_at: float | None = None
    last_scale_up_at: float | None = None
    last_scale_down_at: float | None = None
    pending: PendingActionStatus | None = None


class ResizeStatus(ApiModel):
    """A live elastic resize in progress (the protocol of resize.py)."""

    from_ep_size: int = Field(ge=1, description="EP size when it began.")
    to_ep_size: int = Field(ge=1, description="EP size it moves to.")
    phase: Literal["pods-up", "request", "moving", "pods-down"]
    since: float = Field(description="Epoch seconds the phase began.")
    started_at: float = Field(description="Epoch seconds the resize began.")

    @property
    def up(self) -> bool:
        """A scale-up (more ranks than it began with)."""
        return self.to_ep_size > self.from_ep_size


class MoEDeploymentStatus(ApiModel):
    """Observed state, written by the operator."""

    phase: Literal["Pending", "Running", "Rebalancing", "Resizing", "Degraded"] | None = None
    conditions: list[Condition] = Field(default_factory=list)
    observed_generation: int | None = Field(None, ge=0)
    expert_parallel_size: int | None = Field(None, ge=0, description="Current EP size.")
    pods: int | None = Field(
        None, ge=0, description="Pods of the serving group (the scale subresource's replicas)."
    )
    ready_ranks: int | None = Field(None, ge=0, description="Ranks whose pods are ready.")
    endpoint: str | None = Field(
        None, description="URL of the OpenAI-compatible API (Service <name>, port http)."
    )
    balancedness: str | None = Field(None, description="Last measured balancedness (text).")
    selector: str | None = Field(None, description="Label selector of the pods (scale).")
    mapping_generation: int | None = Field(None, ge=0)
    topology_generation: int | None = Field(None, ge=0)
    policy: PolicyStatus | None = Field(None, description="Remap/resize policy memory.")
    resize: ResizeStatus | None = Field(None, description="The live resize in progress.")


class ObjectMeta(BaseModel):
    model_config = ConfigDict(extra="allow")
    # A DNS-1035 label (the Service <name> needs one: a letter first); 52 at most, as a
    # StatefulSet's pods carry <name>-<hash> in a 63-character label.
    name: str = Field(pattern=r"^[a-z]([-a-z0-9]*[a-z0-9])?$", max_length=52)
    namespace: str | None = None


class MoEDeployment(ApiModel):
    """A Mixture-of-Experts deployment with expert parallelism and load balancing."""

    api_version: Literal["moe.eplb.dev/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["MoEDeployment"]
    metadata: ObjectMeta
    spec: MoEDeploymentSpec
    status: MoEDeploymentStatus | None = None

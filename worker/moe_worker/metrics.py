"""The worker's Prometheus metrics: one table of specs, one registry per process.

Every series carries ``deployment`` and ``rank`` labels so one Prometheus can serve many
deployments; label values are bounded (layer and expert indices, fixed trigger/result names).
Per-expert series exist only when ``metrics.perExpert`` is on, and only on the leader (rank 0),
since the loads they show are summed over all ranks.

``python -m moe_worker.metrics > docs/metrics.md`` regenerates the reference (a test checks it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)

from moe_worker.eplb.policy.quality import overall_balancedness, worst_layer_balancedness

VERSION = "0.1.0"
TRIGGERS = ("interval", "manual", "resize")
RESULTS = ("ok", "skipped", "aborted", "failed")
BASE_LABELS = ("deployment", "rank")
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
REBALANCE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# request latencies, as vLLM buckets them (seconds)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
               0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)  # fmt: skip
REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
                   40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0)  # fmt: skip
FINISH_REASONS = ("stop", "length", "abort", "error")
SPEC_DECODE = (
    "moe_spec_decode_num_drafts_total",
    "moe_spec_decode_num_draft_tokens_total",
    "moe_spec_decode_num_accepted_tokens_total",
)


@dataclass(frozen=True)
class MetricSpec:
    name: str  # as exposed (counters end in _total)
    kind: str  # counter | gauge | histogram | info
    labels: tuple[str, ...]  # beyond deployment and rank
    help: str
    buckets: tuple[float, ...] = STEP_BUCKETS  # histograms only


SPECS: tuple[MetricSpec, ...] = (
    MetricSpec(
        "moe_balancedness",
        "gauge",
        ("model",),
        "Overall balancedness of a model (main, or the speculative draft): the harmonic mean "
        "over MoE layers of mean rank load / max rank load over the load window (all ranks' "
        "tokens), the share of a step spent on balanced work; 1 is perfect balance.",
    ),
    MetricSpec(
        "moe_balancedness_worst_layer",
        "gauge",
        ("model",),
        "The lowest per-layer balancedness (mean rank load / max rank load) over the window.",
    ),
    MetricSpec(
        "moe_layer_balancedness",
        "gauge",
        ("model", "layer"),
        "Mean rank load / max rank load of one MoE layer over the load window.",
    ),
    MetricSpec(
        "moe_rank_routed_tokens_total",
        "counter",
        (),
        "Token-expert pairs computed by this rank's expert slots, summed over layers.",
    ),
    MetricSpec(
        "moe_tokens_processed_total",
        "counter",
        (),
        "Tokens of this rank's batches that completed a forward step.",
    ),
    MetricSpec("moe_steps_total", "counter", (), "Forward steps completed."),
    MetricSpec(
        "moe_step_duration_seconds",
        "histogram",
        (),
        "Wall time of a forward step, including EPLB bookkeeping.",
    ),
    MetricSpec(
        "moe_rebalances_total",
        "counter",
        ("model", "trigger", "result"),
        "Rebalances of a model (main, draft) by trigger (interval, manual, resize) and result "
        "(ok, skipped, aborted, failed).",
    ),
    MetricSpec(
        "moe_rebalance_duration_seconds",
        "histogram",
        (),
        "Wall time of a rebalance: loads, placement, weight transfer and commit.",
        REBALANCE_BUCKETS,
    ),
    MetricSpec(
        "moe_rebalance_transferred_bytes_total",
        "counter",
        (),
        "Expert weight bytes this rank received in rebalances.",
    ),
    MetricSpec(
        "moe_rebalance_moved_expert_copies_total",
        "counter",
        ("model",),
        "Expert copies of a model moved by rebalances (new (layer, rank, expert) pairs), all "
        "ranks.",
    ),
    MetricSpec(
        "moe_rebalance_gain_per_moved_copy",
        "gauge",
        ("model",),
        "Balancedness a model's last completed rebalance gained per expert copy it moved (on "
        "the load window it planned for; 0 when it moved none).",
    ),
    MetricSpec(
        "moe_rebalancing",
        "gauge",
        (),
        "1 while a rebalance is pending or running on this rank, else 0.",
    ),
    MetricSpec("moe_ep_size", "gauge", (), "Number of expert-parallel ranks."),
    MetricSpec(
        "moe_topology_generation",
        "gauge",
        (),
        "Generation of the rank group (increases with every elastic resize).",
    ),
    MetricSpec(
        "moe_mapping_generation",
        "gauge",
        (),
        "Generation of the expert map (increases with every committed rebalance).",
    ),
    MetricSpec(
        "moe_worker_info",
        "info",
        ("communicator", "policy", "async", "version"),
        "Static facts about the worker: communicator, placement policy, async mode, "
        "version (value 1).",
    ),
    # serving (serving.enabled), with vLLM's meanings
    MetricSpec(
        "moe_time_to_first_token_seconds",
        "histogram",
        (),
        "From a request's arrival at this rank to its first generated token.",
        TTFT_BUCKETS,
    ),
    MetricSpec(
        "moe_inter_token_latency_seconds",
        "histogram",
        (),
        "Between consecutive generated tokens of a request.",
        ITL_BUCKETS,
    ),
    MetricSpec(
        "moe_e2e_request_latency_seconds",
        "histogram",
        (),
        "From a request's arrival at this rank to its end (any finish reason).",
        REQUEST_BUCKETS,
    ),
    MetricSpec(
        "moe_request_queue_time_seconds",
        "histogram",
        (),
        "From a request's arrival to its first scheduled step (time waiting in the queue).",
        REQUEST_BUCKETS,
    ),
    MetricSpec("moe_num_requests_running", "gauge", (), "Requests in the running batch."),
    MetricSpec("moe_num_requests_waiting", "gauge", (), "Requests waiting to be admitted."),
    MetricSpec(
        "moe_kv_cache_usage_perc",
        "gauge",
        (),
        "KV-cache tokens the running batch reserves (prompt + max new tokens each) over the "
        "batch's budget, maxRunningRequests x maxModelLen (0..1).",
    ),
    MetricSpec(
        "moe_prompt_tokens_total",
        "counter",
        (),
        "Prompt tokens of requests whose prefill completed.",
    ),
    MetricSpec("moe_generation_tokens_total", "counter", (), "Tokens generated."),
    MetricSpec(
        "moe_request_success_total",
        "counter",
        ("finished_reason",),
        "Requests ended, by reason: stop (a stop or end-of-sequence token), length "
        "(max_tokens or the model length), abort (the client left), error (the rank failed).",
    ),
    # speculative decoding (model.draft), with vLLM's meanings
    MetricSpec(
        "moe_spec_decode_num_drafts_total",
        "counter",
        (),
        "Draft proposals verified by the main model (one per sequence and step).",
    ),
    MetricSpec(
        "moe_spec_decode_num_draft_tokens_total",
        "counter",
        (),
        "Tokens the draft proposed; acceptance rate = accepted / draft tokens.",
    ),
    MetricSpec(
        "moe_spec_decode_num_accepted_tokens_total",
        "counter",
        (),
        "Proposed tokens the main model kept; tokens per step of a sequence = 1 + accepted / "
        "drafts.",
    ),
    MetricSpec(
        "moe_expert_load_tokens",
        "gauge",
        ("model", "layer", "expert"),
        "Tokens routed to a model's logical expert over the load window, all ranks (leader only; "
        "only with metrics.perExpert).",
    ),
)


def _base(name: str, kind: str) -> str:
    """prometheus_client adds _total to counters and _info to infos itself."""
    if kind == "counter":
        return name.removesuffix("_total")
    if kind == "info":
        return name.removesuffix("_info")
    return name


class WorkerMetrics:
    """This rank's metric objects; the engine loop feeds them."""

    def __init__(
        self,
        deployment: str,
        rank: int,
        communicator: str,
        policy: str,
        use_async: bool,
        per_expert: bool = False,
        models: tuple[str, ...] = ("main",),
    ) -> None:
        """``models``: the models EPLB balances (main and/or draft) whose series start at 0."""
        self.registry = CollectorRegistry()
        self.base = {"deployment": deployment, "rank": str(rank)}
        self.per_expert = per_expert and rank == 0
        self._metrics: dict[str, object] = {}
        for spec in SPECS:
            if spec.name == "moe_expert_load_tokens" and not self.per_expert:
                continue
            labels = BASE_LABELS + spec.labels
            if spec.kind == "counter":
                metric: object = Counter(
                    _base(spec.name, "counter"), spec.help, labels, registry=self.registry
                )
            elif spec.kind == "gauge":
                metric = Gauge(spec.name, spec.help, labels, registry=self.registry)
            elif spec.kind == "histogram":
                metric = Histogram(
                    spec.name, spec.help, labels, buckets=spec.buckets, registry=self.registry
                )
            else:
                metric = Info(
                    _base(spec.name, "info"), spec.help, BASE_LABELS, registry=self.registry
                )
            self._metrics[spec.name] = metric
        self._child("moe_worker_info").info(
            {
                "communicator": communicator,
                "policy": policy,
                "async": str(use_async).lower(),
                "version": VERSION,
            }
        )
        for model in models:
            for trigger in TRIGGERS:
                for result in RESULTS:
                    self._child("moe_rebalances_total", model=model, trigger=trigger, result=result)
            self._child("moe_rebalance_moved_expert_copies_total", model=model)
            self._child("moe_rebalance_gain_per_moved_copy", model=model)
        for reason in FINISH_REASONS:
            self._child("moe_request_success_total", finished_reason=reason)
        for name in (
            "moe_rank_routed_tokens_total",
            "moe_tokens_processed_total",
            "moe_steps_total",
            "moe_rebalance_transferred_bytes_total",
            "moe_prompt_tokens_total",
            "moe_generation_tokens_total",
            *(SPEC_DECODE if "draft" in models else ()),
        ):
            self._child(name)
        self._child("moe_rebalancing").set(0)

    def _child(self, name: str, **labels: str):  # type: ignore[no-untyped-def]
        return self._metrics[name].labels(**self.base, **labels)  # type: ignore[attr-defined]

    def observe_step(self, seconds: float, tokens: int, routed_pairs: int) -> None:
        self._child("moe_steps_total").inc()
        self._child("moe_tokens_processed_total").inc(tokens)
        self._child("moe_rank_routed_tokens_total").inc(routed_pairs)
        self._child("moe_step_duration_seconds").observe(seconds)

    def observe_rebalance(
        self,
        trigger: str,
        result: str,
        seconds: float,
        bytes_received: int,
        copies_moved: int,
        model: str = "main",
        gain_per_moved_copy: float = 0.0,
    ) -> None:
        self._child("moe_rebalances_total", model=model, trigger=trigger, result=result).inc()
        if result == "ok":
            self._child("moe_rebalance_duration_seconds").observe(seconds)
            self._child("moe_rebalance_transferred_bytes_total").inc(bytes_received)
            self._child("moe_rebalance_moved_expert_copies_total", model=model).inc(copies_moved)
            gain = self._child("moe_rebalance_gain_per_moved_copy", model=model)
            gain.set(gain_per_moved_copy)

    def set_rebalancing(self, active: bool) -> None:
        self._child("moe_rebalancing").set(1 if active else 0)

    def set_topology(self, ep_size: int, topology_generation: int, mapping_generation: int) -> None:
        self._child("moe_ep_size").set(ep_size)
        self._child("moe_topology_generation").set(topology_generation)
        self._child("moe_mapping_generation").set(mapping_generation)

    def set_balancedness(self, per_layer: np.ndarray, model: str = "main") -> None:
        self._child("moe_balancedness", model=model).set(overall_balancedness(per_layer))
        worst = worst_layer_balancedness(per_layer)
        self._child("moe_balancedness_worst_layer", model=model).set(worst)
        for layer, value in enumerate(per_layer):
            self._child("moe_layer_balancedness", model=model, layer=str(layer)).set(float(value))

    def set_expert_load(self, load: np.ndarray, model: str = "main") -> None:
        """Window load per logical expert [L, E] of ``model`` (leader, per-expert series on)."""
        if not self.per_expert:
            return
        for layer in range(load.shape[0]):
            for expert in range(load.shape[1]):
                self._child(
                    "moe_expert_load_tokens", model=model, layer=str(layer), expert=str(expert)
                ).set(float(load[layer, expert]))

    # --- serving (ServingObserver) ---------------------------------------------------------

    def first_token(self, ttft_s: float, queue_s: float, prompt_tokens: int) -> None:
        self._child("moe_time_to_first_token_seconds").observe(ttft_s)
        self._child("moe_request_queue_time_seconds").observe(queue_s)
        self._child("moe_prompt_tokens_total").inc(prompt_tokens)
        self._child("moe_generation_tokens_total").inc()

    def next_token(self, gap_s: float) -> None:
        self._child("moe_inter_token_latency_seconds").observe(gap_s)
        self._child("moe_generation_tokens_total").inc()

    def request_finished(self, reason: str, e2e_s: float) -> None:
        self._child("moe_request_success_total", finished_reason=reason).inc()
        self._child("moe_e2e_request_latency_seconds").observe(e2e_s)

    def serving_load(self, running: int, waiting: int, kv_usage: float) -> None:
        self._child("moe_num_requests_running").set(running)
        self._child("moe_num_requests_waiting").set(waiting)
        self._child("moe_kv_cache_usage_perc").set(kv_usage)

    def speculated(self, proposed: int, accepted: int) -> None:
        self._child("moe_spec_decode_num_drafts_total").inc()
        self._child("moe_spec_decode_num_draft_tokens_total").inc(proposed)
        self._child("moe_spec_decode_num_accepted_tokens_total").inc(accepted)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def reference_markdown() -> str:
    lines = [
        "<!-- GENERATED by `python -m moe_worker.metrics > docs/metrics.md`; do not edit. -->",
        "# Worker metrics",
        "",
        "Every rank serves these at `/metrics` (port `metrics.port` + local rank). All series",
        "carry the labels `deployment` and `rank`; the table lists the others.",
        "",
        "| name | type | labels | meaning |",
        "|---|---|---|---|",
    ]
    for spec in SPECS:
        labels = ", ".join(f"`{label}`" for label in spec.labels) or "-"
        lines.append(f"| `{spec.name}` | {spec.kind} | {labels} | {spec.help} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(reference_markdown(), end="")

"""One EP rank serving real requests: DP attention (own requests, own KV caches) + EP MoE.

The step loop (``WorkerService``) calls ``step`` on every rank at the same moments. A rank with
scheduled work runs one packed forward of transformers' model (its sequences' prefill chunks and
decode tokens together, ``kv_cache``), whose MoE layers exchange tokens with every other rank;
a rank without work runs ``idle_pass`` so every all-to-all completes. EPLB records the router's
real choices of every token through the experts module and steps after every forward.

Requests come from the API threads through ``submit`` (thread-safe); outputs go back through
each request's ``sink`` callback, called on the step loop's thread.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from moe_worker.engine import RankEngine
from moe_worker.eplb.controller import step_eplb_after
from moe_worker.model.hf_model import EPCausalLM, build_ep_model
from moe_worker.model.hf_source import CheckpointSource, ModelSource, SyntheticSource

from .backend import BackendBusy, FinishReason, SamplingParams, TokenOutput
from .kv_cache import PackedKVCache, PackedStep, SequenceKV, packed_mask, packed_positions
from .sampling import request_generator, sample_token
from .scheduler import Chunk, QueueFull, Scheduler

log = logging.getLogger("moe_worker.serving")
MAX_DEFAULT_LEN = 8192
Sink = Callable[[TokenOutput | BaseException], None]


class ServingObserver(Protocol):
    """Receives each request's timings (``WorkerMetrics`` implements it); called on the step
    loop's thread. Times in seconds (``time.monotonic``)."""

    def first_token(self, ttft_s: float, queue_s: float, prompt_tokens: int) -> None: ...

    def next_token(self, gap_s: float) -> None: ...

    def request_finished(self, reason: str, e2e_s: float) -> None: ...

    def serving_load(self, running: int, waiting: int, kv_usage: float) -> None: ...


@dataclass
class Sequence:
    """One request on this rank: its tokens (prompt then generated), KV cache and timings."""

    request_id: str
    tokens: list[int]
    prompt_len: int
    params: SamplingParams
    sink: Sink
    generator: torch.Generator | None
    kv: SequenceKV = field(default_factory=SequenceKV)
    arrived_at: float = field(default_factory=time.monotonic)
    scheduled_at: float | None = None  # its first step
    last_token_at: float | None = None

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_len


def make_model_source(config: Any) -> ModelSource:
    """The source ``config.model`` names: a checkpoint directory or a synthetic model."""
    model = config.model
    if model.source == "checkpoint":
        return CheckpointSource(model.path, model.dtype)
    return SyntheticSource(model)


def _eos_ids(hf_config: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    for value in (getattr(hf_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return frozenset(ids)


class ServingEngine(RankEngine):
    """A rank's model, scheduler and sequences; ``step`` runs one lock-step iteration."""

    def _make_source(self) -> ModelSource:
        return make_model_source(self.config)

    def _model_shape(self) -> tuple[int, int]:
        return len(self.source.moe_decoder_layers), self.source.num_experts

    def _build_model(self, load_weights: bool) -> EPCausalLM:
        return build_ep_model(self.source, self.placement, self.ep, load_weights=load_weights)

    def _expert_groups(self) -> int:
        """The checkpoint's grouped top-k groups (DeepSeek-V3's ``n_group``; 1 without)."""
        text_config = self.source.hf_config.get_text_config()
        return int(getattr(text_config, "n_group", None) or 1)

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        serving = config.serving
        text_config = self.model.config.get_text_config()
        self.tokenizer = self.source.tokenizer()
        self.vocab_size = int(text_config.vocab_size)
        limit = int(getattr(text_config, "max_position_embeddings", MAX_DEFAULT_LEN))
        self.max_model_len = serving.max_model_len or min(limit, MAX_DEFAULT_LEN)
        window = getattr(text_config, "sliding_window", None)
        # Qwen2-MoE stores 0 when sliding windows are off; a window applies only when positive.
        self.sliding_window = window if isinstance(window, int) and window > 0 else None
        # Families that mix full and sliding-window layers take one mask per layer type.
        self.layer_types = set(getattr(text_config, "layer_types", None) or ())
        self.eos_token_ids = _eos_ids(text_config, self.tokenizer)
        self.scheduler = Scheduler(
            token_budget=serving.max_batch_tokens,
            max_running=serving.max_running_requests,
            max_waiting=serving.max_waiting_requests,
        )
        self.sequences: dict[str, Sequence] = {}
        self.lock = threading.Lock()  # guards scheduler, sequences and the abort list
        self._aborted: list[str] = []
        self.accepting = True
        self.on_work: Callable[[], None] | None = None  # wakes the idle step loop
        self.generated_tokens = 0
        self.requests_finished = 0
        self.observer: ServingObserver | None = None  # serving metrics
        self._kv_budget = serving.max_running_requests * self.max_model_len
        # transformers renamed the cache argument (past_key_values -> cache) during 5.x
        parameters = inspect.signature(self.model.model.forward).parameters
        self._cache_arg = "cache" if "cache" in parameters else "past_key_values"

    # --- the API side (any thread) ---------------------------------------------------------

    def submit(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, sink: Sink
    ) -> None:
        """Queue a request; raises ``BackendBusy`` when it cannot be taken now."""
        if not prompt_ids:
            raise ValueError("prompt: must hold at least one token")
        with self.lock:
            if not self.accepting:
                raise BackendBusy("this rank is leaving the group; retry", 1.0)
            try:
                self.scheduler.add(request_id, len(prompt_ids), params.max_new_tokens)
            except QueueFull as exc:
                raise BackendBusy(str(exc), 1.0) from None
            self.sequences[request_id] = Sequence(
                request_id,
                list(prompt_ids),
                len(prompt_ids),
                params,
                sink,
                request_generator(params),
            )
        if self.on_work is not None:
            self.on_work()

    def stop_accepting(self) -> None:
        """New requests get 503 + Retry-After from now on (the rank is leaving the group)."""
        with self.lock:
            self.accepting = False

    def abort(self, request_id: str) -> None:
        """Drop a request (its client went away); takes effect before the next step."""
        with self.lock:
            self._aborted.append(request_id)

    def has_work(self) -> bool:
        with self.lock:
            return self.scheduler.has_work or bool(self._aborted)

    # --- the step loop ---------------------------------------------------------------------

    @step_eplb_after
    def step(self) -> int:
        """One lock-step iteration: a packed forward of the scheduled chunks, or an idle pass.
        Returns the tokens this rank ran."""
        with self.lock:
            for request_id in self._aborted:
                if self.scheduler.abort(request_id):
                    aborted = self.sequences.pop(request_id, None)
                    if aborted is not None:
                        self._finished(aborted, "abort", time.monotonic())
            self._aborted.clear()
            chunks = self.scheduler.schedule()
            if not chunks:
                self._report_load()
        if not chunks:
            with torch.inference_mode():
                self.model.idle_pass()
            self.step_index += 1
            return 0
        sequences = [self.sequences[chunk.request_id] for chunk in chunks]
        now = time.monotonic()
        for sequence in sequences:
            if sequence.scheduled_at is None:
                sequence.scheduled_at = now
        tokens: list[int] = []
        sample_rows: list[int] = []
        for chunk, sequence in zip(chunks, sequences, strict=True):
            if sequence.kv.length != chunk.start:
                raise RuntimeError(
                    f"request {chunk.request_id}: cache holds {sequence.kv.length} tokens, "
                    f"chunk starts at {chunk.start}"
                )
            tokens.extend(sequence.tokens[chunk.start : chunk.end])
            if chunk.samples:
                sample_rows.append(len(tokens) - 1)
        layout = PackedStep([s.kv for s in sequences], [c.length for c in chunks])
        try:
            logits = self._forward(tokens, layout, sample_rows)
        except BaseException:  # a peer died mid-step: the step is run again after recovery
            with self.lock:
                self.scheduler.step_failed()
            raise
        finished = self._sample_and_emit(chunks, sequences, logits)
        with self.lock:
            self.scheduler.step_done(finished)
            for request_id in finished:
                self.sequences.pop(request_id, None)
            self.requests_finished += len(finished)
            self._report_load()
        self.step_index += 1
        self.tokens_processed += len(tokens)
        return len(tokens)

    def _report_load(self) -> None:
        """Running and waiting requests and KV use to the observer (caller holds the lock)."""
        if self.observer is not None:
            scheduler = self.scheduler
            kv_usage = min(1.0, scheduler.reserved_kv_tokens / self._kv_budget)
            self.observer.serving_load(scheduler.num_running, scheduler.num_waiting, kv_usage)

    def _finished(self, sequence: Sequence, reason: str, now: float) -> None:
        if self.observer is not None:
            self.observer.request_finished(reason, now - sequence.arrived_at)

    def _forward(
        self, tokens: list[int], layout: PackedStep, sample_rows: list[int]
    ) -> torch.Tensor:
        """Logits [len(sample_rows), V] (float32) of the packed step."""
        device = self.device
        cache = PackedKVCache(layout)
        with torch.inference_mode():
            output = self.model.model(
                input_ids=torch.tensor([tokens], dtype=torch.long, device=device),
                position_ids=packed_positions(layout, device),
                attention_mask=self._mask(layout),
                use_cache=True,
                logits_to_keep=torch.tensor(sample_rows, dtype=torch.long, device=device),
                **{self._cache_arg: cache},
            )
        cache.commit()
        return output.logits[0].float()

    def _mask(self, layout: PackedStep) -> torch.Tensor | dict[str, torch.Tensor]:
        dtype, device = self.model.dtype, self.device
        if "sliding_attention" in self.layer_types:
            return {
                "full_attention": packed_mask(layout, dtype, device),
                "sliding_attention": packed_mask(layout, dtype, device, self.sliding_window),
            }
        return packed_mask(layout, dtype, device, self.sliding_window)

    def _sample_and_emit(
        self, chunks: list[Chunk], sequences: list[Sequence], logits: torch.Tensor
    ) -> set[str]:
        finished: set[str] = set()
        row = 0
        now = time.monotonic()
        for chunk, sequence in zip(chunks, sequences, strict=True):
            if not chunk.samples:
                continue
            token = sample_token(logits[row], sequence.params, sequence.generator)
            row += 1
            sequence.tokens.append(token)
            self.generated_tokens += 1
            self._observe_token(sequence, now)
            reason = self._finish_reason(sequence, token)
            ended: str | None = reason
            try:
                sequence.sink(TokenOutput(token, reason))
            except Exception:  # noqa: BLE001 - a broken client must not stop the step loop
                log.exception("request %s: output sink failed; aborting it", chunk.request_id)
                ended = reason or "abort"
            if ended is not None:
                finished.add(sequence.request_id)
                self._finished(sequence, ended, now)
        return finished

    def _observe_token(self, sequence: Sequence, now: float) -> None:
        if self.observer is not None:
            if sequence.last_token_at is None:
                queued = (sequence.scheduled_at or now) - sequence.arrived_at
                self.observer.first_token(now - sequence.arrived_at, queued, sequence.prompt_len)
            else:
                self.observer.next_token(now - sequence.last_token_at)
        sequence.last_token_at = now

    def _finish_reason(self, sequence: Sequence, token: int) -> FinishReason | None:
        params = sequence.params
        if token in params.stop_token_ids or (
            not params.ignore_eos and token in self.eos_token_ids
        ):
            return "stop"
        if (
            sequence.generated >= params.max_new_tokens
            or len(sequence.tokens) >= self.max_model_len
        ):
            return "length"
        return None

    def fail_all(self, error: BaseException) -> None:
        """Every queued and running request ends with ``error`` (the rank is stopping)."""
        with self.lock:
            self.accepting = False
            sequences = list(self.sequences.values())
            for sequence in sequences:
                self.scheduler.abort(sequence.request_id)
            self.sequences.clear()
        now = time.monotonic()
        for sequence in sequences:
            self._finished(sequence, "error", now)
            sequence.sink(error)

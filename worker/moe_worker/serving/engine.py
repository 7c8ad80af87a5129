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

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from moe_worker.config import ModelSpec
from moe_worker.engine import RankEngine
from moe_worker.eplb.controller import step_eplb_after
from moe_worker.eplb.policy import Placement, default_placement
from moe_worker.model.hf_model import EPCausalLM, build_ep_model
from moe_worker.model.hf_source import CheckpointSource, ModelSource, SyntheticSource

from .backend import BackendBusy, FinishReason, SamplingParams, TokenOutput
from .kv_cache import KVArena, PackedKVCache, PackedStep, SequenceKV, StepLayout
from .packed_attention import LAYOUT_KWARG, WINDOWS_KWARG
from .packed_attention import register as register_packed_attention
from .sampling import request_generator, sample_token, sample_with_probs
from .scheduler import Chunk, QueueFull, Scheduler
from .speculative import Verdict, verify_greedy, verify_sampled

log = logging.getLogger("moe_worker.serving")
MAX_DEFAULT_LEN = 8192
# A 4D mask transformers passes through unchanged (so it builds none of its own); the packed
# attention masks from the step's layout instead.
NO_MASK = torch.zeros((1, 1, 0, 0))
Sink = Callable[[TokenOutput | BaseException], None]


class ServingObserver(Protocol):
    """Receives each request's timings (``WorkerMetrics`` implements it); called on the step
    loop's thread. Times in seconds (``time.monotonic``)."""

    def first_token(self, ttft_s: float, queue_s: float, prompt_tokens: int) -> None: ...

    def next_token(self, gap_s: float) -> None: ...

    def request_finished(self, reason: str, e2e_s: float) -> None: ...

    def serving_load(self, running: int, waiting: int, kv_usage: float) -> None: ...

    def speculated(self, proposed: int, accepted: int) -> None: ...


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
    draft_kv: SequenceKV = field(default_factory=SequenceKV)  # the draft model's cache
    arrived_at: float = field(default_factory=time.monotonic)
    scheduled_at: float | None = None  # its first step
    last_token_at: float | None = None

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_len


def make_model_source(model: ModelSpec) -> ModelSource:
    """The source ``model`` (``config.model`` or its draft) names: a checkpoint directory or a
    synthetic model."""
    if model.source == "checkpoint":
        assert model.path is not None  # the config requires it
        return CheckpointSource(model.path, model.dtype)
    return SyntheticSource(model)


@dataclass(frozen=True)
class AttentionShape:
    """What a model's attention masks depend on: its sliding window (if any) and, when it mixes
    full and sliding-window layers, each decoder layer's type."""

    sliding_window: int | None
    layer_types: tuple[str, ...] | None  # None: the window (if any) applies to every layer

    @classmethod
    def of(cls, text_config: Any) -> AttentionShape:
        window = getattr(text_config, "sliding_window", None)
        # Qwen2-MoE stores 0 when sliding windows are off; a window applies only when positive.
        layer_types = tuple(getattr(text_config, "layer_types", None) or ())
        return cls(
            window if isinstance(window, int) and window > 0 else None,
            layer_types if "sliding_attention" in layer_types else None,
        )

    def window_for(self, layer: int) -> int | None:
        """The sliding window of decoder layer ``layer`` (None: full attention)."""
        if self.layer_types is not None and self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window


def draft_slots(experts: int, redundant: int, ep_size: int) -> int:
    """Physical slots per layer of a draft with ``experts`` experts: ``redundant`` (the main
    model's) more, rounded up so every one of ``ep_size`` ranks holds as many."""
    wanted = experts + redundant
    return wanted + (-wanted) % ep_size


@dataclass
class Draft:
    """The speculative draft model of a rank: its placement and expert-parallel model, and the
    tokens it proposes per step (``k``)."""

    placement: Placement
    model: EPCausalLM
    attention: AttentionShape
    k: int


@dataclass
class Proposal:
    """What the draft proposed for one sequence this step: tokens and (sampled requests) the
    draft's distribution behind each."""

    tokens: list[int] = field(default_factory=list)
    probs: list[torch.Tensor] = field(default_factory=list)


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
        return make_model_source(self.config.model)

    def _model_shape(self) -> tuple[int, int]:
        return len(self.source.moe_decoder_layers), self.source.num_experts

    def _build_model(self, load_weights: bool) -> EPCausalLM:
        model = build_ep_model(
            self.source,
            self.placement,
            self.ep,
            load_weights=load_weights,
            attn_implementation=register_packed_attention(),
        )
        self.draft = self._build_draft(model, load_weights)
        return model

    def _build_draft(self, main: EPCausalLM, load_weights: bool) -> Draft | None:
        """The draft model ``model.draft`` names (its slots by the default placement,
        ``_draft_slots`` of them per layer); None without one."""
        spec = self.config.model.draft
        if spec is None:
            return None
        source = make_model_source(spec)
        vocab = int(source.hf_config.get_text_config().vocab_size)
        main_vocab = int(main.config.get_text_config().vocab_size)
        if vocab != main_vocab:
            raise ValueError(
                f"model.draft: its vocabulary has {vocab} tokens, the main model's {main_vocab} "
                "(the draft must share the main model's tokenizer)"
            )
        layers, experts = len(source.moe_decoder_layers), source.num_experts
        redundant = self.config.eplb.num_redundant_experts
        slots = draft_slots(experts, redundant, self.ep.size) if layers else 0
        placement = default_placement(layers, experts, slots)
        model = build_ep_model(
            source,
            placement,
            self.ep,
            load_weights=load_weights,
            attn_implementation=register_packed_attention(),
        )
        text_config = model.config.get_text_config()
        return Draft(placement, model, AttentionShape.of(text_config), spec.num_speculative_tokens)

    def all_moe_layers(self) -> list[Any]:
        draft = [] if self.draft is None else self.draft.model.moe_layers
        return [*self.model.moe_layers, *draft]

    def _eplb_models(self) -> list[tuple[str, Any, Placement]]:
        models = []
        if self.model.moe_layers:
            models.append(("main", self.model, self.placement))
        if self.draft is not None and self.draft.model.moe_layers:
            models.append(("draft", self.draft.model, self.draft.placement))
        return models

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
        self.attention = AttentionShape.of(text_config)
        self.eos_token_ids = _eos_ids(text_config, self.tokenizer)
        self.scheduler = Scheduler(
            token_budget=serving.max_batch_tokens,
            max_running=serving.max_running_requests,
            max_waiting=serving.max_waiting_requests,
            speculative_tokens=0 if self.draft is None else self.draft.k,
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
        # paged KV pools of the main model and the draft (a sequence's blocks in each)
        self.kv_arenas = {"main": KVArena(self.device), "draft": KVArena(self.device)}
        self.proposed_tokens = 0  # speculative decoding: draft tokens verified
        self.accepted_tokens = 0  # ... and kept

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
                if self.draft is not None:  # every rank runs k draft forwards and one main
                    for _ in range(self.draft.k):
                        self.draft.model.idle_pass()
                self.model.idle_pass()
            self.step_index += 1
            return 0
        sequences = [self.sequences[chunk.request_id] for chunk in chunks]
        now = time.monotonic()
        for sequence in sequences:
            if sequence.scheduled_at is None:
                sequence.scheduled_at = now
        try:
            proposals = self._propose(chunks, sequences) if self.draft is not None else {}
            logits = self._verify_forward(chunks, sequences, proposals)
        except BaseException:  # a peer died mid-step: the step is run again after recovery
            with self.lock:
                self.scheduler.step_failed()
            raise
        finished, accepted = self._sample_and_emit(chunks, sequences, logits, proposals)
        with self.lock:
            self.scheduler.step_done(finished, accepted)
            for request_id in finished:
                self.sequences.pop(request_id, None)
            self.requests_finished += len(finished)
            self._report_load()
        self.step_index += 1
        ran = sum(c.length for c in chunks) + sum(len(p.tokens) for p in proposals.values())
        self.tokens_processed += ran
        return ran

    def _report_load(self) -> None:
        """Running and waiting requests and KV use to the observer (caller holds the lock)."""
        if self.observer is not None:
            scheduler = self.scheduler
            kv_usage = min(1.0, scheduler.reserved_kv_tokens / self._kv_budget)
            self.observer.serving_load(scheduler.num_running, scheduler.num_waiting, kv_usage)

    def _finished(self, sequence: Sequence, reason: str, now: float) -> None:
        if self.observer is not None:
            self.observer.request_finished(reason, now - sequence.arrived_at)

    def _run(
        self,
        role: str,
        model: EPCausalLM,
        attention: AttentionShape,
        inputs: list[tuple[SequenceKV, list[int]]],
        rows: list[int],
    ) -> torch.Tensor:
        """One packed forward of ``model`` (``role`` "main" or "draft": whose KV arena): each
        sequence's new ``tokens`` after its cache (committed after). Logits [len(rows), V]
        float32 at token rows ``rows``."""
        device = self.device
        arena = self.kv_arenas[role]
        step = PackedStep([kv for kv, _ in inputs], [len(tokens) for _, tokens in inputs])
        layout = StepLayout(step, arena, device)
        cache = PackedKVCache(layout)
        flat = [token for _, tokens in inputs for token in tokens]
        with torch.inference_mode():
            logits = model.logits(
                torch.tensor([flat], dtype=torch.long, device=device),
                layout.positions,
                NO_MASK,
                cache,
                torch.tensor(rows, dtype=torch.long, device=device),
                **{LAYOUT_KWARG: layout, WINDOWS_KWARG: attention.window_for},
            )
        cache.commit()
        return logits[0].float()

    def _proposes(self, chunk: Chunk, sequence: Sequence) -> int:
        """Draft tokens this step proposes for ``sequence``: what the scheduler granted the
        decode (at most k, within the step budget and ``max_tokens``), fewer near the model
        length; none for prefill chunks."""
        if not chunk.samples or sequence.generated == 0:
            return 0
        room = self.max_model_len - len(sequence.tokens)
        return max(0, min(chunk.draft_tokens, room - 1))

    def _propose(self, chunks: list[Chunk], sequences: list[Sequence]) -> dict[str, Proposal]:
        """The draft's k forwards (idle passes where a rank has nothing to run, so every rank
        runs k): the first catches its cache up (prefill chunks, the tokens the last
        verification kept) and proposes the first token, each further one the next."""
        draft = self.draft
        assert draft is not None
        wanted = {
            c.request_id: self._proposes(c, s) for c, s in zip(chunks, sequences, strict=True)
        }
        proposals = {rid: Proposal() for rid, n in wanted.items() if n > 0}
        inputs: list[tuple[SequenceKV, list[int]]] = []
        rows: list[int] = []
        sampling: list[Sequence] = []
        width = 0
        for chunk, sequence in zip(chunks, sequences, strict=True):
            kv = sequence.draft_kv
            kv.length = min(kv.length, chunk.start)  # a failed step may have left it ahead
            if chunk.request_id in proposals:
                new = sequence.tokens[kv.length :]
            elif chunk.start < sequence.prompt_len:
                new = sequence.tokens[kv.length : chunk.end]
            else:
                continue  # a last token: nothing to propose
            inputs.append((kv, new))
            width += len(new)
            if chunk.request_id in proposals:
                rows.append(width - 1)
                sampling.append(sequence)
        for _ in range(draft.k):
            if not inputs:
                draft.model.idle_pass()
            else:
                logits = self._run("draft", draft.model, draft.attention, inputs, rows)
                for row, sequence in enumerate(sampling):
                    self._draft_token(logits[row], sequence, proposals[sequence.request_id])
            sampling = [
                s for s in sampling if len(proposals[s.request_id].tokens) < wanted[s.request_id]
            ]
            inputs = [(s.draft_kv, proposals[s.request_id].tokens[-1:]) for s in sampling]
            rows = list(range(len(sampling)))
        return proposals

    def _draft_token(self, logits: torch.Tensor, sequence: Sequence, proposal: Proposal) -> None:
        """The draft's next proposal for ``sequence`` from its logits [V]."""
        token, probs = sample_with_probs(logits, sequence.params, sequence.generator)
        proposal.tokens.append(token)
        if probs is not None:
            proposal.probs.append(probs)

    def _verify_forward(
        self, chunks: list[Chunk], sequences: list[Sequence], proposals: dict[str, Proposal]
    ) -> torch.Tensor:
        """The main model's forward over the scheduled chunks, each decode followed by its
        draft proposals. Logits [rows, V]: one row per sampling chunk, k + 1 per proposal."""
        inputs: list[tuple[SequenceKV, list[int]]] = []
        rows: list[int] = []
        width = 0
        for chunk, sequence in zip(chunks, sequences, strict=True):
            if sequence.kv.length != chunk.start:
                raise RuntimeError(
                    f"request {chunk.request_id}: cache holds {sequence.kv.length} tokens, "
                    f"chunk starts at {chunk.start}"
                )
            proposed = proposals[chunk.request_id].tokens if chunk.request_id in proposals else []
            new = sequence.tokens[chunk.start : chunk.end] + proposed
            inputs.append((sequence.kv, new))
            width += len(new)
            if chunk.samples:
                rows.extend(range(width - 1 - len(proposed), width))
        return self._run("main", self.model, self.attention, inputs, rows)

    def _sample_and_emit(
        self,
        chunks: list[Chunk],
        sequences: list[Sequence],
        logits: torch.Tensor,
        proposals: dict[str, Proposal],
    ) -> tuple[set[str], dict[str, int]]:
        """Sample (or verify the proposals of) every sampling chunk and send its tokens.
        Returns the finished requests and, per request, the proposals kept and sent."""
        finished: set[str] = set()
        accepted: dict[str, int] = {}
        row = 0
        now = time.monotonic()
        # every greedy row's token in one device-to-host copy (not one per request)
        greedy = (
            logits.argmax(dim=-1).tolist() if any(s.generator is None for s in sequences) else []
        )
        for chunk, sequence in zip(chunks, sequences, strict=True):
            if not chunk.samples:
                continue
            proposal = proposals.get(chunk.request_id)
            if proposal is None:
                if sequence.generator is None:  # greedy (temperature 0)
                    token = int(greedy[row])
                else:
                    token = sample_token(logits[row], sequence.params, sequence.generator)
                verdict = Verdict([token], 0)
                row += 1
            else:
                verdict = self._verify(
                    logits[row : row + len(proposal.tokens) + 1], sequence, proposal
                )
                row += len(proposal.tokens) + 1
                # the cache keeps the last known token and the kept proposals
                sequence.kv.length = chunk.end + verdict.accepted
                sequence.draft_kv.length = min(sequence.draft_kv.length, sequence.kv.length)
            sent, ended = self._emit(sequence, verdict.tokens, now)
            if proposal is not None:
                self.proposed_tokens += len(proposal.tokens)
                self.accepted_tokens += verdict.accepted
                if self.observer is not None:
                    self.observer.speculated(len(proposal.tokens), verdict.accepted)
            accepted[chunk.request_id] = sent - 1
            if ended is not None:
                finished.add(sequence.request_id)
                self._finished(sequence, ended, now)
        return finished, accepted

    def _verify(self, logits: torch.Tensor, sequence: Sequence, proposal: Proposal) -> Verdict:
        """Keep a prefix of the proposals (``speculative``); ``logits`` [k + 1, V]."""
        if sequence.generator is None:  # a greedy request (temperature 0)
            return verify_greedy(proposal.tokens, logits)
        return verify_sampled(
            proposal.tokens, proposal.probs, logits, sequence.params, sequence.generator
        )

    def _emit(self, sequence: Sequence, tokens: list[int], now: float) -> tuple[int, str | None]:
        """Append and send ``tokens`` until one ends the request. Returns (tokens sent, the
        finish reason or None)."""
        sent = 0
        for token in tokens:
            sequence.tokens.append(token)
            sent += 1
            self.generated_tokens += 1
            self._observe_token(sequence, now)
            reason = self._finish_reason(sequence, token)
            ended: str | None = reason
            try:
                sequence.sink(TokenOutput(token, reason))
            except Exception:  # noqa: BLE001 - a broken client must not stop the step loop
                log.exception("request %s: output sink failed; aborting it", sequence.request_id)
                ended = reason or "abort"
            if ended is not None:
                return sent, ended
        return sent, None

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

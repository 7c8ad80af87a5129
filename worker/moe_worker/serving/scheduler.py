"""The per-rank continuous-batching scheduler: pure bookkeeping, no torch, no I/O, no threads.

The engine runs one forward step at a time. Each step it calls :meth:`Scheduler.schedule` to
learn which tokens of which sequences to run (a list of :class:`Chunk`), runs them packed
together, samples a next token for every chunk with ``samples=True``, and reports back with
:meth:`Scheduler.step_done`.

A step is filled in this order, under ``token_budget`` tokens:

1. every running sequence past its prompt gets a one-token decode chunk (admission order);
   since ``token_budget >= max_running`` these always fit, so decodes are never starved; with
   speculative decoding each also gets up to ``speculative_tokens`` draft tokens (verified in
   the same forward, so they count against the budget) from what is left after one token for
   every running sequence;
2. running sequences still in prefill get the next piece of their prompt, oldest first
   (chunked prefill: a long prompt is split over several steps);
3. waiting sequences are admitted strictly FIFO while there is a free slot, budget left and
   (if bounded) KV capacity for their whole reservation; each gets a first prefill chunk.

KV capacity is reserved per sequence for its worst case (``prompt_len + max_new_tokens``) at
admission, so an admitted sequence can always run to completion and nothing is ever
preempted.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Literal

SequenceState = Literal["waiting", "prefill", "decode"]


class QueueFull(Exception):
    """``add`` was called while ``max_waiting`` sequences already wait."""

    def __init__(self, max_waiting: int) -> None:
        super().__init__(f"waiting queue is full ({max_waiting} requests)")
        self.max_waiting = max_waiting


@dataclass(frozen=True)
class Chunk:
    """Tokens ``start .. start + length - 1`` of one sequence, run in the next step.

    Tokens ``0 .. start - 1`` are already in the KV cache. ``samples`` is True when the chunk
    ends at the sequence's last known token, so the engine samples a next token from it.
    """

    request_id: str
    start: int
    length: int
    samples: bool
    draft_tokens: int = 0  # speculative decoding: the draft tokens this decode may verify

    @property
    def end(self) -> int:
        """One past the position of the chunk's last token."""
        return self.start + self.length


@dataclass(frozen=True)
class SequenceView:
    """A read-only snapshot of one sequence's progress."""

    request_id: str
    prompt_len: int
    max_new_tokens: int
    computed: int  # tokens already in the KV cache
    generated: int  # sampled tokens the scheduler was told about
    state: SequenceState

    @property
    def known(self) -> int:
        """Tokens of the sequence known so far: the prompt plus the generated ones."""
        return self.prompt_len + self.generated


@dataclass
class _Sequence:
    """The scheduler's mutable record of one sequence."""

    request_id: str
    prompt_len: int
    max_new_tokens: int
    computed: int = 0
    generated: int = 0
    aborted: bool = False  # aborted while in flight: dropped at the next step_done

    @property
    def known(self) -> int:
        return self.prompt_len + self.generated

    @property
    def reservation(self) -> int:
        return self.prompt_len + self.max_new_tokens

    @property
    def in_prefill(self) -> bool:
        return self.computed < self.prompt_len

    def next_chunk(self, budget_left: int) -> Chunk:
        """The next chunk of at most ``budget_left`` (>= 1) tokens, starting at ``computed``."""
        length = min(self.known - self.computed, budget_left)
        return Chunk(
            request_id=self.request_id,
            start=self.computed,
            length=length,
            samples=self.computed + length == self.known,
        )


class Scheduler:
    """Continuous batching with chunked prefill for one rank.

    Args:
        token_budget: tokens per step over all sequences; at least ``max_running``.
        max_running: sequences in the running batch at most (>= 1).
        max_waiting: bound of the waiting queue (>= 0); ``add`` raises :class:`QueueFull`
            beyond it.
        kv_capacity_tokens: if set, the KV tokens a rank may hold: a waiting sequence is
            admitted only while the running sequences' reservations plus its own fit, and a
            request whose own reservation exceeds it is rejected by ``add``.
        speculative_tokens: draft tokens a decode may verify per step (0: no draft model).
    """

    def __init__(
        self,
        token_budget: int,
        max_running: int,
        max_waiting: int,
        kv_capacity_tokens: int | None = None,
        speculative_tokens: int = 0,
    ) -> None:
        if max_running < 1:
            raise ValueError(f"max_running must be >= 1, got {max_running}")
        if token_budget < max_running:
            raise ValueError(
                f"token_budget ({token_budget}) must be >= max_running ({max_running}): "
                "every running sequence needs room for its decode token each step"
            )
        if max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {max_waiting}")
        if kv_capacity_tokens is not None and kv_capacity_tokens < 1:
            raise ValueError(f"kv_capacity_tokens must be >= 1, got {kv_capacity_tokens}")
        if speculative_tokens < 0:
            raise ValueError(f"speculative_tokens must be >= 0, got {speculative_tokens}")
        self.token_budget = token_budget
        self.speculative_tokens = speculative_tokens
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.kv_capacity_tokens = kv_capacity_tokens
        # Both dicts keep insertion order: FIFO for the queue, admission order for the batch.
        self._waiting: dict[str, _Sequence] = {}
        self._running: dict[str, _Sequence] = {}
        self._reserved = 0
        self._in_flight: list[Chunk] | None = None

    # ----------------------------------------------------------------- read-only views

    @property
    def num_running(self) -> int:
        """Sequences in the running batch (an in-flight aborted one counts until step_done)."""
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        """Sequences in the waiting queue."""
        return len(self._waiting)

    @property
    def has_work(self) -> bool:
        """Whether any live sequence runs or waits."""
        return bool(self._waiting) or any(not s.aborted for s in self._running.values())

    @property
    def reserved_kv_tokens(self) -> int:
        """KV tokens reserved by the running batch (``prompt_len + max_new_tokens`` each)."""
        return self._reserved

    @property
    def step_in_flight(self) -> bool:
        """Whether a non-empty ``schedule()`` awaits its ``step_done()``."""
        return self._in_flight is not None

    def sequence(self, request_id: str) -> SequenceView:
        """A snapshot of a live sequence; KeyError for an unknown, finished or aborted one."""
        seq = self._waiting.get(request_id)
        state: SequenceState = "waiting"
        if seq is None:
            seq = self._running.get(request_id)
            if seq is None or seq.aborted:
                raise KeyError(request_id)
            state = "prefill" if seq.in_prefill else "decode"
        return SequenceView(
            request_id=seq.request_id,
            prompt_len=seq.prompt_len,
            max_new_tokens=seq.max_new_tokens,
            computed=seq.computed,
            generated=seq.generated,
            state=state,
        )

    # ------------------------------------------------------------------------ requests

    def add(self, request_id: str, prompt_len: int, max_new_tokens: int) -> None:
        """Queue a new sequence at the back of the FIFO.

        Raises:
            ValueError: ``prompt_len`` or ``max_new_tokens`` below 1, a duplicate
                ``request_id`` (still waiting or running), or a reservation larger than
                ``kv_capacity_tokens`` (it could never be admitted).
            QueueFull: ``max_waiting`` sequences already wait.
        """
        if prompt_len < 1:
            raise ValueError(f"prompt_len must be >= 1, got {prompt_len}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if request_id in self._waiting or request_id in self._running:
            raise ValueError(f"duplicate request_id {request_id!r}")
        seq = _Sequence(request_id, prompt_len, max_new_tokens)
        if self.kv_capacity_tokens is not None and seq.reservation > self.kv_capacity_tokens:
            raise ValueError(
                f"prompt_len + max_new_tokens ({seq.reservation}) exceeds "
                f"kv_capacity_tokens ({self.kv_capacity_tokens})"
            )
        if len(self._waiting) >= self.max_waiting:
            raise QueueFull(self.max_waiting)
        self._waiting[request_id] = seq

    def abort(self, request_id: str) -> bool:
        """Remove a waiting or running sequence; False if it is unknown (or already gone).

        A sequence that is part of the in-flight step keeps its slot and reservation until
        ``step_done``, where it is dropped and its chunk ignored.
        """
        if self._waiting.pop(request_id, None) is not None:
            return True
        seq = self._running.get(request_id)
        if seq is None or seq.aborted:
            return False
        if self._in_flight is not None and any(c.request_id == request_id for c in self._in_flight):
            seq.aborted = True
        else:
            self._remove_running(seq)
        return True

    # --------------------------------------------------------------------------- steps

    def schedule(self) -> list[Chunk]:
        """The next step's chunks: decodes, then running prefills, then admissions.

        Returns [] when there is nothing to run (no step is then in flight).

        Raises:
            RuntimeError: the previous non-empty schedule() has not been step_done() yet.
        """
        if self._in_flight is not None:
            raise RuntimeError("schedule() called again before step_done() of the last step")
        chunks: list[Chunk] = []
        budget = self.token_budget
        # 1. decodes: one token each (they fit because token_budget >= max_running), and
        # draft tokens from what the budget leaves after one token for every running sequence
        # (a running prefill is never starved).
        decoding = [seq for seq in self._running.values() if not seq.in_prefill]
        spare = budget - len(self._running)
        for seq in decoding:
            room = seq.max_new_tokens - seq.generated - 1  # tokens after this step's first
            drafts = max(0, min(self.speculative_tokens, spare, room))
            chunk = replace(seq.next_chunk(1), draft_tokens=drafts)
            chunks.append(chunk)
            spare -= drafts
            budget -= chunk.length + drafts
        # 2. running prefills, oldest first.
        for seq in self._running.values():
            if budget == 0:
                break
            if seq.in_prefill:
                chunk = seq.next_chunk(budget)
                chunks.append(chunk)
                budget -= chunk.length
        # 3. admissions, strictly FIFO: stop at the first head that does not fit.
        while self._waiting and budget > 0 and len(self._running) < self.max_running:
            head = next(iter(self._waiting.values()))
            if (
                self.kv_capacity_tokens is not None
                and self._reserved + head.reservation > self.kv_capacity_tokens
            ):
                break
            del self._waiting[head.request_id]
            self._running[head.request_id] = head
            self._reserved += head.reservation
            chunk = head.next_chunk(budget)
            chunks.append(chunk)
            budget -= chunk.length
        if chunks:
            self._in_flight = chunks
        return list(chunks)

    def step_done(
        self, finished: Iterable[str] = (), accepted: Mapping[str, int] | None = None
    ) -> set[str]:
        """Record that the chunks of the last schedule() ran.

        For each chunk, its tokens are now computed; a sampling chunk adds one known token
        (generated += 1), and with speculative decoding the ``accepted[request_id]`` draft
        tokens kept before it (they are computed too: the verifying forward cached them). A
        sequence leaves the batch (its reservation freed) when it is in ``finished`` (e.g. it
        sampled a stop token) or its generated count reaches ``max_new_tokens``. Sequences
        aborted while in flight are dropped, their chunk ignored.

        Returns:
            the request ids that finished this call (both kinds; not the aborted ones).

        Raises:
            RuntimeError: no step is in flight.
            ValueError: ``finished`` names a sequence that did not sample in this step (aborted
                ones are ignored); nothing is changed then.
        """
        if self._in_flight is None:
            raise RuntimeError("step_done() called without a scheduled step")
        done = set(finished)
        sampled = {c.request_id for c in self._in_flight if c.samples}
        unexpected = {
            rid
            for rid in done - sampled
            if not (rid in self._running and self._running[rid].aborted)
        }
        if unexpected:
            raise ValueError(
                f"finished names sequences that did not sample this step: {sorted(unexpected)}"
            )
        chunks, self._in_flight = self._in_flight, None
        left: set[str] = set()
        for chunk in chunks:
            seq = self._running[chunk.request_id]
            if seq.aborted:
                self._remove_running(seq)
                continue
            seq.computed += chunk.length
            if not chunk.samples:
                continue
            kept = 0 if accepted is None else accepted.get(chunk.request_id, 0)
            seq.computed += kept
            seq.generated += 1 + kept
            if chunk.request_id in done or seq.generated >= seq.max_new_tokens:
                self._remove_running(seq)
                left.add(chunk.request_id)
        return left

    def step_failed(self) -> None:
        """The last schedule()'s chunks did not run (a peer died mid-step): nothing advances,
        so the same tokens are scheduled again; sequences aborted meanwhile leave.

        Raises:
            RuntimeError: no step is in flight.
        """
        if self._in_flight is None:
            raise RuntimeError("step_failed() called without a scheduled step")
        chunks, self._in_flight = self._in_flight, None
        for chunk in chunks:
            seq = self._running.get(chunk.request_id)
            if seq is not None and seq.aborted:
                self._remove_running(seq)

    def _remove_running(self, seq: _Sequence) -> None:
        del self._running[seq.request_id]
        self._reserved -= seq.reservation

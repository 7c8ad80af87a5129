"""The continuous-batching scheduler: chunked prefill, decode priority, admission, aborts."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe_worker.serving.scheduler import Chunk, QueueFull, Scheduler


def by_id(chunks: list[Chunk]) -> dict[str, Chunk]:
    """The step's chunks keyed by request id (each id at most once per step)."""
    ids = [c.request_id for c in chunks]
    assert len(ids) == len(set(ids)), f"a sequence got two chunks in one step: {ids}"
    return {c.request_id: c for c in chunks}


def run_to_completion(sched: Scheduler, max_steps: int = 1000) -> list[list[Chunk]]:
    """Step until nothing is left, finishing nothing early; the steps' chunks."""
    steps: list[list[Chunk]] = []
    while sched.has_work:
        assert len(steps) < max_steps, "the scheduler did not drain"
        chunks = sched.schedule()
        assert chunks, "has_work but nothing scheduled"
        steps.append(chunks)
        sched.step_done()
    return steps


# ------------------------------------------------------------------------- construction


@pytest.mark.parametrize(
    ("kwargs", "field_name"),
    [
        ({"token_budget": 3, "max_running": 4, "max_waiting": 1}, "token_budget"),
        ({"token_budget": 8, "max_running": 0, "max_waiting": 1}, "max_running"),
        ({"token_budget": 8, "max_running": 2, "max_waiting": -1}, "max_waiting"),
        (
            {"token_budget": 8, "max_running": 2, "max_waiting": 1, "kv_capacity_tokens": 0},
            "kv_capacity_tokens",
        ),
    ],
)
def test_constructor_rejects_bad_limits(kwargs: dict[str, int], field_name: str) -> None:
    with pytest.raises(ValueError, match=field_name):
        Scheduler(**kwargs)


def test_budget_error_names_both_fields() -> None:
    with pytest.raises(ValueError) as info:
        Scheduler(token_budget=3, max_running=4, max_waiting=1)
    assert "token_budget" in str(info.value) and "max_running" in str(info.value)


def test_add_rejects_bad_requests() -> None:
    sched = Scheduler(token_budget=8, max_running=2, max_waiting=4)
    with pytest.raises(ValueError, match="prompt_len"):
        sched.add("a", 0, 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        sched.add("a", 4, 0)
    sched.add("a", 4, 4)
    with pytest.raises(ValueError, match="duplicate"):
        sched.add("a", 2, 2)
    # still a duplicate once running
    sched.schedule()
    with pytest.raises(ValueError, match="duplicate"):
        sched.add("a", 2, 2)
    assert sched.num_waiting == 0 and sched.num_running == 1


# ------------------------------------------------------------------------ basic stepping


def test_single_request_prefill_then_decode_until_max_new_tokens() -> None:
    sched = Scheduler(token_budget=16, max_running=4, max_waiting=4)
    sched.add("a", prompt_len=5, max_new_tokens=3)
    assert sched.sequence("a").state == "waiting"
    assert sched.has_work

    assert sched.schedule() == [Chunk("a", start=0, length=5, samples=True)]
    assert sched.step_done() == set()
    view = sched.sequence("a")
    assert (view.computed, view.generated, view.state) == (5, 1, "decode")

    assert sched.schedule() == [Chunk("a", start=5, length=1, samples=True)]
    assert sched.step_done() == set()
    assert sched.schedule() == [Chunk("a", start=6, length=1, samples=True)]
    assert sched.step_done() == {"a"}  # generated reached max_new_tokens

    assert not sched.has_work
    assert sched.num_running == 0
    assert sched.schedule() == []
    with pytest.raises(KeyError):
        sched.sequence("a")


def test_max_new_tokens_one_finishes_on_the_prefill_sample() -> None:
    sched = Scheduler(token_budget=4, max_running=2, max_waiting=2)
    sched.add("a", prompt_len=6, max_new_tokens=1)
    assert sched.schedule() == [Chunk("a", 0, 4, samples=False)]
    assert sched.step_done() == set()
    assert sched.schedule() == [Chunk("a", 4, 2, samples=True)]
    assert sched.step_done() == {"a"}
    assert not sched.has_work


def test_finished_reported_by_engine_leaves_the_batch() -> None:
    sched = Scheduler(token_budget=8, max_running=2, max_waiting=2)
    sched.add("a", 3, 100)
    sched.add("b", 3, 100)
    sched.schedule()
    assert sched.step_done(finished=["a"]) == {"a"}  # e.g. a stop token on its first sample
    assert sched.num_running == 1
    assert sched.schedule() == [Chunk("b", 3, 1, samples=True)]


def test_finished_must_name_a_sampling_sequence() -> None:
    sched = Scheduler(token_budget=4, max_running=2, max_waiting=2)
    sched.add("a", 10, 5)
    sched.schedule()  # a: 0..3, does not sample
    with pytest.raises(ValueError, match="did not sample"):
        sched.step_done(finished=["a"])
    with pytest.raises(ValueError, match="did not sample"):
        sched.step_done(finished=["nobody"])
    # the rejected calls changed nothing: the step is still in flight
    assert sched.step_in_flight
    assert sched.step_done() == set()
    assert sched.sequence("a").computed == 4


def test_schedule_twice_and_step_done_without_step_are_errors() -> None:
    sched = Scheduler(token_budget=8, max_running=2, max_waiting=2)
    with pytest.raises(RuntimeError):
        sched.step_done()
    assert sched.schedule() == []  # an empty schedule puts nothing in flight
    assert sched.schedule() == []
    sched.add("a", 2, 2)
    assert sched.schedule()
    with pytest.raises(RuntimeError):
        sched.schedule()
    sched.step_done()
    assert sched.schedule()


# ------------------------------------------------------------------- chunked prefill


def test_long_prompt_is_chunked_while_others_keep_decoding() -> None:
    sched = Scheduler(token_budget=8, max_running=4, max_waiting=8)
    sched.add("d1", 2, 50)
    sched.add("d2", 3, 50)
    assert [c.length for c in sched.schedule()] == [2, 3]
    sched.step_done()

    sched.add("long", prompt_len=20, max_new_tokens=5)
    expected_long = [(0, 6, False), (6, 6, False), (12, 6, False), (18, 2, True)]
    for start, length, samples in expected_long:
        chunks = sched.schedule()
        # decodes come first, one token each, every step
        assert [(c.request_id, c.length, c.samples) for c in chunks[:2]] == [
            ("d1", 1, True),
            ("d2", 1, True),
        ]
        assert chunks[2] == Chunk("long", start, length, samples)
        assert sum(c.length for c in chunks) <= 8
        sched.step_done()
    assert sched.sequence("long").state == "decode"
    assert sched.sequence("long").generated == 1
    chunks = sched.schedule()
    assert [c.request_id for c in chunks] == ["d1", "d2", "long"]
    assert all(c.length == 1 for c in chunks)
    assert chunks[2] == Chunk("long", 20, 1, True)


def test_running_prefills_go_oldest_first_before_admissions() -> None:
    sched = Scheduler(token_budget=4, max_running=4, max_waiting=8)
    sched.add("a", 6, 2)
    sched.add("b", 6, 2)
    sched.add("c", 6, 2)
    assert sched.schedule() == [Chunk("a", 0, 4, False)]
    sched.step_done()
    # a finishes its prompt (2 tokens) and b is admitted with the 2 left; c waits
    assert sched.schedule() == [Chunk("a", 4, 2, True), Chunk("b", 0, 2, False)]
    sched.step_done()
    assert sched.num_waiting == 1
    # decode a first, then b's prefill continues before c is admitted
    assert sched.schedule() == [Chunk("a", 6, 1, True), Chunk("b", 2, 3, False)]
    sched.step_done()
    assert sched.sequence("c").state == "waiting"


def test_budget_and_max_running_respected_and_admission_fifo() -> None:
    sched = Scheduler(token_budget=10, max_running=3, max_waiting=16)
    order = [f"r{i}" for i in range(8)]
    for i, rid in enumerate(order):
        sched.add(rid, prompt_len=1 + (i * 3) % 7, max_new_tokens=1 + i % 4)
    first_seen: list[str] = []
    for chunks in run_to_completion(sched):
        assert sum(c.length for c in chunks) <= 10
        assert len(chunks) <= 3
        for c in chunks:
            if c.request_id not in first_seen:
                first_seen.append(c.request_id)
    assert first_seen == order


def test_head_of_queue_blocks_admission_behind_it() -> None:
    # strict FIFO: a big head that does not fit KV blocks a small one behind it
    sched = Scheduler(token_budget=8, max_running=4, max_waiting=4, kv_capacity_tokens=20)
    sched.add("a", 4, 6)  # reserves 10
    sched.add("big", 7, 9)  # reserves 16: does not fit next to a
    sched.add("small", 1, 1)  # reserves 2: would fit, but is behind big
    assert [c.request_id for c in sched.schedule()] == ["a"]
    assert sched.reserved_kv_tokens == 10
    sched.step_done()
    for _ in range(5):
        assert [c.request_id for c in sched.schedule()] == ["a"]
        sched.step_done()
    assert sched.num_running == 0 and sched.reserved_kv_tokens == 0
    assert sched.schedule() == [Chunk("big", 0, 7, True), Chunk("small", 0, 1, True)]
    assert sched.reserved_kv_tokens == 18


# ------------------------------------------------------------------------- queue bound


def test_queue_full_loses_nothing() -> None:
    sched = Scheduler(token_budget=4, max_running=1, max_waiting=2)
    sched.add("a", 2, 1)
    sched.add("b", 2, 1)
    with pytest.raises(QueueFull, match=r"waiting queue is full \(2 requests\)"):
        sched.add("c", 2, 1)
    assert sched.num_waiting == 2
    done: set[str] = set()
    while sched.has_work:
        sched.schedule()
        done |= sched.step_done()
    assert done == {"a", "b"}


def test_queue_frees_as_sequences_are_admitted() -> None:
    sched = Scheduler(token_budget=4, max_running=1, max_waiting=1)
    sched.add("a", 2, 2)
    sched.schedule()  # a admitted: the queue has room again
    sched.add("b", 2, 2)
    with pytest.raises(QueueFull):
        sched.add("c", 2, 2)
    sched.step_done()


def test_zero_waiting_bound_rejects_everything() -> None:
    sched = Scheduler(token_budget=4, max_running=1, max_waiting=0)
    with pytest.raises(QueueFull):
        sched.add("a", 1, 1)
    assert not sched.has_work


# ------------------------------------------------------------------------- kv capacity


def test_kv_capacity_blocks_admission_until_a_sequence_finishes() -> None:
    sched = Scheduler(token_budget=16, max_running=4, max_waiting=4, kv_capacity_tokens=24)
    sched.add("a", 8, 4)  # 12
    sched.add("b", 6, 6)  # 12
    sched.add("c", 4, 4)  # 8: must wait for a or b
    assert [c.request_id for c in sched.schedule()] == ["a", "b"]
    assert sched.reserved_kv_tokens == 24
    sched.step_done()
    for step in range(3):
        chunks = sched.schedule()
        assert [c.request_id for c in chunks] == ["a", "b"]
        assert sched.sequence("c").state == "waiting"
        left = sched.step_done(finished=["b"] if step == 2 else [])
    assert left == {"a", "b"}  # a by max_new_tokens, b by the engine
    assert sched.reserved_kv_tokens == 0
    assert [c.request_id for c in sched.schedule()] == ["c"]
    assert sched.reserved_kv_tokens == 8


def test_oversize_request_is_rejected() -> None:
    sched = Scheduler(token_budget=16, max_running=4, max_waiting=4, kv_capacity_tokens=24)
    with pytest.raises(ValueError, match="kv_capacity_tokens"):
        sched.add("huge", 20, 5)
    sched.add("exact", 20, 4)  # exactly the capacity is fine
    assert sched.num_waiting == 1


# ------------------------------------------------------------------------------ aborts


def test_abort_waiting() -> None:
    sched = Scheduler(token_budget=8, max_running=1, max_waiting=4)
    sched.add("a", 2, 2)
    sched.add("b", 2, 2)
    assert sched.abort("b")
    assert not sched.abort("b")
    assert not sched.abort("nobody")
    assert sched.num_waiting == 1
    sched.add("b", 3, 1)  # the id is free again
    assert [c.request_id for c in sched.schedule()] == ["a"]
    sched.step_done()


def test_abort_running_between_steps_frees_slot_and_kv() -> None:
    sched = Scheduler(token_budget=8, max_running=1, max_waiting=4, kv_capacity_tokens=10)
    sched.add("a", 4, 6)
    sched.add("b", 4, 6)
    sched.schedule()
    sched.step_done()
    assert sched.reserved_kv_tokens == 10
    assert sched.abort("a")
    assert sched.num_running == 0 and sched.reserved_kv_tokens == 0
    with pytest.raises(KeyError):
        sched.sequence("a")
    assert sched.schedule() == [Chunk("b", 0, 4, True)]
    sched.step_done()


def test_abort_in_flight_is_dropped_at_step_done() -> None:
    sched = Scheduler(token_budget=8, max_running=2, max_waiting=4, kv_capacity_tokens=100)
    sched.add("a", 3, 10)
    sched.add("b", 3, 10)
    sched.schedule()
    assert sched.abort("a")
    assert not sched.abort("a")
    with pytest.raises(KeyError):
        sched.sequence("a")
    with pytest.raises(ValueError, match="duplicate"):
        sched.add("a", 1, 1)  # its chunk is still running
    # the step still holds a's slot and KV until it completes
    assert sched.num_running == 2 and sched.reserved_kv_tokens == 26
    # the engine may report it finished too: ignored, not counted as finished
    assert sched.step_done(finished=["a"]) == set()
    assert sched.num_running == 1 and sched.reserved_kv_tokens == 13
    assert sched.schedule() == [Chunk("b", 3, 1, True)]
    sched.step_done()


def test_all_in_flight_aborted_has_no_work_but_needs_step_done() -> None:
    sched = Scheduler(token_budget=4, max_running=2, max_waiting=4)
    sched.add("a", 2, 2)
    sched.schedule()
    sched.abort("a")
    assert not sched.has_work and sched.step_in_flight
    assert sched.step_done() == set()
    assert sched.num_running == 0 and sched.schedule() == []


# --------------------------------------------------------------------- property test


@dataclass
class Model:
    """What the test knows of one request, built only from the chunks it saw."""

    prompt_len: int
    max_new_tokens: int
    computed: int = 0
    generated: int = 0
    admitted: bool = False
    covered: list[int] = field(default_factory=list)  # prompt positions, in the order run


Arrival = tuple[int, int]  # (prompt_len, max_new_tokens)


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    token_budget_extra=st.integers(0, 12),
    max_running=st.integers(1, 5),
    max_waiting=st.integers(0, 6),
    kv=st.one_of(st.none(), st.integers(8, 60)),
    speculative=st.integers(0, 3),
    data=st.data(),
)
def test_random_traffic_invariants(
    token_budget_extra: int,
    max_running: int,
    max_waiting: int,
    kv: int | None,
    speculative: int,
    data: st.DataObject,
) -> None:
    """Random arrivals, aborts and stops (and, with ``speculative`` draft tokens per decode,
    random acceptance): the budget, batch, KV and ordering invariants hold at every step."""
    budget = max_running + token_budget_extra
    sched = Scheduler(
        budget, max_running, max_waiting, kv_capacity_tokens=kv, speculative_tokens=speculative
    )
    models: dict[str, Model] = {}
    live: set[str] = set()  # added, not finished, not aborted
    order: list[str] = []  # add order of accepted requests
    admitted_order: list[str] = []
    finished: set[str] = set()
    aborted: set[str] = set()
    next_id = 0
    n_steps = data.draw(st.integers(1, 25), label="steps with arrivals")

    def one_step(arrivals: list[Arrival], allow_chaos: bool) -> None:
        nonlocal next_id
        for prompt_len, max_new in arrivals:
            rid = f"r{next_id}"
            next_id += 1
            oversize = kv is not None and prompt_len + max_new > kv
            if oversize:
                with pytest.raises(ValueError):
                    sched.add(rid, prompt_len, max_new)
                continue
            if sched.num_waiting >= max_waiting:
                with pytest.raises(QueueFull):
                    sched.add(rid, prompt_len, max_new)
                continue
            sched.add(rid, prompt_len, max_new)
            models[rid] = Model(prompt_len, max_new)
            live.add(rid)
            order.append(rid)

        if allow_chaos and live and data.draw(st.booleans(), label="abort before"):
            victim = data.draw(st.sampled_from(sorted(live)), label="victim")
            assert sched.abort(victim)
            live.discard(victim)
            aborted.add(victim)

        decoding = {
            rid
            for rid in live
            if models[rid].admitted and models[rid].computed >= models[rid].prompt_len
        }
        for rid in live:
            assert sched.sequence(rid).state == (
                "decode" if rid in decoding else "prefill" if models[rid].admitted else "waiting"
            )
        running_before = {rid for rid in live if models[rid].admitted}
        chunks = sched.schedule()
        if not chunks:
            # nothing runs only when nothing is left: a waiting head always fits an empty batch
            assert not sched.has_work
            return
        step = by_id(chunks)
        # budget (draft tokens included), batch size, KV
        assert 1 <= sum(c.length + c.draft_tokens for c in chunks) <= budget
        for c in chunks:  # drafts only for decodes, within k and the tokens still to come
            m = models[c.request_id]
            assert c.draft_tokens == 0 or c.request_id in decoding
            assert (
                0 <= c.draft_tokens <= min(speculative, max(0, m.max_new_tokens - m.generated - 1))
            )
        assert all(c.length >= 1 for c in chunks)
        assert sched.num_running <= max_running
        if kv is not None:
            assert sched.reserved_kv_tokens <= kv
        # every decoding sequence gets exactly one token, and decodes come first
        for rid in decoding:
            assert rid in step and step[rid].length == 1 and step[rid].samples
        assert [c.request_id for c in chunks[: len(decoding)]] == [
            rid for rid in admitted_order if rid in decoding
        ]
        for c in chunks[len(decoding) :]:
            assert c.request_id not in decoding
        # no running sequence is starved: prefills fit in what the decodes leave
        assert running_before <= set(step)
        # chunks continue where the sequence left off; prompts covered contiguously
        for c in chunks:
            m = models[c.request_id]
            if not m.admitted:
                m.admitted = True
                admitted_order.append(c.request_id)
            known = m.prompt_len + m.generated
            assert c.start == m.computed
            assert c.start + c.length <= known
            assert c.samples == (c.start + c.length == known)
            m.covered.extend(p for p in range(c.start, c.start + c.length) if p < m.prompt_len)
        # admission is FIFO over what was accepted and not aborted before admission
        assert admitted_order == [rid for rid in order if models[rid].admitted]

        if allow_chaos and live and data.draw(st.booleans(), label="abort in flight"):
            victim = data.draw(st.sampled_from(sorted(live)), label="in-flight victim")
            assert sched.abort(victim)
            live.discard(victim)
            aborted.add(victim)

        samplers = sorted(c.request_id for c in chunks if c.samples and c.request_id in live)
        stop = (
            data.draw(st.lists(st.sampled_from(samplers), unique=True), label="stops")
            if allow_chaos and samplers
            else []
        )
        kept = {
            c.request_id: data.draw(st.integers(0, c.draft_tokens), label="kept drafts")
            for c in chunks
            if c.draft_tokens and c.request_id in live
        }
        left = sched.step_done(finished=stop, accepted=kept)
        expected_left = set(stop)
        for c in chunks:
            if c.request_id in aborted:
                continue
            m = models[c.request_id]
            m.computed += c.length + kept.get(c.request_id, 0)
            if c.samples:
                m.generated += 1 + kept.get(c.request_id, 0)
                if m.generated >= m.max_new_tokens:
                    expected_left.add(c.request_id)
        assert left == expected_left
        assert not (left & finished)
        finished.update(left)
        live.difference_update(left)
        for rid in live:
            view = sched.sequence(rid)
            assert (view.computed, view.generated) == (models[rid].computed, models[rid].generated)
        assert sched.num_running + sched.num_waiting == len(live)
        if kv is not None:
            assert sched.reserved_kv_tokens == sum(
                models[r].prompt_len + models[r].max_new_tokens for r in live if models[r].admitted
            )

    arrival = st.tuples(st.integers(1, 20), st.integers(1, 6))
    for _ in range(n_steps):
        one_step(data.draw(st.lists(arrival, max_size=3), label="arrivals"), allow_chaos=True)

    # arrivals stop: everything left drains with no further help
    bound = sum(m.prompt_len + m.max_new_tokens for m in models.values()) + 10
    for _ in range(bound):
        if not sched.has_work:
            break
        one_step([], allow_chaos=False)
    assert not sched.has_work
    assert sched.num_running == 0 and sched.reserved_kv_tokens == 0
    assert finished | aborted == set(order)
    assert not (finished & aborted)
    for rid in finished:
        m = models[rid]
        assert m.covered == list(range(m.prompt_len)), rid
        assert 1 <= m.generated <= m.max_new_tokens


def test_a_failed_step_is_scheduled_again_unchanged() -> None:
    scheduler = Scheduler(token_budget=8, max_running=4, max_waiting=4)
    scheduler.add("long", prompt_len=12, max_new_tokens=2)
    scheduler.add("short", prompt_len=2, max_new_tokens=2)
    first = scheduler.schedule()
    scheduler.step_failed()  # the forward raised: nothing ran
    assert scheduler.sequence("long").computed == 0
    assert scheduler.schedule() == first  # the same chunks again
    scheduler.abort("long")
    scheduler.step_failed()
    with pytest.raises(KeyError):
        scheduler.sequence("long")
    again = scheduler.schedule()
    assert [c.request_id for c in again] == ["short"] and again[0].start == 0
    with pytest.raises(RuntimeError, match="step_failed"):
        Scheduler(token_budget=8, max_running=4, max_waiting=4).step_failed()


def test_draft_tokens_go_to_decodes_first_within_the_budget() -> None:
    """Two decodes and a waiting prompt, 3 draft tokens per decode: with a budget of 9 both
    decodes get 3 drafts (8 tokens) and the prompt 1 token; with 6, the first decode gets 3,
    the second 1, the prompt nothing; never more drafts than tokens still to generate."""
    for budget, want_drafts, want_prefill in ((9, [3, 3], 1), (6, [3, 1], 0)):
        sched = Scheduler(budget, max_running=3, max_waiting=2, speculative_tokens=3)
        for rid in ("a", "b"):
            sched.add(rid, 1, 10)
        sched.schedule()
        sched.step_done()  # both prompts prefilled: each generated one token
        sched.add("c", 5, 4)
        chunks = sched.schedule()
        assert [c.draft_tokens for c in chunks[:2]] == want_drafts
        assert sum(c.length for c in chunks[2:]) == want_prefill
        sched.step_done(accepted={"a": 2})
        assert sched.sequence("a").generated == 4 and sched.sequence("a").computed == 4
    short = Scheduler(8, max_running=1, max_waiting=1, speculative_tokens=3)
    short.add("s", 2, 3)
    short.schedule()
    short.step_done()
    (chunk,) = short.schedule()
    assert chunk.draft_tokens == 1  # 2 tokens left to generate: 1 draft + the verified one

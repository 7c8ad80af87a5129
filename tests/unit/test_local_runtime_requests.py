"""The local runtime's request figures and answer checks (pure parts)."""

from __future__ import annotations

from moe_operator.loadgen.stats import RequestRecord
from moe_operator.runtime.requests import check_prompts, mismatches, window_summary


def record(index: int, sent: float, first: float, done: float | None, error: str | None = None):
    return RequestRecord(
        index=index,
        topic=0,
        sent_at=sent,
        first_token_at=first,
        finished_at=done,
        output_tokens=4 if error is None and done is not None else 0,
        error=error,
    )


def test_window_summary_counts_only_the_requests_ended_in_the_window() -> None:
    records = [
        record(0, 0.0, 0.1, 1.0),  # long before the window
        record(1, 14.0, 14.5, 15.0),
        record(2, 16.0, 16.2, 19.0),
        record(3, 17.0, 17.1, None),  # in flight
        record(4, 12.0, 12.0, 18.0, error="HTTP 500"),
    ]
    summary = window_summary(records, elapsed_s=20.0, window_s=10.0)
    assert summary["requests_completed"] == 2  # records 1 and 2
    assert summary["requests_per_s"] == 0.2  # 2 in the last 10 s
    assert summary["output_tokens_per_s"] == 0.8
    assert 200.0 <= summary["ttft_p50_ms"] <= 500.0  # the TTFTs of records 1 and 2
    assert summary["requests_failed"] == 1 and summary["requests_failed_total"] == 1
    assert summary["requests_completed_total"] == 3
    assert summary["requests_in_flight"] == 1


def test_check_prompts_are_the_same_every_run_and_valid_byte_ids() -> None:
    prompts = check_prompts()
    assert prompts == check_prompts() and prompts != check_prompts(seed=1)
    assert len(prompts) == 6 and len({tuple(p) for p in prompts}) == 6
    assert all(4 <= len(p) <= 24 and all(32 <= t <= 126 for t in p) for p in prompts)


def test_mismatches_are_answers_unequal_to_their_prompts_reference() -> None:
    references = [[1, 2, 3], [4, 5, 6]]
    answers = [
        {"prompt": 0, "tokens": [1, 2, 3], "t": 1.0, "epSize": 2},
        {"prompt": 1, "tokens": [4, 5, 7], "t": 2.0, "epSize": 3},
        {"prompt": 1, "tokens": [4, 5, 6], "t": 3.0, "epSize": 4},
    ]
    assert mismatches(answers, references) == [answers[1]]

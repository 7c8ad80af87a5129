"""Inter-token gaps split by rebalance windows (``moe_operator.loadgen.stats``)."""

from __future__ import annotations

import pytest

from moe_operator.loadgen.stats import RequestRecord, itl_in_windows, window_itl_summary


def _record(first: float, gaps: list[float], ok: bool = True) -> RequestRecord:
    return RequestRecord(
        index=0,
        topic=0,
        sent_at=0.0,
        first_token_at=first,
        finished_at=first + sum(gaps) if ok else None,
        chunk_gaps=gaps,
        error=None if ok else "HTTP 500",
    )


def test_a_gap_belongs_to_the_window_its_token_arrived_in() -> None:
    # tokens arrive at 1.0 (first), 1.1, 1.3, 1.6, 2.0
    records = [_record(1.0, [0.1, 0.2, 0.3, 0.4])]
    inside, outside = itl_in_windows(records, [(1.25, 1.6)])
    assert inside == pytest.approx([0.2, 0.3])
    assert outside == pytest.approx([0.1, 0.4])
    # no windows: everything is outside; failed requests count nowhere
    failed = _record(0.0, [5.0], ok=False)
    assert itl_in_windows([*records, failed], []) == ([], pytest.approx([0.1, 0.2, 0.3, 0.4]))


def test_the_summary_compares_p99_inside_with_outside() -> None:
    slow = _record(10.0, [0.5] * 4)  # arrivals 10.5 .. 12.0, all inside the window
    fast = _record(0.0, [0.1] * 20)  # arrivals 0.1 .. 2.0, all outside
    summary = window_itl_summary([slow, fast], [(10.2, 12.5)])
    assert summary["itl_gaps_inside"] == 4 and summary["itl_gaps_outside"] == 20
    assert summary["itl_inside_p99_ms"] == pytest.approx(500.0)
    assert summary["itl_outside_p99_ms"] == pytest.approx(100.0)
    assert summary["itl_p99_inside_over_outside"] == pytest.approx(5.0)
    assert summary["window_s"] == pytest.approx(2.3)
    assert window_itl_summary([fast], [])["itl_p99_inside_over_outside"] is None

"""Per-request records of a load-generator run and their summary (pure).

Meanings follow vLLM's serving benchmark: TTFT from sending the request to its first streamed
token; inter-token latency (ITL) the gaps between streamed chunks after the first, per token;
end-to-end latency from sending to the last chunk. Retried 503s count from the first attempt.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

QUANTILES = (50, 90, 99)


@dataclass
class RequestRecord:
    """One request's outcome. Times in seconds from the start of the run."""

    index: int
    topic: int
    sent_at: float
    first_token_at: float | None = None
    finished_at: float | None = None
    chunk_gaps: list[float] = field(default_factory=list)  # s per token, after the first chunk
    output_tokens: int = 0
    prompt_tokens: int | None = None
    finish_reason: str | None = None
    retries: int = 0
    error: str | None = None  # a category: "HTTP 400", "ReadTimeout", "stream error"
    detail: str = ""  # the server's message or the exception's text

    @property
    def ok(self) -> bool:
        return self.error is None and self.finished_at is not None


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (nearest rank on the sorted values, linear between); None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    position = q / 100 * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _quantiles_ms(name: str, values: list[float]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for q in QUANTILES:
        value = percentile(values, q)
        out[f"{name}_p{q}_ms"] = None if value is None else round(value * 1e3, 3)
    return out


def summarize(records: list[RequestRecord], elapsed_s: float) -> dict[str, Any]:
    """Totals, rates and latency percentiles of ``records`` over ``elapsed_s`` seconds."""
    done = [r for r in records if r.ok]
    failed = [r for r in records if r.error is not None]
    output_tokens = sum(r.output_tokens for r in done)
    ttft = [r.first_token_at - r.sent_at for r in done if r.first_token_at is not None]
    e2e = [r.finished_at - r.sent_at for r in done if r.finished_at is not None]
    itl = [gap for r in done for gap in r.chunk_gaps]
    elapsed = max(elapsed_s, 1e-9)
    return {
        "requests_sent": len(records),
        "requests_completed": len(done),
        "requests_failed": len(failed),
        "requests_in_flight": len(records) - len(done) - len(failed),
        "failures": dict(Counter(r.error for r in failed if r.error is not None)),
        "retries_503": sum(r.retries for r in records),
        "elapsed_s": round(elapsed_s, 3),
        "requests_per_s": round(len(done) / elapsed, 3),
        "output_tokens": output_tokens,
        "output_tokens_per_s": round(output_tokens / elapsed, 2),
        "prompt_tokens": sum(r.prompt_tokens or 0 for r in done),
        "finish_reasons": dict(Counter(r.finish_reason for r in done if r.finish_reason)),
        **_quantiles_ms("ttft", ttft),
        **_quantiles_ms("itl", itl),
        **_quantiles_ms("e2e", e2e),
    }


def itl_in_windows(
    records: list[RequestRecord], windows: list[tuple[float, float]]
) -> tuple[list[float], list[float]]:
    """The completed requests' inter-token gaps split by when their token arrived: (gaps whose
    token arrived inside one of ``windows`` [start, end] (seconds on the records' clock), the
    other gaps). A token's arrival is its first token's time plus the gaps before it."""
    inside: list[float] = []
    outside: list[float] = []
    for record in records:
        if not record.ok or record.first_token_at is None:
            continue
        at = record.first_token_at
        for gap in record.chunk_gaps:
            at += gap
            hit = any(start <= at <= end for start, end in windows)
            (inside if hit else outside).append(gap)
    return inside, outside


def window_itl_summary(
    records: list[RequestRecord], windows: list[tuple[float, float]]
) -> dict[str, Any]:
    """ITL percentiles inside ``windows`` and outside them, and the p99 ratio inside/outside."""
    inside, outside = itl_in_windows(records, windows)
    p99_in, p99_out = percentile(inside, 99), percentile(outside, 99)
    return {
        "windows": len(windows),
        "window_s": round(sum(end - start for start, end in windows), 3),
        "itl_gaps_inside": len(inside),
        "itl_gaps_outside": len(outside),
        **_quantiles_ms("itl_inside", inside),
        **_quantiles_ms("itl_outside", outside),
        "itl_p99_inside_over_outside": (
            round(p99_in / p99_out, 4) if p99_in is not None and p99_out else None
        ),
    }

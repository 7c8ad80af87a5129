"""How a load-generator run looks while it runs: a rich table (terminals) or a progress line."""

from __future__ import annotations

from typing import Any

from rich.table import Table


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def progress_table(summary: dict[str, Any], title: str) -> Table:
    """A live table of ``summary`` (``stats.summarize``)."""
    table = Table(title=title, show_header=True, header_style="bold")
    for column in ("sent", "done", "failed", "in flight", "req/s", "out tok/s", "503 retries"):
        table.add_column(column, justify="right")
    table.add_row(
        str(summary["requests_sent"]),
        str(summary["requests_completed"]),
        str(summary["requests_failed"]),
        str(summary["requests_in_flight"]),
        f"{summary['requests_per_s']:.2f}",
        f"{summary['output_tokens_per_s']:.1f}",
        str(summary["retries_503"]),
    )
    latency = Table(show_header=True, header_style="bold")
    latency.add_column("ms")
    for q in ("p50", "p90", "p99"):
        latency.add_column(q, justify="right")
    for name, label in (("ttft", "TTFT"), ("itl", "ITL"), ("e2e", "end to end")):
        latency.add_row(label, *(_ms(summary[f"{name}_{q}_ms"]) for q in ("p50", "p90", "p99")))
    outer = Table.grid()
    outer.add_row(table)
    outer.add_row(latency)
    return outer


def progress_line(summary: dict[str, Any]) -> str:
    """One line for logs that are not a terminal."""
    return (
        f"t={summary['elapsed_s']:.0f}s sent={summary['requests_sent']} "
        f"done={summary['requests_completed']} failed={summary['requests_failed']} "
        f"req/s={summary['requests_per_s']:.2f} tok/s={summary['output_tokens_per_s']:.1f} "
        f"ttft_p50={_ms(summary['ttft_p50_ms'])}ms itl_p50={_ms(summary['itl_p50_ms'])}ms"
    )

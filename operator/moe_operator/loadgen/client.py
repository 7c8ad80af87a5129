"""One streamed completion request against any OpenAI-compatible server (this project's
``moe-eplb serve``, vLLM, SGLang), as a client does: 503 answers are retried after their
``Retry-After``, the stream is timed chunk by chunk, and the final usage chunk
(``stream_options.include_usage``) gives the token counts where the server sends it."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from email.utils import parsedate_to_datetime

import httpx

from .stats import RequestRecord
from .traffic import PlannedRequest

MAX_RETRY_WAIT_S = 30.0


def retry_after_seconds(value: str | None, now: float | None = None) -> float:
    """Seconds to wait from a ``Retry-After`` header: delta seconds or an HTTP date (1 s if
    absent or unreadable; at most ``MAX_RETRY_WAIT_S``)."""
    if value is None:
        return 1.0
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - (now or time.time())
        except (TypeError, ValueError):
            return 1.0
    return min(max(seconds, 0.0), MAX_RETRY_WAIT_S)


def completion_body(model: str, planned: PlannedRequest, ignore_eos: bool) -> dict[str, object]:
    """The request body: the OpenAI completions API plus vLLM's ``ignore_eos``."""
    body: dict[str, object] = {
        "model": model,
        "prompt": planned.prompt,
        "max_tokens": planned.max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if ignore_eos:
        body["ignore_eos"] = True
    return body


async def send_completion(
    client: httpx.AsyncClient,
    base_url: str,
    body: dict[str, object],
    record: RequestRecord,
    clock: Callable[[], float],
    max_retries: int = 5,
) -> None:
    """Send ``body`` to ``base_url``/v1/completions, filling ``record`` (errors included)."""
    while True:
        try:
            async with client.stream("POST", f"{base_url}/v1/completions", json=body) as response:
                if response.status_code == 503 and record.retries < max_retries:
                    record.retries += 1
                    await response.aclose()
                    await asyncio.sleep(retry_after_seconds(response.headers.get("retry-after")))
                    continue
                if response.status_code != 200:
                    text = (await response.aread()).decode(errors="replace")
                    record.error = f"HTTP {response.status_code}"
                    record.detail = text.strip().splitlines()[0][:300] if text.strip() else ""
                    return
                await _read_stream(response, record, clock)
                return
        except httpx.HTTPError as exc:
            record.error = type(exc).__name__
            record.detail = str(exc)[:300]
            return


async def _read_stream(
    response: httpx.Response, record: RequestRecord, clock: Callable[[], float]
) -> None:
    last: float | None = None
    counted = 0
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if "error" in chunk:
            record.error = "stream error"
            record.detail = str(chunk["error"])[:300]
            return
        usage = chunk.get("usage")
        if usage:
            record.output_tokens = int(usage.get("completion_tokens") or 0)
            record.prompt_tokens = usage.get("prompt_tokens")
        for choice in chunk.get("choices") or []:
            if choice.get("finish_reason"):
                record.finish_reason = choice["finish_reason"]
            ids = choice.get("token_ids")
            tokens = len(ids) if ids else (1 if choice.get("text") else 0)
            if not tokens:
                continue
            now = clock()
            if last is None:
                record.first_token_at = now
            else:
                record.chunk_gaps.extend([(now - last) / tokens] * tokens)
            last = now
            counted += tokens
    record.finished_at = clock()
    if not record.output_tokens:
        record.output_tokens = counted

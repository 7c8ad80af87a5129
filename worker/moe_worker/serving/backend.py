"""The contract between the OpenAI-compatible API and whatever generates tokens.

The API (``serving.api``) validates and tokenizes requests, detokenizes and applies stop
strings; a ``ServingBackend`` (one EP rank's engine, or a test double) turns prompt token ids
into generated token ids under ``SamplingParams``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol

FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples. ``temperature`` 0 is greedy; ``seed`` makes sampling
    reproducible for that request alone (independent of what else is in the batch)."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class TokenOutput:
    """One generated token of a request; ``finish_reason`` is set on its last one
    ("stop": an end-of-sequence or stop token, "length": max_new_tokens reached)."""

    token_id: int
    finish_reason: FinishReason | None = None


class BackendBusy(Exception):
    """The request cannot be taken now (queue full, rank leaving): HTTP 503 + Retry-After."""

    def __init__(self, reason: str, retry_after_s: float = 1.0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s


class ServingBackend(Protocol):
    """What the API needs from a generator of tokens."""

    model_name: str  # the id served at /v1/models and accepted in requests' "model"
    max_model_len: int  # prompt + generated tokens of one sequence, at most
    vocab_size: int  # rows of the model's embedding: valid token ids are 0 .. vocab_size - 1
    tokenizer: Any  # a transformers PreTrainedTokenizerBase

    def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[TokenOutput]:
        """The request's tokens as they are generated. Raises ``BackendBusy`` before the first
        token when the request is not admitted. Closing the iterator early aborts the request."""
        ...

    def ready(self) -> bool:
        """Admitting requests now (readiness)."""
        ...

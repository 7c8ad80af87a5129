"""The OpenAI-compatible wire format: request models, response and stream-chunk builders, errors.

Requests are validated by pydantic in strict mode (a wrong JSON type is an error, never
coerced: ``"max_tokens": "10"`` or ``"stream": 1`` is refused) and fields this server does not
know are ignored. Rules that need no model or tokenizer (ranges, ``n``, the number of stop
strings, one prompt per request, text-only chat content) are checked here; the ones that do
(the model name, token ids against the vocabulary, the context length) by ``serving.api``.

Every refusal is a ``RequestError``; ``error_body`` renders it as OpenAI's error object
``{"error": {"message", "type", "param", "code"}}``. The builders return plain dicts in the
shapes of OpenAI's ``text_completion``, ``chat.completion`` and ``chat.completion.chunk``
objects, plus vLLM's ``return_token_ids`` extension (``prompt_token_ids`` at the top level,
``token_ids`` on each choice).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator

MAX_STOP_STRINGS = 4
CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
SSE_DONE = b"data: [DONE]\n\n"

# ---------------------------------------------------------------------------------------------
# Errors


class RequestError(Exception):
    """A request this server refuses: HTTP ``status`` with OpenAI's error object.

    ``param`` names the offending field (a dotted path such as ``messages.[0].content``), or is
    None when the body as a whole is wrong."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        *,
        status: int = 400,
        type: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.type = type
        self.headers = headers or {}


def error_body(
    message: str,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _param_path(loc: tuple[int | str, ...]) -> tuple[str, str]:
    """A pydantic error location as (OpenAI's ``param``, the form used in messages):
    ``("messages", 0, "content")`` -> ``("messages.[0].content", "messages[0].content")``."""
    param, shown = "", ""
    for part in loc:
        if isinstance(part, int):
            param += f".[{part}]"
            shown += f"[{part}]"
        else:
            param += f".{part}" if param else part
            shown += f".{part}" if shown else part
    return param, shown


def error_from_validation(exc: ValidationError) -> RequestError:
    """The first problem pydantic found, as a 400 naming its field.

    A rule of our own (a validator's ``ValueError``) keeps its own message; a type error says
    the field and what was expected, e.g. ``max_tokens: Input should be a valid integer``."""
    first = exc.errors(include_url=False)[0]
    param, shown = _param_path(tuple(first["loc"]))
    if first["type"] == "value_error":
        message = str(first["msg"]).removeprefix("Value error, ")
    else:
        message = f"{shown or 'body'}: {first['msg']}"
    return RequestError(message, param or None)


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object; ``RequestError`` (param None) when it is not valid
    JSON (NaN and Infinity included) or not an object."""

    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    try:
        value = json.loads(raw, parse_constant=no_constants)
    except RecursionError:
        raise RequestError("request body is not valid JSON: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise RequestError(f"request body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
            type(value), "a number"
        )
        raise RequestError(f"request body must be a JSON object, got {kind}")
    return value


# ---------------------------------------------------------------------------------------------
# Requests


class _Strict(BaseModel):
    """Strict types, unknown fields ignored."""

    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    """``stream_options``: with ``include_usage`` a last chunk carries the usage."""

    include_usage: bool | None = False


class _SamplingRequest(_Strict):
    """The fields completions and chat completions share."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = False
    n: int | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    return_token_ids: bool | None = False

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"max_tokens must be at least 1, got {value}")
        return value

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value: float | None) -> float | None:
        if value is not None and not 0.0 <= value <= 2.0:
            raise ValueError(f"temperature must be between 0 and 2 (0: greedy), got {value}")
        return value

    @field_validator("top_p")
    @classmethod
    def _top_p(cls, value: float | None) -> float | None:
        if value is not None and not 0.0 < value <= 1.0:
            raise ValueError(f"top_p must be in (0, 1]: greater than 0, at most 1; got {value}")
        return value

    @field_validator("seed")
    @classmethod
    def _seed(cls, value: int | None) -> int | None:
        if value is not None and not SEED_MIN <= value <= SEED_MAX:
            raise ValueError(f"seed must be a 64-bit integer, got {value}")
        return value

    @field_validator("n")
    @classmethod
    def _n(cls, value: int | None) -> int | None:
        if value is not None and value != 1:
            raise ValueError(f"n must be 1: one choice per request is supported, got {value}")
        return value

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, value: Any) -> Any:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise ValueError("stop must be a string or a list of strings")
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    @field_validator("stream_options")
    @classmethod
    def _stream_options(
        cls, value: StreamOptions | None, info: ValidationInfo
    ) -> StreamOptions | None:
        if value is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return value

    @property
    def include_usage(self) -> bool:
        """A streamed response ends with a usage chunk."""
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


def _reject_logprobs(value: Any, name: str) -> Any:
    if value is None or value is False:
        return value
    raise ValueError(f"{name} is not supported by this server (set it to null or false)")


class CompletionRequest(_SamplingRequest):
    """``POST /v1/completions``. ``prompt`` is normalized to one string or one list of ids."""

    prompt: str | list[int]
    echo: bool | None = False
    logprobs: int | bool | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, value: Any) -> Any:
        shape = "a string, a list of token ids, or a one-element list of either"
        if isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise ValueError(f"prompt must be {shape}")
        if value and all(isinstance(v, (str, list)) for v in value):  # a batch of prompts
            if len(value) != 1:
                raise ValueError(
                    f"only one prompt per request is supported, got a batch of {len(value)}"
                )
            value = value[0]
            if isinstance(value, str):
                return value
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ValueError(f"prompt must be {shape}")
        return value

    @field_validator("logprobs", mode="before")
    @classmethod
    def _logprobs(cls, value: Any) -> Any:
        return _reject_logprobs(value, "logprobs")


class ChatMessage(_Strict):
    """One chat message; list content is joined (text parts only) into one string."""

    role: str
    content: str | None = None

    @field_validator("role")
    @classmethod
    def _role(cls, value: str) -> str:
        if value not in CHAT_ROLES:
            raise ValueError(f"role must be one of {', '.join(sorted(CHAT_ROLES))}; got {value!r}")
        return value

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, value: Any) -> Any:
        if value is None or isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise ValueError("content must be a string or a list of text parts")
        texts = []
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise ValueError(
                    'content parts must be {"type": "text", "text": ...}: '
                    "only text content is supported"
                )
            text = part.get("text")
            if not isinstance(text, str):
                raise ValueError("a text content part needs a string 'text'")
            texts.append(text)
        return "\n".join(texts)


class ChatCompletionRequest(_SamplingRequest):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None

    @field_validator("messages")
    @classmethod
    def _messages(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        if not value:
            raise ValueError("messages must not be empty")
        return value

    @field_validator("max_completion_tokens")
    @classmethod
    def _max_completion_tokens(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"max_completion_tokens must be at least 1, got {value}")
        return value

    @field_validator("logprobs", mode="before")
    @classmethod
    def _logprobs(cls, value: Any) -> Any:
        return _reject_logprobs(value, "logprobs")

    @field_validator("top_logprobs", mode="before")
    @classmethod
    def _top_logprobs(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool) and value == 0:
            return None  # asks for no alternatives: nothing to refuse
        return _reject_logprobs(value, "top_logprobs")

    def message_dicts(self) -> list[dict[str, str]]:
        """The messages as chat templates take them (``content`` always a string)."""
        return [{"role": m.role, "content": m.content or ""} for m in self.messages]


# ---------------------------------------------------------------------------------------------
# Responses and stream chunks

FinishReasonOut = Literal["stop", "length", "abort"] | None


@dataclass(frozen=True)
class ResponseIdentity:
    """What every object of one response (or every chunk of one stream) repeats."""

    id: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))


def new_request_id(prefix: str) -> str:
    """``cmpl-<hex>`` / ``chatcmpl-<hex>``."""
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """OpenAI's usage object."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _envelope(
    ident: ResponseIdentity,
    obj: str,
    choices: list[dict[str, Any]],
    prompt_token_ids: list[int] | None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": ident.id,
        "object": obj,
        "created": ident.created,
        "model": ident.model,
        "choices": choices,
    }
    if prompt_token_ids is not None:
        body["prompt_token_ids"] = prompt_token_ids
    return body


def _choice(
    payload: dict[str, Any], finish_reason: FinishReasonOut, token_ids: list[int] | None
) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, **payload, "logprobs": None}
    choice["finish_reason"] = finish_reason
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return choice


def completion_response(
    ident: ResponseIdentity,
    text: str,
    finish_reason: FinishReasonOut,
    usage_: dict[str, int],
    prompt_token_ids: list[int] | None = None,
    token_ids: list[int] | None = None,
) -> dict[str, Any]:
    """A ``text_completion`` object (ids only when given: ``return_token_ids``): the shape of
    a streamed chunk, with the usage."""
    body = completion_chunk(
        ident, text, finish_reason, token_ids=token_ids, prompt_token_ids=prompt_token_ids
    )
    body["usage"] = usage_
    return body


def completion_chunk(
    ident: ResponseIdentity,
    text: str,
    finish_reason: FinishReasonOut = None,
    *,
    token_ids: list[int] | None = None,
    prompt_token_ids: list[int] | None = None,
    with_usage_field: bool = False,
) -> dict[str, Any]:
    """One streamed ``text_completion`` chunk; ``with_usage_field`` adds ``"usage": null``
    (OpenAI's form when the stream ends with a usage chunk)."""
    body = _envelope(
        ident,
        "text_completion",
        [_choice({"text": text}, finish_reason, token_ids)],
        prompt_token_ids,
    )
    if with_usage_field:
        body["usage"] = None
    return body


def chat_response(
    ident: ResponseIdentity,
    text: str,
    finish_reason: FinishReasonOut,
    usage_: dict[str, int],
    prompt_token_ids: list[int] | None = None,
    token_ids: list[int] | None = None,
) -> dict[str, Any]:
    """A ``chat.completion`` object."""
    message = {"role": "assistant", "content": text}
    body = _envelope(
        ident,
        "chat.completion",
        [_choice({"message": message}, finish_reason, token_ids)],
        prompt_token_ids,
    )
    body["usage"] = usage_
    return body


def chat_chunk(
    ident: ResponseIdentity,
    delta: dict[str, Any],
    finish_reason: FinishReasonOut = None,
    *,
    token_ids: list[int] | None = None,
    prompt_token_ids: list[int] | None = None,
    with_usage_field: bool = False,
) -> dict[str, Any]:
    """One ``chat.completion.chunk``: ``delta`` is ``{"role": "assistant", "content": ""}``
    on the first chunk, ``{"content": text}`` after."""
    body = _envelope(
        ident,
        "chat.completion.chunk",
        [_choice({"delta": delta}, finish_reason, token_ids)],
        prompt_token_ids,
    )
    if with_usage_field:
        body["usage"] = None
    return body


def usage_chunk(ident: ResponseIdentity, obj: str, usage_: dict[str, int]) -> dict[str, Any]:
    """The last chunk of a stream with ``include_usage``: no choices, the usage."""
    body = _envelope(ident, obj, [], None)
    body["usage"] = usage_
    return body


def sse_event(payload: dict[str, Any]) -> bytes:
    """One server-sent event: ``data: <json>`` and a blank line."""
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"

"""The OpenAI-compatible HTTP API over a ``ServingBackend`` (vLLM's conventions).

Routes: ``GET /v1/models``, ``GET /health``, ``POST /v1/completions``,
``POST /v1/chat/completions``; ``build_app`` also adds the caller's ``extra_routes``.

A request goes: body (at most 1 MiB) -> JSON object -> pydantic model (``protocol``) -> the
checks that need the backend (model name, token ids, context length) -> prompt token ids ->
``SamplingParams`` -> ``backend.generate``. The first token is awaited before the response
starts, so a ``BackendBusy`` still answers 503 with ``Retry-After``, streamed or not. Each
token then goes through ``OutputText`` (incremental detokenization, stop strings): a stop
string ends the generation by closing the backend's iterator, which aborts the request, and
so does a client that disconnects (streamed or not). Every refusal is a 400 (503 when busy)
with OpenAI's error object naming the field, never FastAPI's 422.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute
from starlette.types import Receive, Scope, Send

from .backend import BackendBusy, SamplingParams, ServingBackend, TokenOutput
from .detokenize import OutputText, TokenDecoder
from .protocol import (
    SSE_DONE,
    ChatCompletionRequest,
    CompletionRequest,
    FinishReasonOut,
    RequestError,
    ResponseIdentity,
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
    error_body,
    error_from_validation,
    new_request_id,
    parse_json_object,
    sse_event,
    usage,
    usage_chunk,
)

log = logging.getLogger("moe_worker.serving.api")

MAX_BODY_BYTES = 1 << 20  # 1 MiB
ModelT = TypeVar("ModelT", bound=BaseModel)
T = TypeVar("T")

# ---------------------------------------------------------------------------------------------
# Pure request checks (the tests call them directly too)


def parse_request(model: type[ModelT], body: Mapping[str, Any]) -> ModelT:
    """``body`` validated as ``model``; a ``RequestError`` naming the field otherwise."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise error_from_validation(exc) from None


def check_model(requested: str | None, served: str) -> None:
    """``model`` must be the served model's name (a missing one means it)."""
    if requested is not None and requested != served:
        raise RequestError(
            f"The model `{requested}` does not exist: this server serves `{served}`", "model"
        )


def check_token_ids(token_ids: Sequence[int], vocab_size: int, param: str) -> None:
    """Every id must be a row of the model's embedding."""
    bad = [t for t in token_ids if not 0 <= t < vocab_size]
    if bad:
        raise RequestError(
            f"{param} has token ids outside the vocabulary: ids must be in "
            f"0..{vocab_size - 1}, got {bad[0]}",
            param,
        )


def render_plain_chat(messages: Sequence[Mapping[str, str]]) -> str:
    """The prompt of a tokenizer without a chat template: ``role: content`` lines, then
    ``assistant: `` for the reply."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "


def chat_prompt_ids(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """The prompt ids of a conversation: the tokenizer's chat template (with the generation
    prompt) when it has one, ``render_plain_chat`` otherwise."""
    if getattr(tokenizer, "chat_template", None):
        try:
            result = tokenizer.apply_chat_template(
                list(messages), add_generation_prompt=True, tokenize=True
            )
        except Exception as exc:  # a template that refuses the conversation (raise_exception)
            raise RequestError(
                f"messages do not fit the chat template: {exc}", "messages"
            ) from None
        ids = result["input_ids"] if isinstance(result, Mapping) else result
        if ids and isinstance(ids[0], list):  # a batch of one
            ids = ids[0]
        return [int(t) for t in ids]
    return [int(t) for t in tokenizer.encode(render_plain_chat(messages))]


def completion_prompt_ids(tokenizer: Any, prompt: str | list[int], vocab_size: int) -> list[int]:
    """A completion's prompt ids: the text tokenized, or the ids checked against the vocab."""
    if isinstance(prompt, str):
        if not prompt:
            raise RequestError("prompt must not be empty", "prompt")
        ids = [int(t) for t in tokenizer.encode(prompt)]
    else:
        check_token_ids(prompt, vocab_size, "prompt")
        ids = list(prompt)
    if not ids:
        raise RequestError("prompt must not be empty", "prompt")
    return ids


def resolve_max_tokens(
    requested: int | None,
    prompt_tokens: int,
    max_model_len: int,
    *,
    field: str = "max_tokens",
    prompt_field: str = "prompt",
) -> int:
    """The tokens to generate: ``requested`` (checked against the context length) or, when
    None, as many as fit after the prompt. The prompt must leave room for one token."""
    if prompt_tokens >= max_model_len:
        raise RequestError(
            f"This model's maximum context length is {max_model_len} tokens, and the "
            f"{prompt_field} has {prompt_tokens} tokens: it must be shorter than "
            f"max_model_len to leave room for a generated token",
            prompt_field,
        )
    if requested is None:
        return max_model_len - prompt_tokens
    if prompt_tokens + requested > max_model_len:
        raise RequestError(
            f"This model's maximum context length is {max_model_len} tokens, but "
            f"{prompt_tokens + requested} were requested ({prompt_tokens} in the "
            f"{prompt_field} + {requested} {field}): prompt + {field} must be at most "
            f"{max_model_len}",
            field,
        )
    return requested


def sampling_params(
    request: CompletionRequest | ChatCompletionRequest, max_new_tokens: int, vocab_size: int
) -> SamplingParams:
    """The backend's ``SamplingParams`` of a validated request."""
    stop_ids = request.stop_token_ids or []
    check_token_ids(stop_ids, vocab_size, "stop_token_ids")
    return SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        seed=request.seed,
        ignore_eos=bool(request.ignore_eos),
        stop_token_ids=tuple(stop_ids),
    )


def retry_after_seconds(busy: BackendBusy) -> int:
    """``Retry-After`` for a busy backend: whole seconds, at least 1."""
    value = busy.retry_after_s
    if not isinstance(value, int | float) or not math.isfinite(value):
        return 1
    return max(1, math.ceil(value))


def busy_error(busy: BackendBusy) -> RequestError:
    """A ``BackendBusy`` as the 503 answer."""
    seconds = retry_after_seconds(busy)
    return RequestError(
        f"The server cannot take this request now ({busy.reason}); retry in {seconds} s",
        None,
        status=503,
        type="service_unavailable_error",
        headers={"Retry-After": str(seconds)},
    )


def error_response(error: RequestError) -> JSONResponse:
    """``error`` as an HTTP response."""
    return JSONResponse(
        error_body(error.message, error.type, error.param),
        status_code=error.status,
        headers=error.headers,
    )


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The request body, refused (400) past ``limit`` bytes: by its Content-Length before
    reading anything, else once more than ``limit`` bytes came (nothing more is read)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise RequestError(f"invalid Content-Length header {declared!r}") from None
        if size > limit:
            raise RequestError(f"request body is {size} bytes: the limit is {limit} bytes (1 MiB)")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk[: limit + 1 - len(body)]
        if len(body) > limit:
            raise RequestError(f"request body is over the limit of {limit} bytes (1 MiB)")
    return bytes(body)


# ---------------------------------------------------------------------------------------------
# Running one generation


async def _close(iterator: Any) -> None:
    """Close a backend iterator (aborting its request), even from a cancelled task."""
    aclose = getattr(iterator, "aclose", None)
    if aclose is None:
        return
    with anyio.CancelScope(shield=True):
        try:
            await aclose()
        except Exception:  # a backend failing to abort must not hide the response's fate
            log.exception("closing the backend's token iterator failed")


async def _next(iterator: AsyncIterator[TokenOutput]) -> TokenOutput | None:
    try:
        return await iterator.__anext__()
    except StopAsyncIteration:
        return None


@dataclass
class Piece:
    """What one generated token adds to the response."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReasonOut = None


@dataclass
class Generation:
    """One request running on the backend, its first token already received."""

    tokens: AsyncIterator[TokenOutput]
    first: TokenOutput | None
    text: OutputText
    completion_tokens: int = 0
    _closed: bool = field(default=False, repr=False)

    @classmethod
    async def start(
        cls,
        backend: ServingBackend,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        text: OutputText,
    ) -> Generation:
        """Submit the request and wait for its first token; raises ``BackendBusy``."""
        tokens = backend.generate(request_id, prompt_ids, params)
        try:
            first = await _next(tokens)
        except BaseException:
            await _close(tokens)
            raise
        return cls(tokens, first, text)

    async def pieces(self) -> AsyncGenerator[Piece, None]:
        """The response, token by token; the last piece has the finish reason. Ends (and
        aborts the backend's request) at a stop string."""
        output, self.first = self.first, None
        try:
            while output is not None:
                self.completion_tokens += 1
                text = self.text.push(output.token_id)
                finish: FinishReasonOut = output.finish_reason
                if finish is not None and not self.text.stopped:
                    text += self.text.finish()
                if self.text.stopped:
                    finish = "stop"
                yield Piece(text, [output.token_id], finish)
                if finish is not None:
                    return
                output = await _next(self.tokens)
            # The backend ended the request without a finish reason.
            tail = self.text.finish()
            yield Piece(tail, [], "stop" if self.text.stopped else "abort")
        finally:
            await self.close()

    async def close(self) -> None:
        """Stop the backend's generation (idempotent)."""
        if not self._closed:
            self._closed = True
            await _close(self.tokens)


async def unless_disconnected(request: Request, work: Callable[[], Awaitable[T]]) -> T | None:
    """``work()``'s result, or None when the client disconnects first (``work`` is then
    cancelled). Only for a request whose body was read: it listens on ``receive``."""
    outcome: list[T] = []
    failure: list[BaseException] = []

    async with anyio.create_task_group() as group:

        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            group.cancel_scope.cancel()

        group.start_soon(watch)
        try:
            outcome.append(await work())
        except Exception as exc:
            failure.append(exc)
        group.cancel_scope.cancel()
    if failure:
        raise failure[0]
    return outcome[0] if outcome else None


class _EventStream(StreamingResponse):
    """Server-sent events that run ``on_close`` however the response ends: a client that
    disconnects cancels the stream, and ``on_close`` then aborts the generation (also when
    the source never started, as when sending the headers failed)."""

    def __init__(self, source: AsyncIterator[bytes], on_close: Callable[[], Awaitable[None]]):
        super().__init__(
            source,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._source = source
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                aclose = getattr(self._source, "aclose", None)
                if aclose is not None:
                    await aclose()
                await self._on_close()


# ---------------------------------------------------------------------------------------------
# The app


@dataclass
class _Job:
    """A validated request, ready to run."""

    ident: ResponseIdentity
    prompt_ids: list[int]
    params: SamplingParams
    stops: list[str]
    stream: bool
    include_usage: bool
    return_token_ids: bool
    echo_text: str = ""


def _stream_chunk(
    job: _Job, chat: bool, text: str, piece: Piece, prompt_ids: list[int] | None
) -> dict[str, Any]:
    """The chunk of one piece of a streamed response."""
    ids = piece.token_ids if job.return_token_ids else None
    if chat:
        return chat_chunk(
            job.ident,
            {"content": text},
            piece.finish_reason,
            token_ids=ids,
            prompt_token_ids=prompt_ids,
            with_usage_field=job.include_usage,
        )
    return completion_chunk(
        job.ident,
        text,
        piece.finish_reason,
        token_ids=ids,
        prompt_token_ids=prompt_ids,
        with_usage_field=job.include_usage,
    )


class OpenAIServer:
    """The route handlers of ``build_app`` over one backend."""

    def __init__(self, backend: ServingBackend) -> None:
        self.backend = backend
        self.decoder = TokenDecoder(backend.tokenizer)
        self.echo_decoder = TokenDecoder(backend.tokenizer, skip_special_tokens=False)
        self.created = int(time.time())

    # -- plain routes ---------------------------------------------------------------------

    async def models(self) -> JSONResponse:
        """``GET /v1/models``: the one model served."""
        name = self.backend.model_name
        card = {
            "id": name,
            "object": "model",
            "created": self.created,
            "owned_by": "moe-eplb",
            "root": name,
            "parent": None,
            "max_model_len": self.backend.max_model_len,
        }
        return JSONResponse({"object": "list", "data": [card]})

    async def health(self) -> Response:
        """``GET /health``: 200 while the backend admits requests, else 503."""
        if self.backend.ready():
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "not ready"}, status_code=503)

    # -- generation routes ----------------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        """``POST /v1/completions``."""
        try:
            body = parse_json_object(await read_body(request))
            job = self.completion_job(parse_request(CompletionRequest, body))
        except RequestError as exc:
            return error_response(exc)
        except ClientDisconnect:
            return Response(status_code=499)
        return await self._run(request, job, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        """``POST /v1/chat/completions``."""
        try:
            body = parse_json_object(await read_body(request))
            job = self.chat_job(parse_request(ChatCompletionRequest, body))
        except RequestError as exc:
            return error_response(exc)
        except ClientDisconnect:
            return Response(status_code=499)
        return await self._run(request, job, chat=True)

    def completion_job(self, request: CompletionRequest) -> _Job:
        """The job of a validated completion request (raises ``RequestError``)."""
        backend = self.backend
        check_model(request.model, backend.model_name)
        prompt_ids = completion_prompt_ids(backend.tokenizer, request.prompt, backend.vocab_size)
        max_new = resolve_max_tokens(request.max_tokens, len(prompt_ids), backend.max_model_len)
        echo = ""
        if request.echo:
            prompt = request.prompt
            echo = prompt if isinstance(prompt, str) else self.echo_decoder.decode(prompt_ids)
        return self._job("cmpl", request, prompt_ids, max_new, echo)

    def chat_job(self, request: ChatCompletionRequest) -> _Job:
        """The job of a validated chat request (raises ``RequestError``)."""
        backend = self.backend
        check_model(request.model, backend.model_name)
        prompt_ids = chat_prompt_ids(backend.tokenizer, request.message_dicts())
        if not prompt_ids:
            raise RequestError("messages must not be empty", "messages")
        check_token_ids(prompt_ids, backend.vocab_size, "messages")
        requested: int | None = request.max_tokens
        name = "max_tokens"
        if request.max_completion_tokens is not None:
            requested, name = request.max_completion_tokens, "max_completion_tokens"
        max_new = resolve_max_tokens(
            requested, len(prompt_ids), backend.max_model_len, field=name, prompt_field="messages"
        )
        return self._job("chatcmpl", request, prompt_ids, max_new, "")

    def _job(
        self,
        prefix: str,
        request: CompletionRequest | ChatCompletionRequest,
        prompt_ids: list[int],
        max_new: int,
        echo: str,
    ) -> _Job:
        return _Job(
            ident=ResponseIdentity(new_request_id(prefix), self.backend.model_name),
            prompt_ids=prompt_ids,
            params=sampling_params(request, max_new, self.backend.vocab_size),
            stops=list(request.stop or []),
            stream=bool(request.stream),
            include_usage=request.include_usage,
            return_token_ids=bool(request.return_token_ids),
            echo_text=echo,
        )

    async def _run(self, request: Request, job: _Job, *, chat: bool) -> Response:
        text = OutputText(self.decoder, job.stops, job.prompt_ids)

        async def start() -> Generation:
            return await Generation.start(
                self.backend, job.ident.id, job.prompt_ids, job.params, text
            )

        try:
            generation = await unless_disconnected(request, start)
        except BackendBusy as busy:
            log.info("request %s refused: %s", job.ident.id, busy.reason)
            return error_response(busy_error(busy))
        if generation is None:
            return Response(status_code=499)  # the client is gone: nobody reads this
        if job.stream:
            return _EventStream(self._events(generation, job, chat), generation.close)

        async def collect() -> JSONResponse:
            return await self._collect(generation, job, chat)

        try:
            answer = await unless_disconnected(request, collect)
        finally:
            await generation.close()
        return answer if answer is not None else Response(status_code=499)

    async def _collect(self, generation: Generation, job: _Job, chat: bool) -> JSONResponse:
        texts, token_ids = [job.echo_text], []
        finish: FinishReasonOut = None
        try:
            async with aclosing(generation.pieces()) as pieces:
                async for piece in pieces:
                    texts.append(piece.text)
                    token_ids += piece.token_ids
                    finish = piece.finish_reason
        except BackendBusy as busy:
            return error_response(busy_error(busy))
        counts = usage(len(job.prompt_ids), generation.completion_tokens)
        prompt_ids = job.prompt_ids if job.return_token_ids else None
        ids = token_ids if job.return_token_ids else None
        build = chat_response if chat else completion_response
        return JSONResponse(build(job.ident, "".join(texts), finish, counts, prompt_ids, ids))

    async def _events(self, generation: Generation, job: _Job, chat: bool) -> AsyncIterator[bytes]:
        """The SSE stream of a generation; closing it aborts the generation."""
        ident, with_usage = job.ident, job.include_usage
        prompt_ids = job.prompt_ids if job.return_token_ids else None
        try:
            if chat:  # the role first, as OpenAI does
                yield sse_event(
                    chat_chunk(
                        ident,
                        {"role": "assistant", "content": ""},
                        token_ids=[] if job.return_token_ids else None,
                        prompt_token_ids=prompt_ids,
                        with_usage_field=with_usage,
                    )
                )
                prompt_ids = None
            prefix = job.echo_text
            async with aclosing(generation.pieces()) as pieces:
                async for piece in pieces:
                    text = prefix + piece.text
                    if not text and piece.finish_reason is None and not job.return_token_ids:
                        continue  # nothing to say yet (a held-back character or stop prefix)
                    yield sse_event(_stream_chunk(job, chat, text, piece, prompt_ids))
                    prefix, prompt_ids = "", None
            if with_usage:
                obj = "chat.completion.chunk" if chat else "text_completion"
                counts = usage(len(job.prompt_ids), generation.completion_tokens)
                yield sse_event(usage_chunk(ident, obj, counts))
        except Exception as exc:  # the status is sent: report in the stream, as vLLM does
            log.exception("generation %s failed mid-stream", ident.id)
            if isinstance(exc, BackendBusy):
                error = busy_error(exc)
                yield sse_event(error_body(error.message, error.type))
            else:
                yield sse_event(error_body(f"generation failed: {exc}", "server_error"))
        finally:
            await generation.close()
        yield SSE_DONE


# ---------------------------------------------------------------------------------------------
# Error handlers and the factory


async def _validation_error(request: Request, exc: Exception) -> Response:
    """FastAPI's request validation (of ``extra_routes``) as a 400, not its 422."""
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    if not errors:
        return error_response(RequestError("invalid request"))
    first = errors[0]
    loc = tuple(p for p in first.get("loc", ()) if p != "body")
    param = ".".join(str(p) for p in loc) or None
    return error_response(RequestError(f"{param or 'body'}: {first.get('msg')}", param))


async def _http_error(request: Request, exc: Exception) -> Response:
    """A route that does not exist (or an HTTP error raised by one) in OpenAI's format."""
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code in (404, 405):
        message = f"no route {request.method} {request.url.path}"
        error_type = "not_found_error"
    else:
        message, error_type = str(exc.detail), "invalid_request_error"
    return error_response(
        RequestError(
            message, status=exc.status_code, type=error_type, headers=dict(exc.headers or {})
        )
    )


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(
        RequestError(f"internal error: {type(exc).__name__}", status=500, type="server_error")
    )


def build_app(
    backend: ServingBackend, *, extra_routes: Sequence[BaseRoute] | APIRouter | None = None
) -> FastAPI:
    """The OpenAI-compatible API over ``backend``, plus ``extra_routes`` (Starlette routes,
    e.g. a ``Mount`` of another app, or an ``APIRouter``) after its own routes."""
    server = OpenAIServer(backend)
    app = FastAPI(
        title="moe-eplb OpenAI-compatible API",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        redirect_slashes=False,
    )
    app.add_api_route("/v1/models", server.models, methods=["GET"], response_model=None)
    app.add_api_route("/health", server.health, methods=["GET"], response_model=None)
    app.add_api_route("/v1/completions", server.completions, methods=["POST"], response_model=None)
    app.add_api_route(
        "/v1/chat/completions", server.chat_completions, methods=["POST"], response_model=None
    )
    if isinstance(extra_routes, APIRouter):
        app.include_router(extra_routes)
    elif extra_routes:
        app.router.routes.extend(extra_routes)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
    app.state.openai_server = server
    return app

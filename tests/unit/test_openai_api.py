"""The OpenAI-compatible API (``serving.api``) over a deterministic toy backend.

The tokenizer is real: a byte-level BPE without merges (token id = byte value) plus
``<|bos|>``/``<|eos|>``, wrapped as a transformers ``PreTrainedTokenizerFast``; the backend's
vocabulary is 6 ids larger (padding rows the tokenizer does not know). The toy model says
what follows ``say:`` in the prompt up to ``;`` and then ends with eos; any other prompt gets
``next = (sum of the last 4 tokens * 31 + 7) % vocab`` (plus a seeded random offset when
sampling), with eos as its 12th token unless ``ignore_eos``.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import threading
from collections.abc import AsyncIterator, Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any

import httpx
import openai
import pytest
from fastapi import APIRouter, FastAPI
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from moe_worker.asgi import RunningServer, start_server
from moe_worker.serving.api import (
    MAX_BODY_BYTES,
    build_app,
    chat_prompt_ids,
    render_plain_chat,
    resolve_max_tokens,
    retry_after_seconds,
)
from moe_worker.serving.backend import BackendBusy, FinishReason, SamplingParams, TokenOutput
from moe_worker.serving.detokenize import (
    IncrementalDetokenizer,
    OutputText,
    StopStringMatcher,
    TokenDecoder,
    find_stop,
    stop_prefix_length,
)
from moe_worker.serving.protocol import RequestError

BOS, EOS = "<|bos|>", "<|eos|>"
PADDING = 6
MODEL = "toy-moe"
MAX_MODEL_LEN = 256
EOS_AT = 11  # the index of the toy function's eos
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
SAY, END = list(b"say:"), ord(";")


# ---------------------------------------------------------------------------------------------
# The tokenizer and the toy backend


def byte_chars() -> dict[int, str]:
    """Byte -> the printable character byte-level BPE writes for it."""
    printable = {*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    chars, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + shifted)
            shifted += 1
    return chars


def byte_tokenizer(chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """256 byte tokens (id = byte), then <|bos|> = 256 and <|eos|> = 257."""
    vocab = {char: byte for byte, char in byte_chars().items()}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([BOS, EOS])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=BOS, eos_token=EOS)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


TOKENIZER = byte_tokenizer()
TEMPLATED = byte_tokenizer(CHAT_TEMPLATE)
EOS_ID = TOKENIZER.eos_token_id
VOCAB = len(TOKENIZER) + PADDING
PAD_ID = len(TOKENIZER) + 2


def test_the_test_tokenizer_is_byte_level() -> None:
    assert set(byte_chars().values()) == set(pre_tokenizers.ByteLevel.alphabet())
    assert TOKENIZER.encode("héllo") == list("héllo".encode())
    assert (TOKENIZER.bos_token_id, EOS_ID, len(TOKENIZER)) == (256, 257, 258)


def script_of(prompt: list[int]) -> list[int] | None:
    """What follows the last ``say:`` of the prompt, up to ``;``; None without one."""
    for start in range(len(prompt) - len(SAY), -1, -1):
        if prompt[start : start + len(SAY)] == SAY:
            rest = prompt[start + len(SAY) :]
            return rest[: rest.index(END)] if END in rest else rest
    return None


def toy_outputs(prompt: list[int], params: SamplingParams) -> Iterator[TokenOutput]:
    """The toy model's tokens for ``prompt`` (see the module's docstring)."""
    script = script_of(prompt)
    history = list(prompt)
    rng = random.Random(params.seed)
    for index in range(params.max_new_tokens):
        if script is not None and index < len(script):
            token = script[index]
        elif script is not None and index == len(script) and not params.ignore_eos:
            token = EOS_ID
        elif script is None and index == EOS_AT and not params.ignore_eos:
            token = EOS_ID
        else:
            token = (sum(history[-4:]) * 31 + 7) % VOCAB
            if params.temperature > 0:
                token = (token + rng.randrange(VOCAB)) % VOCAB
        history.append(token)
        stops = (token == EOS_ID and not params.ignore_eos) or token in params.stop_token_ids
        last = index == params.max_new_tokens - 1
        finish: FinishReason | None = "stop" if stops else "length" if last else None
        yield TokenOutput(token, finish)
        if finish is not None:
            return


class ToyBackend:
    """A ``ServingBackend`` of ``toy_outputs``; records requests and early closes."""

    model_name = MODEL

    def __init__(self, tokenizer: Any = TOKENIZER, max_model_len: int = MAX_MODEL_LEN) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.vocab_size = VOCAB
        self.is_ready = True
        self.busy: BackendBusy | None = None
        self.hang_after: int | None = None  # tokens given before waiting until closed
        self.hanging = threading.Event()
        self.aborted = threading.Event()  # closed before its last token was taken
        self.requests: list[tuple[str, list[int], SamplingParams]] = []

    def ready(self) -> bool:
        return self.is_ready

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[TokenOutput]:
        self.requests.append((request_id, list(prompt_token_ids), params))
        if self.busy is not None:
            raise self.busy
        finished = False
        try:
            for index, output in enumerate(toy_outputs(prompt_token_ids, params)):
                if self.hang_after is not None and index >= self.hang_after:
                    self.hanging.set()
                    await asyncio.Event().wait()  # until the API closes the iterator
                finished = output.finish_reason is not None
                yield output
                await asyncio.sleep(0)
        finally:
            if not finished:
                self.aborted.set()


def expected(prompt: list[int], **params: Any) -> list[int]:
    """The toy model's token ids."""
    return [o.token_id for o in toy_outputs(prompt, SamplingParams(**params))]


def text_of(token_ids: list[int]) -> str:
    """The reference decode (padding ids dropped, special tokens skipped)."""
    known = [t for t in token_ids if t < len(TOKENIZER)]
    return str(TOKENIZER.decode(known, skip_special_tokens=True))


@pytest.fixture
def backend() -> ToyBackend:
    return ToyBackend()


@pytest.fixture
def client(backend: ToyBackend) -> Iterator[TestClient]:
    with TestClient(build_app(backend)) as test_client:
        yield test_client


def events(client: TestClient, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The JSON payloads of a streamed response (checks the SSE framing and [DONE])."""
    with client.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    blocks = raw.split("\n\n")
    assert blocks[-2:] == ["data: [DONE]", ""], raw
    payloads = []
    for block in blocks[:-2]:
        assert block.startswith("data: "), block
        payloads.append(json.loads(block.removeprefix("data: ")))
    return payloads


def streamed_text(chunks: list[dict[str, Any]], chat: bool = False) -> str:
    key = "delta" if chat else None
    parts = []
    for chunk in chunks:
        for choice in chunk["choices"]:
            parts.append(choice[key].get("content", "") if key else choice["text"])
    return "".join(parts)


def finish_of(chunks: list[dict[str, Any]]) -> list[str]:
    return [c["finish_reason"] for ch in chunks for c in ch["choices"] if c["finish_reason"]]


def ids_of(text: str) -> list[int]:
    return list(text.encode())


# ---------------------------------------------------------------------------------------------
# Models, health, plain routes


def test_models_lists_the_one_model(client: TestClient) -> None:
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    [card] = body["data"]
    assert card["id"] == MODEL and card["object"] == "model"
    assert card["max_model_len"] == MAX_MODEL_LEN
    assert isinstance(card["created"], int) and card["owned_by"]


def test_health_follows_readiness(backend: ToyBackend, client: TestClient) -> None:
    assert client.get("/health").status_code == 200
    backend.is_ready = False
    assert client.get("/health").status_code == 503


def test_unknown_route_answers_an_openai_error(client: TestClient) -> None:
    response = client.post("/v1/embeddings", json={})
    assert response.status_code == 404
    assert "no route POST /v1/embeddings" in response.json()["error"]["message"]
    assert client.get(COMPLETIONS).status_code == 405


class ExtraBody(BaseModel):
    """The body of the extra route in ``test_extra_routes_are_served``."""

    x: int


def test_extra_routes_are_served(backend: ToyBackend) -> None:
    router = APIRouter()

    @router.post("/extra")
    async def extra(body: ExtraBody) -> dict[str, int]:
        return {"x": body.x}

    def metrics(request: Request) -> PlainTextResponse:
        return PlainTextResponse("up 1\n")

    with TestClient(build_app(backend, extra_routes=router)) as client:
        assert client.post("/extra", json={"x": 3}).json() == {"x": 3}
        refused = client.post("/extra", json={"x": "three"})  # FastAPI would say 422
        assert refused.status_code == 400
        assert refused.json()["error"]["param"] == "x"
        assert client.get("/v1/models").status_code == 200
    with TestClient(build_app(backend, extra_routes=[Route("/metrics", metrics)])) as client:
        assert client.get("/metrics").text == "up 1\n"


# ---------------------------------------------------------------------------------------------
# Refusals

LONG = [65] * MAX_MODEL_LEN
BAD_REQUESTS: list[tuple[str, dict[str, Any], str | None, str]] = [
    # prompts
    (COMPLETIONS, {"prompt": ""}, "prompt", "must not be empty"),
    (COMPLETIONS, {"prompt": []}, "prompt", "must not be empty"),
    (COMPLETIONS, {"prompt": [""]}, "prompt", "must not be empty"),
    (COMPLETIONS, {"prompt": [[]]}, "prompt", "must not be empty"),
    (COMPLETIONS, {"prompt": ["a", "b"]}, "prompt", "only one prompt per request"),
    (COMPLETIONS, {"prompt": [[1], [2]]}, "prompt", "only one prompt per request"),
    (COMPLETIONS, {"prompt": 5}, "prompt", "a string, a list of token ids"),
    (COMPLETIONS, {"prompt": [1, "a"]}, "prompt", "a string, a list of token ids"),
    (COMPLETIONS, {"prompt": [1, True]}, "prompt", "a string, a list of token ids"),
    (COMPLETIONS, {}, "prompt", "field required"),
    (COMPLETIONS, {"prompt": [VOCAB]}, "prompt", f"0..{VOCAB - 1}"),
    (COMPLETIONS, {"prompt": [-1]}, "prompt", f"0..{VOCAB - 1}"),
    (COMPLETIONS, {"prompt": LONG}, "prompt", f"maximum context length is {MAX_MODEL_LEN}"),
    (COMPLETIONS, {"prompt": LONG + [65], "max_tokens": 1}, "prompt", "maximum context"),
    # lengths and sampling
    (COMPLETIONS, {"prompt": "hi", "max_tokens": 0}, "max_tokens", "at least 1"),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": -3}, "max_tokens", "at least 1"),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": 255}, "max_tokens", "maximum context length"),
    (COMPLETIONS, {"prompt": "hi", "temperature": -0.1}, "temperature", "between 0 and 2"),
    (COMPLETIONS, {"prompt": "hi", "temperature": 2.5}, "temperature", "between 0 and 2"),
    (COMPLETIONS, {"prompt": "hi", "top_p": 0}, "top_p", "(0, 1]"),
    (COMPLETIONS, {"prompt": "hi", "top_p": 1.01}, "top_p", "(0, 1]"),
    (COMPLETIONS, {"prompt": "hi", "seed": 2**70}, "seed", "64-bit"),
    (COMPLETIONS, {"prompt": "hi", "n": 2}, "n", "n must be 1"),
    (COMPLETIONS, {"prompt": "hi", "logprobs": 1}, "logprobs", "not supported"),
    (COMPLETIONS, {"prompt": "hi", "logprobs": True}, "logprobs", "not supported"),
    (COMPLETIONS, {"prompt": "hi", "stop": 3}, "stop", "a string or a list of strings"),
    (COMPLETIONS, {"prompt": "hi", "stop": ["a"] * 5}, "stop", "at most 4"),
    (COMPLETIONS, {"prompt": "hi", "stop": [""]}, "stop", "must not be empty"),
    (COMPLETIONS, {"prompt": "hi", "stop_token_ids": [VOCAB]}, "stop_token_ids", "0.."),
    (COMPLETIONS, {"prompt": "hi", "model": "gpt-4"}, "model", "does not exist"),
    # wrong types (never coerced)
    (COMPLETIONS, {"prompt": "hi", "model": 3}, "model", "valid string"),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": "10"}, "max_tokens", "valid integer"),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": 5.0}, "max_tokens", "valid integer"),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": True}, "max_tokens", "valid integer"),
    (COMPLETIONS, {"prompt": "hi", "temperature": "hot"}, "temperature", "valid number"),
    (COMPLETIONS, {"prompt": "hi", "top_p": [1]}, "top_p", "valid number"),
    (COMPLETIONS, {"prompt": "hi", "seed": "1"}, "seed", "valid integer"),
    (COMPLETIONS, {"prompt": "hi", "stream": "yes"}, "stream", "valid boolean"),
    (COMPLETIONS, {"prompt": "hi", "ignore_eos": 1}, "ignore_eos", "valid boolean"),
    (COMPLETIONS, {"prompt": "hi", "echo": "no"}, "echo", "valid boolean"),
    (COMPLETIONS, {"prompt": "hi", "return_token_ids": 1}, "return_token_ids", "valid boolean"),
    (
        COMPLETIONS,
        {"prompt": "hi", "stream": True, "stream_options": {"include_usage": "yes"}},
        "stream_options.include_usage",
        "valid boolean",
    ),
    (COMPLETIONS, {"prompt": "hi", "stream_options": 1}, "stream_options", "valid dictionary"),
    (
        COMPLETIONS,
        {"prompt": "hi", "stream_options": {"include_usage": True}},
        "stream_options",
        "only allowed when stream is true",
    ),
    # chat
    (CHAT, {"messages": []}, "messages", "must not be empty"),
    (CHAT, {}, "messages", "field required"),
    (CHAT, {"messages": "hi"}, "messages", "valid list"),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}, "messages.[0].content", "string"),
    (
        CHAT,
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        "messages.[0].content",
        "only text content",
    ),
    (CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, "messages.[0].role", "one of"),
    (CHAT, {"messages": [{"content": "x"}]}, "messages.[0].role", "field required"),
    (CHAT, {"messages": [{"role": "user", "content": "x" * 300}]}, "messages", "maximum context"),
    (
        CHAT,
        {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0},
        "max_completion_tokens",
        "at least 1",
    ),
    (
        CHAT,
        {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 250},
        "max_completion_tokens",
        "maximum context length",
    ),
    (
        CHAT,
        {"messages": [{"role": "user", "content": "x"}], "max_tokens": 250},
        "max_tokens",
        "maximum context length",
    ),
    (CHAT, {"messages": [{"role": "user", "content": "x"}], "logprobs": True}, "logprobs", "not"),
    (
        CHAT,
        {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
        "top_logprobs",
        "not supported",
    ),
    (
        CHAT,
        {"messages": [{"role": "user", "content": "x"}], "temperature": 3},
        "temperature",
        "between 0 and 2",
    ),
    (CHAT, {"messages": [{"role": "user", "content": "x"}], "model": "m"}, "model", "not exist"),
]


@pytest.mark.parametrize(
    "path,body,param,words",
    BAD_REQUESTS,
    ids=[f"{p.rsplit('/', 1)[1]}-{param}-{i}" for i, (p, _, param, _) in enumerate(BAD_REQUESTS)],
)
def test_bad_requests_answer_400_naming_the_field(
    backend: ToyBackend, client: TestClient, path: str, body: dict, param: str, words: str
) -> None:
    response = client.post(path, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] is None
    assert error["param"] == param, error
    assert words.lower() in error["message"].lower(), error
    assert not backend.requests  # refused before the backend saw it


@pytest.mark.parametrize(
    "raw,words",
    [
        (b"{", "not valid JSON"),
        (b"", "not valid JSON"),
        (b'{"prompt": "hi", "temperature": NaN}', "NaN is not valid JSON"),
        (b"\xff\xfe{}", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object, got an array"),
        (b'"hi"', "must be a JSON object, got a string"),
        (b"null", "must be a JSON object, got null"),
        (b"[" * 100_000, "not valid JSON"),
    ],
)
@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
def test_bodies_that_are_not_json_objects(
    client: TestClient, path: str, raw: bytes, words: str
) -> None:
    response = client.post(path, content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] is None and words in error["message"]


def test_body_over_1_mib_by_content_length(client: TestClient) -> None:
    body = json.dumps({"prompt": "x" * MAX_BODY_BYTES}).encode()
    response = client.post(COMPLETIONS, content=body)
    assert response.status_code == 400
    assert "1 MiB" in response.json()["error"]["message"]


def test_body_over_1_mib_without_content_length(client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(17):
            yield b"x" * 65536
        yield b'"}'

    response = client.post(COMPLETIONS, content=chunks())
    assert response.status_code == 400
    assert "1 MiB" in response.json()["error"]["message"]


async def test_body_limit_stops_reading_past_the_limit() -> None:
    """A body that never ends is refused once past 1 MiB, reading no further."""
    app = build_app(ToyBackend())
    chunk = b" " * 4096
    handed_over = 0
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal handed_over
        handed_over += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": COMPLETIONS,
        "raw_path": COMPLETIONS.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1234),
        "server": ("127.0.0.1", 80),
    }
    await app(scope, receive, send)
    assert sent[0]["status"] == 400
    assert MAX_BODY_BYTES < handed_over <= MAX_BODY_BYTES + len(chunk)


def test_pure_checks_name_the_rule() -> None:
    assert resolve_max_tokens(None, 10, 256) == 246
    assert resolve_max_tokens(246, 10, 256) == 246
    with pytest.raises(RequestError, match="maximum context length is 256") as refused:
        resolve_max_tokens(247, 10, 256, field="max_completion_tokens", prompt_field="messages")
    assert refused.value.param == "max_completion_tokens"
    assert retry_after_seconds(BackendBusy("x", 2.2)) == 3
    assert retry_after_seconds(BackendBusy("x", 0.0)) == 1
    assert retry_after_seconds(BackendBusy("x", float("nan"))) == 1


# ---------------------------------------------------------------------------------------------
# Busy backend


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
@pytest.mark.parametrize("retry_after,header", [(2.5, "3"), (0.01, "1")])
def test_busy_backend_answers_503_with_retry_after(
    backend: ToyBackend,
    client: TestClient,
    path: str,
    stream: bool,
    retry_after: float,
    header: str,
) -> None:
    backend.busy = BackendBusy("queue full", retry_after)
    body: dict[str, Any] = {"stream": stream}
    if path == CHAT:
        body["messages"] = [{"role": "user", "content": "say:hi;"}]
    else:
        body["prompt"] = "say:hi;"
    response = client.post(path, json=body)
    assert response.status_code == 503
    assert response.headers["retry-after"] == header
    error = response.json()["error"]
    assert error["type"] == "service_unavailable_error"
    assert "queue full" in error["message"]


# ---------------------------------------------------------------------------------------------
# Generation


def test_greedy_completion_follows_the_model(backend: ToyBackend, client: TestClient) -> None:
    prompt = [5, 6, 7]
    body = client.post(
        COMPLETIONS, json={"prompt": prompt, "temperature": 0, "return_token_ids": True}
    ).json()
    want = expected(prompt, max_new_tokens=MAX_MODEL_LEN - 3, temperature=0.0)
    assert len(want) == EOS_AT + 1 and want[-1] == EOS_ID
    [choice] = body["choices"]
    assert choice["token_ids"] == want
    assert choice["text"] == text_of(want)
    assert choice["finish_reason"] == "stop" and choice["index"] == 0
    assert body["prompt_token_ids"] == prompt
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 12, "total_tokens": 15}
    assert body["object"] == "text_completion" and body["model"] == MODEL
    assert body["id"].startswith("cmpl-") and isinstance(body["created"], int)
    # default max_tokens fills the context; a missing temperature is 1.0
    [(_, _, params)] = backend.requests
    assert params.max_new_tokens == MAX_MODEL_LEN - 3 and params.temperature == 0.0


def test_seeded_sampling_is_reproducible(backend: ToyBackend, client: TestClient) -> None:
    def run(**fields: Any) -> list[int]:
        body = {"prompt": "abc", "max_tokens": 8, "return_token_ids": True, **fields}
        return list(client.post(COMPLETIONS, json=body).json()["choices"][0]["token_ids"])

    greedy = run(temperature=0, seed=1)
    assert greedy == run(temperature=0, seed=2)
    seeded = run(temperature=0.8, seed=1)
    assert seeded == run(temperature=0.8, seed=1)
    assert seeded != run(temperature=0.8, seed=2) and seeded != greedy
    assert backend.requests[-1][2].seed == 2 and backend.requests[-1][2].temperature == 0.8


@pytest.mark.parametrize("seed", [0, 1, 7, 42])
@pytest.mark.parametrize("chat", [False, True])
def test_streamed_and_not_streamed_agree(client: TestClient, seed: int, chat: bool) -> None:
    """Random bytes (broken UTF-8, specials, padding) give the same text both ways."""
    body: dict[str, Any] = {
        "seed": seed,
        "temperature": 1.0,
        "max_tokens": 60,
        "ignore_eos": True,
        "return_token_ids": True,
    }
    if chat:
        path, body["messages"] = CHAT, [{"role": "user", "content": f"random {seed}"}]
    else:
        path, body["prompt"] = COMPLETIONS, f"random {seed}"
    whole = client.post(path, json=body).json()
    chunks = events(client, path, body)
    [choice] = whole["choices"]
    text = choice["message"]["content"] if chat else choice["text"]
    assert streamed_text(chunks, chat) == text == text_of(choice["token_ids"])
    assert [t for ch in chunks for c in ch["choices"] for t in c["token_ids"]] == choice[
        "token_ids"
    ]
    assert len(choice["token_ids"]) == 60
    assert finish_of(chunks) == [choice["finish_reason"]] == ["length"]
    assert whole["usage"]["completion_tokens"] == 60


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
def test_include_usage_adds_a_last_usage_chunk(client: TestClient, path: str) -> None:
    body: dict[str, Any] = {"stream_options": {"include_usage": True}}
    if path == CHAT:
        body["messages"] = [{"role": "user", "content": "say:ok;"}]
    else:
        body["prompt"] = "say:ok;"
    chunks = events(client, path, body)
    *others, last = chunks
    assert last["choices"] == []
    prompt_tokens = last["usage"]["prompt_tokens"]
    assert last["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 3,  # "o", "k", eos
        "total_tokens": prompt_tokens + 3,
    }
    assert all(chunk["usage"] is None and chunk["choices"] for chunk in others)
    prompt_ids = ids_of(
        body["prompt"] if path == COMPLETIONS else render_plain_chat(body["messages"])
    )
    assert prompt_tokens == len(prompt_ids)
    # without include_usage: no usage anywhere
    plain = events(client, path, {k: v for k, v in body.items() if k != "stream_options"})
    assert all("usage" not in chunk for chunk in plain)


def test_return_token_ids_completions(client: TestClient) -> None:
    prompt = "say:hé;"
    body = client.post(COMPLETIONS, json={"prompt": prompt, "return_token_ids": True}).json()
    assert body["prompt_token_ids"] == ids_of(prompt)
    assert body["choices"][0]["token_ids"] == ids_of("hé") + [EOS_ID]
    chunks = events(client, COMPLETIONS, {"prompt": prompt, "return_token_ids": True})
    assert chunks[0]["prompt_token_ids"] == ids_of(prompt)
    assert all("prompt_token_ids" not in chunk for chunk in chunks[1:])
    assert [c["choices"][0]["token_ids"] for c in chunks] == [[104], [195], [169], [EOS_ID]]
    assert [c["choices"][0]["text"] for c in chunks] == ["h", "", "é", ""]
    # not asked: no ids
    plain = client.post(COMPLETIONS, json={"prompt": prompt}).json()
    assert "prompt_token_ids" not in plain and "token_ids" not in plain["choices"][0]


def test_return_token_ids_chat(client: TestClient) -> None:
    messages = [{"role": "user", "content": "say:ok;"}]
    prompt_ids = ids_of(render_plain_chat(messages))
    body = client.post(CHAT, json={"messages": messages, "return_token_ids": True}).json()
    assert body["prompt_token_ids"] == prompt_ids
    assert body["choices"][0]["token_ids"] == ids_of("ok") + [EOS_ID]
    chunks = events(client, CHAT, {"messages": messages, "return_token_ids": True})
    first, *rest = chunks
    assert first["prompt_token_ids"] == prompt_ids
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert first["choices"][0]["token_ids"] == []
    assert [c["choices"][0]["token_ids"] for c in rest] == [[111], [107], [EOS_ID]]
    assert all("prompt_token_ids" not in chunk for chunk in rest)


def test_chat_response_shape(client: TestClient) -> None:
    parts = [{"type": "text", "text": "say:good"}, {"type": "text", "text": "bye;"}]
    body = client.post(CHAT, json={"messages": [{"role": "user", "content": parts}]}).json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    [choice] = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": "good\nbye"}  # parts joined
    assert choice["finish_reason"] == "stop"
    chunks = events(client, CHAT, {"messages": [{"role": "user", "content": "say:yo;"}]})
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:])
    assert streamed_text(chunks, chat=True) == "yo"
    assert finish_of(chunks) == ["stop"]


def test_echo_prepends_the_prompt(client: TestClient) -> None:
    body = client.post(COMPLETIONS, json={"prompt": "say:hi;", "echo": True}).json()
    assert body["choices"][0]["text"] == "say:hi;hi"
    chunks = events(client, COMPLETIONS, {"prompt": ids_of("say:hi;"), "echo": True})
    assert streamed_text(chunks) == "say:hi;hi"


class FailingBackend(ToyBackend):
    """Fails after its first two tokens."""

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[TokenOutput]:
        yield TokenOutput(104)
        yield TokenOutput(105)
        raise RuntimeError("rank lost")


def test_a_backend_failure_is_reported() -> None:
    with TestClient(build_app(FailingBackend()), raise_server_exceptions=False) as client:
        response = client.post(COMPLETIONS, json={"prompt": "x"})
        assert response.status_code == 500
        assert response.json()["error"]["type"] == "server_error"
        chunks = events(client, COMPLETIONS, {"prompt": "x"})
    assert [c["choices"][0]["text"] for c in chunks[:2]] == ["h", "i"]
    assert "rank lost" in chunks[2]["error"]["message"]  # then [DONE]


# ---------------------------------------------------------------------------------------------
# Stop strings


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
def test_stop_string_across_tokens_cuts_and_aborts(
    backend: ToyBackend, client: TestClient, stream: bool, path: str
) -> None:
    body: dict[str, Any] = {"stop": ["xyz", "lo w"], "return_token_ids": True}
    if path == CHAT:
        body["messages"] = [{"role": "user", "content": "say:hello world;"}]
    else:
        body["prompt"] = "say:hello world;"
    if stream:
        chunks = events(client, path, body)
        text, finish = streamed_text(chunks, path == CHAT), finish_of(chunks)
        token_ids = [t for ch in chunks for c in ch["choices"] for t in c["token_ids"]]
    else:
        whole = client.post(path, json=body).json()
        choice = whole["choices"][0]
        text = choice["message"]["content"] if path == CHAT else choice["text"]
        finish, token_ids = [choice["finish_reason"]], choice["token_ids"]
        assert whole["usage"]["completion_tokens"] == len("hello w")
    assert text == "hel"
    assert finish == ["stop"]
    assert token_ids == ids_of("hello w")  # generation ended at the token completing the stop
    assert backend.aborted.wait(5), "the backend's iterator was not closed"


def test_stop_prefix_that_never_completes_is_released(
    backend: ToyBackend, client: TestClient
) -> None:
    chunks = events(client, COMPLETIONS, {"prompt": "say:hello world;", "stop": ["lo x", "d!"]})
    assert streamed_text(chunks) == "hello world"
    texts = [c["choices"][0]["text"] for c in chunks]
    assert texts == ["h", "e", "l", "lo w", "o", "r", "l", "d"]  # "l", "lo", "d" were held
    assert finish_of(chunks) == ["stop"]
    assert not backend.aborted.is_set()


def test_stop_string_matcher_holds_only_possible_starts() -> None:
    assert stop_prefix_length("abcab", ["abd"]) == 2
    assert stop_prefix_length("abc", ["xyz"]) == 0
    assert stop_prefix_length("aaa", ["aaab"]) == 3
    assert stop_prefix_length("ab", ["abc", "b!"]) == 2
    assert find_stop("one two three", ["three", "two"]) == 4
    matcher = StopStringMatcher(["END"])
    assert [matcher.push(d) for d in ["abE", "N", "x", "E", "ND", "more"]] == [
        "ab",
        "",
        "ENx",
        "",
        "",
        "",
    ]
    assert matcher.stopped and matcher.flush() == ""
    held = StopStringMatcher(["END"])
    assert held.push("tail E") == "tail " and held.flush() == "E"
    with pytest.raises(ValueError):
        StopStringMatcher([""])


# ---------------------------------------------------------------------------------------------
# Chat templates


def test_chat_template_when_the_tokenizer_has_one() -> None:
    backend = ToyBackend(TEMPLATED)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "say:hi;"}]
    rendered = "<system>be brief\n<user>say:hi;\n<assistant>"
    want = [TEMPLATED.bos_token_id] + ids_of(rendered)
    assert chat_prompt_ids(TEMPLATED, messages) == want
    with TestClient(build_app(backend)) as client:
        body = client.post(CHAT, json={"messages": messages, "return_token_ids": True}).json()
    assert body["prompt_token_ids"] == want
    assert body["choices"][0]["message"]["content"] == "hi"


def test_plain_template_without_one(backend: ToyBackend, client: TestClient) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "say:hi;"}]
    rendered = "system: be brief\nuser: say:hi;\nassistant: "
    assert render_plain_chat(messages) == rendered
    assert chat_prompt_ids(TOKENIZER, messages) == ids_of(rendered)
    body = client.post(CHAT, json={"messages": messages}).json()
    assert backend.requests[0][1] == ids_of(rendered)
    assert body["choices"][0]["message"]["content"] == "hi"


def test_chat_template_errors_are_400() -> None:
    strict = byte_tokenizer("{{ raise_exception('roles must alternate') }}")
    with TestClient(build_app(ToyBackend(strict))) as client:
        response = client.post(CHAT, json={"messages": [{"role": "user", "content": "x"}]})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "messages" and "roles must alternate" in error["message"]


# ---------------------------------------------------------------------------------------------
# Detokenization


def test_multibyte_text_streams_whole_characters(client: TestClient) -> None:
    text = "héllo 🙂!"
    chunks = events(client, COMPLETIONS, {"prompt": f"say:{text};"})
    deltas = [c["choices"][0]["text"] for c in chunks]
    assert "".join(deltas) == text
    assert deltas == ["h", "é", "l", "l", "o", " ", "🙂", "!", ""]
    assert all("\ufffd" not in d for d in deltas)
    chat = events(client, CHAT, {"messages": [{"role": "user", "content": f"say:{text};"}]})
    assert streamed_text(chat, chat=True) == text


def test_incremental_detokenizer_holds_partial_characters() -> None:
    detokenizer = IncrementalDetokenizer(TokenDecoder(TOKENIZER))
    pushed = [detokenizer.push(t) for t in ids_of("é🙂a")]
    assert pushed == ["", "é", "", "", "", "🙂", "a"]
    unfinished = IncrementalDetokenizer(TokenDecoder(TOKENIZER))
    assert [unfinished.push(t) for t in ids_of("a🙂")[:3]] == ["a", "", ""]
    assert unfinished.flush() == "\ufffd"  # what a full decode gives too
    assert unfinished.flush() == ""


def test_prompt_context_is_not_emitted() -> None:
    prompt = ids_of("prompt é")
    output = OutputText(TokenDecoder(TOKENIZER), (), prompt)
    assert [output.push(t) for t in ids_of("ok")] == ["o", "k"]
    cut = ids_of("x🙂")[:-1]  # a prompt ending inside a character: that tail is dropped
    assert IncrementalDetokenizer(TokenDecoder(TOKENIZER), cut).push(ord("a")) == "a"


def test_padding_and_unknown_ids_decode_to_nothing(client: TestClient) -> None:
    decoder = TokenDecoder(TOKENIZER)
    assert decoder.decode([PAD_ID, VOCAB - 1, -1, 10**30]) == ""
    assert decoder.decode([104, PAD_ID, 105, EOS_ID]) == "hi"
    assert TokenDecoder(TOKENIZER, skip_special_tokens=False).decode([EOS_ID, PAD_ID]) == EOS
    detokenizer = IncrementalDetokenizer(decoder)
    assert [detokenizer.push(t) for t in [PAD_ID, 104, PAD_ID, 195, PAD_ID, 169]] == [
        "",
        "h",
        "",
        "",
        "",
        "é",
    ]
    # through the API: a scripted padding id among the generated tokens
    prompt = SAY + [PAD_ID] + ids_of("ok") + [PAD_ID, END]
    body = client.post(COMPLETIONS, json={"prompt": prompt, "return_token_ids": True}).json()
    choice = body["choices"][0]
    assert choice["text"] == "ok"
    assert choice["token_ids"] == [PAD_ID, 111, 107, PAD_ID, EOS_ID]
    chunks = events(client, COMPLETIONS, {"prompt": prompt})
    assert streamed_text(chunks) == "ok"


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=VOCAB - 1), max_size=40), st.data())
def test_incremental_text_equals_the_full_decode(ids: list[int], data: st.DataObject) -> None:
    """Any ids (broken UTF-8, specials, padding): deltas add up to the full decode, and no
    delta but the last ends inside a character."""
    context = data.draw(st.lists(st.integers(min_value=0, max_value=VOCAB - 1), max_size=6))
    detokenizer = IncrementalDetokenizer(TokenDecoder(TOKENIZER), context)
    deltas = [detokenizer.push(t) for t in ids]
    assert not any(d.endswith("\ufffd") for d in deltas)
    assert "".join(deltas) + detokenizer.flush() == text_of(ids)


# ---------------------------------------------------------------------------------------------
# Real server: disconnects and the official client


@contextmanager
def served(app: FastAPI) -> Iterator[RunningServer]:
    server = start_server(app, 0, "127.0.0.1", name="openai-test")
    try:
        yield server
    finally:
        server.shutdown()


def raw_post(port: int, path: str, body: dict[str, Any]) -> socket.socket:
    """A socket that sent a POST (so the test can drop it at will)."""
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    )
    sock.sendall(head.encode() + payload)
    return sock


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
def test_disconnect_mid_stream_aborts(path: str) -> None:
    backend = ToyBackend()
    backend.hang_after = 2
    body: dict[str, Any] = {"stream": True}
    if path == CHAT:
        body["messages"] = [{"role": "user", "content": "say:abcdef;"}]
    else:
        body["prompt"] = "say:abcdef;"
    with served(build_app(backend)) as server:
        sock = raw_post(server.port, path, body)
        received = b""
        while b"data: " not in received:
            data = sock.recv(65536)
            assert data, "the server closed the stream"
            received += data
        assert b" 200 " in received.split(b"\r\n", 1)[0]
        assert backend.hanging.wait(5)
        assert not backend.aborted.is_set()
        sock.close()
        assert backend.aborted.wait(5), "a disconnect did not close the backend's iterator"


def test_disconnect_while_waiting_aborts_a_non_streamed_request() -> None:
    backend = ToyBackend()
    backend.hang_after = 1
    with served(build_app(backend)) as server:
        sock = raw_post(server.port, COMPLETIONS, {"prompt": "say:abcdef;"})
        assert backend.hanging.wait(5)
        sock.close()
        assert backend.aborted.wait(5), "a disconnect did not close the backend's iterator"


def test_disconnect_before_the_first_token_aborts() -> None:
    backend = ToyBackend()
    backend.hang_after = 0
    with served(build_app(backend)) as server:
        sock = raw_post(server.port, COMPLETIONS, {"prompt": "say:abc;", "stream": True})
        assert backend.hanging.wait(5)
        sock.close()
        assert backend.aborted.wait(5)


def test_official_openai_client() -> None:
    backend = ToyBackend()
    with served(build_app(backend)) as server:
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{server.port}/v1", api_key="x", max_retries=0
        )
        assert [m.id for m in client.models.list()] == [MODEL]

        completion = client.completions.create(
            model=MODEL,
            prompt="say:hi there;",
            max_tokens=20,
            extra_body={"return_token_ids": True},
        )
        choice = completion.choices[0]
        assert (choice.text, choice.finish_reason) == ("hi there", "stop")
        assert completion.usage is not None and completion.usage.completion_tokens == 9
        assert getattr(choice, "token_ids") == ids_of("hi there") + [EOS_ID]  # noqa: B009

        stream = client.completions.create(
            model=MODEL,
            prompt="say:héllo 🙂;",
            max_tokens=20,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        assert "".join(c.choices[0].text for c in chunks if c.choices) == "héllo 🙂"
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12

        chat = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "say:hello;"}], max_tokens=10
        )
        assert chat.choices[0].message.content == "hello"
        assert chat.choices[0].finish_reason == "stop"

        chat_stream = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "say:stream me;"}],
            stream=True,
            stop=["me"],
        )
        deltas = [c.choices[0].delta for c in chat_stream if c.choices]
        assert deltas[0].role == "assistant"
        assert "".join(d.content or "" for d in deltas) == "stream "

        with pytest.raises(openai.BadRequestError) as refused:
            client.completions.create(model=MODEL, prompt="hi", max_tokens=1000)
        assert refused.value.param == "max_tokens"  # type: ignore[attr-defined]
        backend.busy = BackendBusy("draining", 1.0)
        with pytest.raises(openai.InternalServerError) as busy:
            client.completions.create(model=MODEL, prompt="hi", max_tokens=1)
        assert busy.value.status_code == 503
        assert busy.value.response.headers["retry-after"] == "1"


def test_httpx_stream_against_a_server() -> None:
    """Chunks arrive as tokens are made (not buffered until the end)."""
    backend = ToyBackend()
    backend.hang_after = 3
    with served(build_app(backend)) as server:
        url = f"http://127.0.0.1:{server.port}{COMPLETIONS}"
        with httpx.Client(timeout=10) as http:
            with http.stream("POST", url, json={"prompt": "say:abcdef;", "stream": True}) as r:
                lines = r.iter_lines()
                texts = []
                for line in lines:
                    if line.startswith("data: "):
                        texts.append(json.loads(line[6:])["choices"][0]["text"])
                    if len(texts) == 3:
                        break
                assert texts == ["a", "b", "c"]
                assert backend.hanging.wait(5)
        assert backend.aborted.wait(5)

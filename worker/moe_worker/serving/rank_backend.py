"""The API's backend on one rank: requests go to the ``ServingEngine`` on the step loop's
thread; tokens come back to the request's asyncio task through a queue."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable
from typing import Any

from .backend import SamplingParams, TokenOutput
from .engine import ServingEngine


class EngineBackend:
    """A ``ServingBackend`` over this rank's ``ServingEngine``."""

    def __init__(
        self, engine: ServingEngine, model_name: str, ready: Callable[[], bool] = lambda: True
    ) -> None:
        self.engine = engine
        self.model_name = model_name
        self.max_model_len = engine.max_model_len
        self.vocab_size = engine.vocab_size
        self.tokenizer: Any = engine.tokenizer
        self._ready = ready

    def ready(self) -> bool:
        return self.engine.accepting and self._ready()

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncGenerator[TokenOutput, None]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[TokenOutput | BaseException] = asyncio.Queue()

        def sink(item: TokenOutput | BaseException) -> None:  # on the step loop's thread
            loop.call_soon_threadsafe(queue.put_nowait, item)

        self.engine.submit(request_id, prompt_token_ids, params, sink)  # may raise BackendBusy
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finish_reason is not None
                yield item
        finally:
            if not finished:  # the client went away or a stop string matched
                self.engine.abort(request_id)

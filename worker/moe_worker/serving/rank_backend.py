"""The API's backend on one rank: requests go to the ``ServingEngine`` on the step loop's
thread; tokens come back to the request's asyncio task through a queue.

A step emits a token for every running request; they cross to the event loop together
(``Delivery``: one wake-up of the loop per batch, not one per token).
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import AsyncGenerator, Callable
from typing import Any

from .backend import SamplingParams, TokenOutput
from .engine import ServingEngine

Item = TokenOutput | BaseException


class Delivery:
    """Hands items from other threads to asyncio queues of one event loop: ``put`` collects,
    and the first ``put`` after a flush schedules the next flush (one ``call_soon_threadsafe``
    per batch of items, in order)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._pending: list[tuple[asyncio.Queue[Item], Item]] = []
        self._lock = threading.Lock()

    def put(self, queue: asyncio.Queue[Item], item: Item) -> None:
        with self._lock:
            self._pending.append((queue, item))
            first = len(self._pending) == 1
        if first:
            self.loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for queue, item in pending:
            queue.put_nowait(item)


_deliveries: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Delivery] = (
    weakref.WeakKeyDictionary()
)


def delivery_for(loop: asyncio.AbstractEventLoop) -> Delivery:
    """The ``Delivery`` of ``loop`` (one per loop; called on that loop's thread)."""
    found = _deliveries.get(loop)
    if found is None:
        found = _deliveries[loop] = Delivery(loop)
    return found


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
        delivery = delivery_for(asyncio.get_running_loop())
        queue: asyncio.Queue[Item] = asyncio.Queue()

        def sink(item: Item) -> None:  # on the step loop's thread
            delivery.put(queue, item)

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

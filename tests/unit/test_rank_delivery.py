"""Tokens cross from the step loop's thread to the event loop in batches (``Delivery``)."""

from __future__ import annotations

import asyncio
import threading

from moe_worker.serving.backend import TokenOutput
from moe_worker.serving.rank_backend import Item, delivery_for


def test_a_steps_tokens_reach_their_queues_in_order_with_one_wake_up() -> None:
    async def scenario() -> tuple[list[list[int]], int]:
        loop = asyncio.get_running_loop()
        delivery = delivery_for(loop)
        assert delivery_for(loop) is delivery  # one per loop
        wake_ups = 0
        schedule = loop.call_soon_threadsafe

        def counted(callback, *args):  # type: ignore[no-untyped-def]
            nonlocal wake_ups
            wake_ups += 1
            return schedule(callback, *args)

        loop.call_soon_threadsafe = counted  # type: ignore[method-assign]
        queues: list[asyncio.Queue[Item]] = [asyncio.Queue() for _ in range(3)]

        def step() -> None:  # a step emitting 5 tokens for each of 3 requests
            for token in range(5):
                for queue in queues:
                    delivery.put(queue, TokenOutput(token, None))

        thread = threading.Thread(target=step)
        thread.start()
        thread.join()  # the loop is blocked meanwhile: the whole step is one batch
        got = [[(await queue.get()).token_id for _ in range(5)] for queue in queues]  # type: ignore[union-attr]
        step()  # a second step, from this thread: one more wake-up
        again = [(await queues[0].get()).token_id for _ in range(5)]  # type: ignore[union-attr]
        assert again == list(range(5))
        return got, wake_ups

    got, wake_ups = asyncio.run(scenario())
    assert got == [list(range(5))] * 3
    assert wake_ups == 2

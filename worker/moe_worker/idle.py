"""Idle waiting of a serving group: no spinning, and every rank wakes when any gets work."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta

import torch.distributed as dist


class IdleWaker:
    """Lets idle ranks wait without spinning until work arrives on any rank.

    When the ranks agree that nobody has work, each starts idle period ``p`` (the same count on
    every rank) and waits on its event. ``notify`` (a request arrived on this rank; any thread)
    sets the event and, on a multi-rank group, the store key ``serving/wake/<p>``; a watcher
    thread on every rank blocks in the store on that key and sets its rank's event when it
    appears. A rank with work when its period starts notifies at once, so an arrival during the
    agreement is never missed. A rank leaving a period (woken or timed out to re-check control
    flags) sets the key too, releasing every watcher, so the ranks go back to the agreement
    within moments of each other.
    """

    def __init__(self, connect: Callable[[], dist.Store] | None, world: int, rank: int = 0) -> None:
        """``connect`` opens a new client of the group's store (None: a one-rank group)."""
        self.connect = connect
        self._store: dist.Store | None = None  # sets and deletes (any thread)
        self.world = world
        self.rank = rank
        self.event = threading.Event()
        self.lock = threading.Condition()
        self.period = 0
        self._watching = 0  # the period the watcher thread waits for
        self._watcher: threading.Thread | None = None

    def _key(self, period: int) -> str:
        return f"serving/wake/{period}"

    def notify(self) -> None:
        self.event.set()
        if self.connect is not None and self.world > 1:
            with self.lock:
                period = self.period
            self._release(period)

    def _setter(self) -> dist.Store:
        with self.lock:
            if self._store is None:
                assert self.connect is not None
                self._store = self.connect()
            return self._store

    def _release(self, period: int) -> None:
        try:
            self._setter().set(self._key(period), "1")
        except RuntimeError:  # the store is gone (leader died): reconnect next time
            self._store = None

    def _watch(self) -> None:
        assert self.connect is not None
        store = self.connect()  # its own connection: its waits block only itself
        handled = 0
        while True:
            with self.lock:
                while self._watching <= handled:
                    self.lock.wait()
                period = self._watching
            try:
                store.wait([self._key(period)], timedelta(hours=1))
            except RuntimeError:  # a timeout, or the store is gone: reconnect, wait again
                if self.event.wait(1.0):
                    handled = period
                try:
                    store = self.connect()
                except RuntimeError:
                    pass
                continue
            handled = period
            with self.lock:
                if self.period == period:
                    self.event.set()

    def wait(self, timeout_s: float, has_work: Callable[[], bool]) -> None:
        """Wait up to ``timeout_s`` for work on any rank (returns at once with local work)."""
        with self.lock:
            self.period += 1
            period = self.period
        self.event.clear()
        if self.connect is None or self.world == 1:
            if not has_work():
                self.event.wait(timeout_s)
            return
        if self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name="idle-waker", daemon=True)
            self._watcher.start()
        if self.rank == 0 and period > 2:  # every rank has left period - 2 behind
            try:
                self._setter().delete_key(self._key(period - 2))
            except RuntimeError:
                pass
        with self.lock:
            self._watching = period
            self.lock.notify_all()
        if not has_work():
            self.event.wait(timeout_s)
        self._release(period)

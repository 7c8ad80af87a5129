"""The communicator interface and its registry."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch


class Communicator(ABC):
    """Queues point-to-point sends and receives, then runs them all in ``execute``.

    Every rank queues its operations in the same global order, so matching pairs line up.
    """

    @abstractmethod
    def add_send(self, tensor: torch.Tensor, dst_rank: int) -> None: ...

    @abstractmethod
    def add_recv(self, tensor: torch.Tensor, src_rank: int) -> None: ...

    @abstractmethod
    def execute(self) -> None:
        """Run every queued operation and wait until all received tensors are written."""

    @property
    def stream(self) -> Any | None:
        """The CUDA stream transfers run on (None: the current stream, or CPU)."""
        return None

    def close(self, abort: bool = False) -> None:  # noqa: B027 - most hold nothing of their own
        """Release what the communicator holds itself (groups are its opener's to destroy);
        ``abort``: a peer may be gone, so wait for nothing."""


Factory = Callable[..., Communicator]
_REGISTRY: dict[str, Factory] = {}


class UnknownCommunicatorError(KeyError):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return f"unknown communicator {self.name!r}; available: {', '.join(available())}"


def register(name: str) -> Callable[[Factory], Factory]:
    def decorate(factory: Factory) -> Factory:
        _REGISTRY[name] = factory
        return factory

    return decorate


def available() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def resolve_auto(device: torch.device | str | None, use_async: bool) -> str:
    """What ``auto`` means on this platform and in this mode.

    - CPU: ``torch_gloo`` (the only backend for host tensors).
    - GPU, synchronous: ``torch_nccl``; the rebalance runs on the step loop's thread and stream
      between steps, so sharing the forward pass's NCCL communicator is safe, and it is fastest.
    - GPU, asynchronous: ``pynccl``; transfers are issued from a background thread on another
      stream while the forward pass runs its own collectives, and NCCL operations from two
      streams on one communicator can deadlock. pynccl has its own communicator and stream.
    """
    if device is None or torch.device(device).type != "cuda":
        return "torch_gloo"
    return "pynccl" if use_async else "torch_nccl"


def create_communicator(name: str, use_async: bool = False, **kwargs: Any) -> Communicator:
    """A communicator by registered name (``auto``: see ``resolve_auto``)."""
    _load_builtin()
    if name == "auto":
        name = resolve_auto(kwargs.get("device"), use_async)
    if name not in _REGISTRY:
        raise UnknownCommunicatorError(name)
    return _REGISTRY[name](**kwargs)


def _load_builtin() -> None:
    from . import pynccl, torch_p2p  # noqa: F401  (they register their names)

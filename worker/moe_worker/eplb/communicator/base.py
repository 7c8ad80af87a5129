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


def create_communicator(name: str, **kwargs: Any) -> Communicator:
    """A communicator by registered name; ``auto`` picks by platform (CPU: torch_gloo)."""
    _load_builtin()
    if name == "auto":
        device = kwargs.get("device")
        name = (
            "torch_nccl"
            if device is not None and torch.device(device).type == "cuda"
            else "torch_gloo"
        )
    if name not in _REGISTRY:
        raise UnknownCommunicatorError(name)
    return _REGISTRY[name](**kwargs)


def _load_builtin() -> None:
    from . import torch_p2p  # noqa: F401  (registers its names)

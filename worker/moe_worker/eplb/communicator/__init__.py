"""Weight-exchange backends behind one small interface, chosen by name.

``create_communicator(name, group)``; the names match ``EPLBConfig.communicator``.
"""

from __future__ import annotations

from .base import (
    Communicator,
    UnknownCommunicatorError,
    available,
    create_communicator,
    register,
    resolve_auto,
)

__all__ = [
    "Communicator",
    "UnknownCommunicatorError",
    "available",
    "create_communicator",
    "register",
    "resolve_auto",
]

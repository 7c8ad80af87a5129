"""numba's compiler when numba is installed, otherwise plain Python.

The placement kernels are written as simple per-layer loops; numba compiles them (and caches
the machine code on disk), and runs the loop over layers on all cores (``prange``). Without
numba the same code runs as ordinary Python: slower, identical in result.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, TypeVar, cast

F = TypeVar("F", bound=Callable[..., Any])

numba: Any
try:
    numba = importlib.import_module("numba")
except ImportError:  # pragma: no cover - depends on the environment
    numba = None

HAVE_NUMBA = numba is not None
prange: Callable[..., Any] = numba.prange if numba is not None else range


def njit(function: F) -> F:
    """Compile ``function`` in nopython mode with an on-disk cache, when numba is available."""
    if numba is None:  # pragma: no cover
        return function
    return cast("F", numba.njit(cache=True, nogil=True)(function))


def njit_parallel(function: F) -> F:
    """Like ``njit``, and ``prange`` loops in ``function`` run in parallel over the cores."""
    if numba is None:  # pragma: no cover
        return function
    return cast("F", numba.njit(cache=True, nogil=True, parallel=True)(function))

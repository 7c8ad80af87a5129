"""numba's compiler when numba is installed, otherwise plain Python.

The placement kernels are written as simple per-layer loops; numba compiles them (and caches
the machine code on disk), and runs the loop over layers on all cores (``prange``). Without
numba the same code runs as ordinary Python: slower, identical in result.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

try:
    import numba

    HAVE_NUMBA = True
    prange = numba.prange
except ImportError:  # pragma: no cover - depends on the environment
    numba = None
    HAVE_NUMBA = False
    prange = range


def njit(function: F) -> F:
    """Compile ``function`` in nopython mode with an on-disk cache, when numba is available."""
    if numba is None:  # pragma: no cover
        return function
    return numba.njit(cache=True, nogil=True)(function)  # type: ignore[no-any-return]


def njit_parallel(function: F) -> F:
    """Like ``njit``, and ``prange`` loops in ``function`` run in parallel over the cores."""
    if numba is None:  # pragma: no cover
        return function
    return numba.njit(cache=True, nogil=True, parallel=True)(function)  # type: ignore[no-any-return]

"""The placement kernels' two builds: numba's JIT and an ahead-of-time (AOT) module.

The kernels are written as simple per-layer loops. numba's JIT compiles them on first use
(caching the machine code on disk) and runs the loop over layers on all cores (``prange``);
compiling takes seconds, so a fresh install's first placement used to wait for it. The same
functions are also compiled ahead of time at install (``python -m moe_worker.eplb.policy.aot``,
run by ``make setup``) into ``_aot_kernels``: sequential over layers, holding the GIL, but ready
at import. A ``RowKernel`` call runs the JIT build once it is compiled in this process (after
``warm_up``), else the AOT build when it is installed and built from these very sources, else
the JIT build (compiling now). Without numba the functions run as ordinary Python: slower,
identical in result.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

F = TypeVar("F", bound=Callable[..., Any])

log = logging.getLogger(__name__)

numba: Any
try:
    numba = importlib.import_module("numba")
except ImportError:  # pragma: no cover - depends on the environment
    numba = None

HAVE_NUMBA = numba is not None
prange: Callable[..., Any] = numba.prange if numba is not None else range

AOT_MODULE = "moe_worker.eplb.policy._aot_kernels"


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


@dataclass(frozen=True)
class RowKernel:
    """A kernel over a batch of rows (layers), callable like the function it wraps.

    ``signature`` is the numba signature the AOT build exports it under (C-contiguous float64
    and int64 arrays: what the callers pass)."""

    name: str
    signature: str
    jit: Any  # the numba dispatcher (the plain function without numba)

    @property
    def python(self) -> Callable[..., Any]:
        return cast("Callable[..., Any]", getattr(self.jit, "py_func", self.jit))

    def jit_ready(self) -> bool:
        """Whether the JIT build is compiled (or loaded from numba's cache) in this process."""
        return numba is None or bool(self.jit.signatures)

    def __call__(self, *args: Any) -> Any:
        return build_for(self)(*args)


ROW_KERNELS: dict[str, RowKernel] = {}


def row_kernel(name: str, signature: str) -> Callable[[Callable[..., Any]], RowKernel]:
    """Register a ``prange`` kernel under ``name`` (its AOT export) with its AOT signature."""

    def register(function: Callable[..., Any]) -> RowKernel:
        kernel = RowKernel(name, signature, njit_parallel(function))
        ROW_KERNELS[name] = kernel
        return kernel

    return register


def source_digest() -> int:
    """A 60-bit digest of the sources of the modules holding the row kernels (and the helpers
    they call): an AOT build records it, and is used only while the sources still match."""
    digest = hashlib.sha256()
    for module in sorted({k.python.__module__ for k in ROW_KERNELS.values()}):
        digest.update(inspect.getsource(sys.modules[module]).encode())
    return int(digest.hexdigest()[:15], 16)


_aot: dict[str, Any] = {}


def aot_module() -> Any | None:
    """The AOT build, when installed and built from the current sources (else None).
    ``MOE_EPLB_AOT=off`` in the environment leaves it unused."""
    if "module" not in _aot:
        module = None
        if os.environ.get("MOE_EPLB_AOT", "on") != "off":
            try:
                module = importlib.import_module(AOT_MODULE)
            except ImportError:
                pass
        if module is not None and module.source_digest() != source_digest():
            log.warning(
                "%s was built from other sources than these; using numba's JIT (rebuild it: "
                "python -m moe_worker.eplb.policy.aot)",
                AOT_MODULE,
            )
            module = None
        _aot["module"] = module
    return _aot["module"]


def build_for(kernel: RowKernel) -> Callable[..., Any]:
    """Which build of ``kernel`` runs now: JIT if compiled, else AOT if usable, else JIT."""
    if kernel.jit_ready():
        return cast("Callable[..., Any]", kernel.jit)
    aot = aot_module()
    if aot is not None:
        return cast("Callable[..., Any]", getattr(aot, kernel.name))
    return cast("Callable[..., Any]", kernel.jit)


def aot_available() -> bool:
    return aot_module() is not None

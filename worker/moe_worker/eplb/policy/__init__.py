"""Placement policies: where every expert replica goes, chosen by name from a registry.

Call ``compute_placement(name, weight, num_physical=P, num_gpus=G, ...)``; it validates the
inputs (``PlacementInputError`` names the field and the rule) and returns a ``Placement``.

Inputs: ``weight`` [L, E] non-negative logical expert load per layer; P physical slots per layer
(P >= E, P divisible by G); ``num_groups`` expert groups (E divisible by it) and ``num_nodes``
(G divisible by it) for node-aware placement; optionally the ``previous`` placement.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from .balanced import balanced_policy
from .deepseek import deepseek_policy
from .incremental import incremental_policy
from .jit import HAVE_NUMBA, ROW_KERNELS, aot_available
from .placement import Placement
from .quality import (
    balancedness,
    balancedness_bound,
    gpu_loads,
    layer_balancedness,
    max_load_lower_bound,
    moved_copies,
    overall_balancedness,
    worst_layer_balancedness,
)
from .shares import fit_shares  # its kernels count in the AOT build's source digest

# (weight [L, E], num_physical, num_groups, num_nodes, num_gpus, previous, **options) -> Placement
PlacementPolicy = Callable[..., Placement]


POLICIES: dict[str, PlacementPolicy] = {
    "balanced": balanced_policy,
    "deepseek": deepseek_policy,
    "incremental": incremental_policy,
}


class UnknownPolicyError(KeyError):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return f"unknown placement policy {self.name!r}; available: {', '.join(sorted(POLICIES))}"


class PlacementInputError(ValueError):
    """An input to a placement policy breaks a rule; ``field`` names the input."""

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field = field
        self.rule = rule


def get_policy(name: str) -> PlacementPolicy:
    try:
        return POLICIES[name]
    except KeyError:
        raise UnknownPolicyError(name) from None


def validate_inputs(
    weight: Any,
    num_physical: int,
    num_gpus: int,
    num_groups: int = 1,
    num_nodes: int = 1,
    previous: Placement | None = None,
) -> np.ndarray:
    """Check every input against its rule; returns ``weight`` as a float64 [L, E] array."""
    try:
        array = np.asarray(weight, dtype=np.float64)
    except (TypeError, ValueError):
        raise PlacementInputError("weight", "must be a numeric [layers, experts] array") from None
    if array.ndim != 2 or array.shape[0] < 1 or array.shape[1] < 1:
        raise PlacementInputError(
            "weight", f"must be 2-D [layers, experts] with both >= 1, got shape {array.shape}"
        )
    if not np.isfinite(array).all():
        raise PlacementInputError("weight", "must be finite (no NaN or infinity)")
    if (array < 0).any():
        layer, expert = np.argwhere(array < 0)[0]
        raise PlacementInputError(
            "weight",
            f"must be non-negative; layer {layer} expert {expert} is {array[layer, expert]}",
        )
    num_layers, num_logical = array.shape
    for field, value in (
        ("num_gpus", num_gpus),
        ("num_physical", num_physical),
        ("num_groups", num_groups),
        ("num_nodes", num_nodes),
    ):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise PlacementInputError(field, f"must be a positive integer, got {value!r}")
    if num_physical < num_logical:
        raise PlacementInputError(
            "num_physical", f"must be >= the number of experts {num_logical}, got {num_physical}"
        )
    if num_physical % num_gpus:
        raise PlacementInputError(
            "num_physical", f"must be divisible by num_gpus {num_gpus}, got {num_physical}"
        )
    if num_logical % num_groups:
        raise PlacementInputError(
            "num_groups", f"must divide the number of experts {num_logical}, got {num_groups}"
        )
    if num_gpus % num_nodes:
        raise PlacementInputError("num_nodes", f"must divide num_gpus {num_gpus}, got {num_nodes}")
    if previous is not None:
        slots_per_gpu = num_physical // num_gpus
        if previous.num_layers != num_layers or previous.num_logical != num_logical:
            raise PlacementInputError(
                "previous",
                f"covers {previous.num_layers} layers x {previous.num_logical} experts, "
                f"the load {num_layers} x {num_logical}",
            )
        if previous.num_physical % slots_per_gpu or previous.num_physical < num_logical:
            raise PlacementInputError(
                "previous",
                f"has {previous.num_physical} slots per layer, not a multiple of the "
                f"{slots_per_gpu} slots per GPU",
            )
        if (previous.replica_count < 1).any():
            raise PlacementInputError("previous", "leaves some expert without a replica")
    return array


# numba's default threading layer must not be entered from two threads at once.
_compute_lock = threading.Lock()


def compute_placement(
    policy: str,
    weight: Any,
    num_physical: int,
    num_gpus: int,
    num_groups: int = 1,
    num_nodes: int = 1,
    previous: Placement | None = None,
    **options: Any,
) -> Placement:
    """Validate the inputs and run the named policy. Thread-safe."""
    function = get_policy(policy)
    array = validate_inputs(weight, num_physical, num_gpus, num_groups, num_nodes, previous)
    with _compute_lock:
        return function(array, num_physical, num_groups, num_nodes, num_gpus, previous, **options)


def warm_up() -> None:
    """Compile (or load from numba's cache) the JIT build of every placement kernel. Until it
    is done a placement runs the AOT build when installed (see ``jit``), so nobody waits."""
    if not HAVE_NUMBA:
        return
    for kernel in ROW_KERNELS.values():
        kernel.jit.compile(kernel.signature)


_warming: list[threading.Thread] = []
_warming_lock = threading.Lock()


def start_warm_up() -> threading.Thread | None:
    """Compile the JIT build in a background thread, once per process, unless the AOT build is
    installed (it serves every placement without compiling, and a compiler competing for the
    cores of a starting worker would only slow it). Returns the thread (None: nothing to do)."""
    if not HAVE_NUMBA or aot_available():
        return None
    with _warming_lock:
        if not _warming:
            thread = threading.Thread(target=warm_up, name="eplb-warm-up", daemon=True)
            thread.start()
            _warming.append(thread)
    return _warming[0]


def kernel_build() -> str:
    """How a placement would run now: ``numba-jit`` (compiled in this process), ``numba-aot``
    (the ahead-of-time build), ``compiling`` (the JIT build is compiling in the background and
    no AOT build is installed: a placement now holds the GIL while it compiles), ``numba-lazy``
    (compiles on first use) or ``python`` (no numba: slower, identical in result)."""
    if not HAVE_NUMBA:
        return "python"
    if all(kernel.jit_ready() for kernel in ROW_KERNELS.values()):
        return "numba-jit"
    if aot_available():
        return "numba-aot"
    if any(thread.is_alive() for thread in _warming):
        return "compiling"
    return "numba-lazy"


def default_placement(num_layers: int, num_logical: int, num_physical: int) -> Placement:
    """What an engine without EPLB runs: slot p holds expert p mod E in every layer (no layers:
    an empty placement, a model without MoE layers)."""
    if num_layers == 0:
        return Placement.from_phy2log(np.zeros((0, num_physical), dtype=np.int64), num_logical)
    phy2log = np.tile(np.arange(num_physical) % num_logical, (num_layers, 1))
    return Placement.from_phy2log(phy2log, num_logical)


__all__ = [
    "fit_shares",
    "POLICIES",
    "Placement",
    "PlacementInputError",
    "PlacementPolicy",
    "UnknownPolicyError",
    "balancedness",
    "balancedness_bound",
    "compute_placement",
    "default_placement",
    "get_policy",
    "gpu_loads",
    "layer_balancedness",
    "max_load_lower_bound",
    "moved_copies",
    "overall_balancedness",
    "validate_inputs",
    "start_warm_up",
    "kernel_build",
    "warm_up",
    "worst_layer_balancedness",
]

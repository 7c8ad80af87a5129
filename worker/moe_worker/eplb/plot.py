"""Plots of placements (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .policy.placement import Placement
from .policy.quality import gpu_loads, layer_balancedness


def plot_worst_layer(
    weight: np.ndarray,
    before: Placement,
    before_gpus: int,
    after: Placement,
    after_gpus: int,
    path: str | Path,
) -> int:
    """Bar chart of per-GPU load before and after for the layer worst balanced before.

    Writes a PNG to ``path``; returns the layer shown.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layer = int(np.argmin(layer_balancedness(weight, before, before_gpus)))
    load_before = gpu_loads(weight, before, before_gpus)[layer]
    load_after = gpu_loads(weight, after, after_gpus)[layer]
    figure, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    for axis, loads, title in (
        (
            axes[0],
            load_before,
            f"before: balancedness {load_before.mean() / load_before.max():.3f}",
        ),
        (axes[1], load_after, f"after: balancedness {load_after.mean() / load_after.max():.3f}"),
    ):
        axis.bar(np.arange(loads.size), loads, color="tab:blue")
        axis.axhline(loads.mean(), color="tab:orange", linestyle="--", label="mean")
        axis.set_title(title)
        axis.set_xlabel("GPU (EP rank)")
    axes[0].set_ylabel(f"tokens routed, layer {layer}")
    axes[0].legend()
    figure.suptitle(f"Per-GPU load, layer {layer} (worst before)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return layer

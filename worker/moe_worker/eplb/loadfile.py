"""Expert-load files: ``.npy`` or ``.json`` ([[...]] or {"counts": [[...]]}), shape [L, E]."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def read_loads(path: str | Path) -> np.ndarray:
    """Load [L, E] float64 per-layer logical expert loads; ValueError says what is wrong."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            data = np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise ValueError(f"not a readable .npy array ({exc})") from None
    elif suffix == ".json":
        try:
            document = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if isinstance(document, dict):
            if "counts" not in document:
                raise ValueError('a JSON object must have a "counts" field [[...], ...]')
            document = document["counts"]
        try:
            data = np.asarray(document, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError("counts must be a rectangular list of lists of numbers") from None
    else:
        raise ValueError(f"unsupported file type {suffix or '(none)'!r}; use .npy or .json")
    if data.ndim != 2:
        raise ValueError(f"loads must be 2-D [layers, experts], got shape {data.shape}")
    if not np.issubdtype(data.dtype, np.number):
        raise ValueError(f"loads must be numeric, got dtype {data.dtype}")
    data = data.astype(np.float64)
    if not np.isfinite(data).all():
        raise ValueError("loads must be finite (no NaN or infinity)")
    if (data < 0).any():
        layer, expert = np.argwhere(data < 0)[0]
        raise ValueError(
            f"loads must be non-negative; layer {layer} expert {expert} is {data[layer, expert]}"
        )
    return data

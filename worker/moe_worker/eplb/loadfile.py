"""Expert-load files: ``.npy`` or ``.json`` ([[...]] or {"counts": [[...]]}), shape [L, E]."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def read_loads(path: str | Path) -> np.ndarray:
    """Parse a load file into a float64 array; ValueError says what is wrong.

    Shape and value rules ([L, E], finite, non-negative) are checked where the loads are used
    (``moe_worker.eplb.policy.validate_inputs``).
    """
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
    if not np.issubdtype(data.dtype, np.number):
        raise ValueError(f"loads must be numeric, got dtype {data.dtype}")
    return data.astype(np.float64)

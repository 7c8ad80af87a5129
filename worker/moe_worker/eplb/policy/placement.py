"""Placement data type and its conversions.

Shapes (L layers, E logical experts, P physical slots per layer, G GPUs, S = P / G):

- ``phy2log``       [L, P]     int64, logical expert held by each physical slot; GPU ``g`` owns
                                slots ``g*S .. (g+1)*S-1``.
- ``log2phy``       [L, E, R]  int64, physical slots of each logical expert in increasing slot
                                order, padded with -1 (R = the largest replica count).
- ``replica_count`` [L, E]     int64, number of physical slots holding each logical expert.
- ``share``         [L, P]     float64 or None, the fraction of its logical expert's tokens
                                each slot receives (summing to 1 over the expert's slots); None:
                                replicas share equally (see ``shares``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Placement:
    """A physical->logical expert map for every MoE layer, with its two derived views."""

    phy2log: np.ndarray
    log2phy: np.ndarray
    replica_count: np.ndarray
    share: np.ndarray | None = None

    @property
    def num_layers(self) -> int:
        return int(self.phy2log.shape[0])

    @property
    def num_physical(self) -> int:
        return int(self.phy2log.shape[1])

    @property
    def num_logical(self) -> int:
        return int(self.replica_count.shape[1])

    def slot_share(self) -> np.ndarray:
        """Each slot's share of its expert's tokens [L, P] (1 / replica count when equal)."""
        if self.share is not None:
            return self.share
        count = np.take_along_axis(self.replica_count, self.phy2log, axis=1)
        return 1.0 / np.maximum(count, 1)

    def with_share(self, share: np.ndarray | None) -> Placement:
        """The same slots with ``share`` [L, P] (None: equal); checked to sum to 1 per expert."""
        if share is None:
            return Placement(self.phy2log, self.log2phy, self.replica_count)
        share = np.ascontiguousarray(np.asarray(share, dtype=np.float64))
        if share.shape != self.phy2log.shape:
            raise ValueError(
                f"share must be [layers, slots] {self.phy2log.shape}, got {share.shape}"
            )
        if not np.isfinite(share).all() or (share < 0).any():
            raise ValueError("share entries must be finite and >= 0")
        sums = _sum_per_row(self.phy2log, share, self.num_logical)
        if not np.allclose(sums, 1.0, rtol=0, atol=1e-6):
            layer, expert = np.argwhere(~np.isclose(sums, 1.0, rtol=0, atol=1e-6))[0]
            raise ValueError(
                f"share of layer {layer} expert {expert} sums to {sums[layer, expert]:.6f}, not 1"
            )
        return Placement(self.phy2log, self.log2phy, self.replica_count, share)

    @classmethod
    def from_phy2log(cls, phy2log: np.ndarray, num_logical: int) -> Placement:
        """Build a placement from ``phy2log`` [L, P], deriving ``log2phy`` and ``replica_count``."""
        phy2log = np.ascontiguousarray(np.asarray(phy2log, dtype=np.int64))
        if phy2log.ndim != 2:
            raise ValueError(f"phy2log must be 2-D [layers, slots], got shape {phy2log.shape}")
        num_layers, num_physical = phy2log.shape
        if phy2log.size and (phy2log.min() < 0 or phy2log.max() >= num_logical):
            raise ValueError(f"phy2log entries must lie in [0, {num_logical})")
        replica_count = _count_per_row(phy2log, num_logical)
        max_replicas = int(replica_count.max()) if replica_count.size else 1
        # Group each layer's slots by expert, keeping slot order inside a group.
        # int16 keys let numpy use its linear-time radix sort for the stable sort.
        sort_key = phy2log.astype(np.int16) if num_logical <= np.iinfo(np.int16).max else phy2log
        order = np.argsort(sort_key, axis=1, kind="stable")
        sorted_expert = np.take_along_axis(phy2log, order, axis=1)
        first_slot_of = np.cumsum(replica_count, axis=1) - replica_count
        rank = np.arange(num_physical)[None, :] - np.take_along_axis(
            first_slot_of, sorted_expert, axis=1
        )
        log2phy = np.full((num_layers, num_logical, max_replicas), -1, dtype=np.int64)
        layer_index = np.repeat(np.arange(num_layers), num_physical)
        log2phy[layer_index, sorted_expert.ravel(), rank.ravel()] = order.ravel()
        return cls(phy2log=phy2log, log2phy=log2phy, replica_count=replica_count)

    def to_json(self) -> dict[str, list]:
        data = {
            "phy2log": self.phy2log.tolist(),
            "log2phy": self.log2phy.tolist(),
            "replica_count": self.replica_count.tolist(),
        }
        if self.share is not None:
            data["share"] = self.share.tolist()
        return data

    @classmethod
    def from_json(cls, data: dict) -> Placement:
        """Read the ``--out`` format; ``phy2log`` is authoritative, the others are checked."""
        if not isinstance(data, dict) or "phy2log" not in data:
            raise ValueError("placement JSON must be an object with a 'phy2log' field")
        phy2log = np.asarray(data["phy2log"])
        if phy2log.ndim != 2 or not np.issubdtype(phy2log.dtype, np.integer):
            raise ValueError("placement 'phy2log' must be a 2-D list of integers [layers][slots]")
        num_logical = int(phy2log.max()) + 1
        if "replica_count" in data:
            replica_count = np.asarray(data["replica_count"])
            if replica_count.ndim != 2 or replica_count.shape[0] != phy2log.shape[0]:
                raise ValueError("placement 'replica_count' must be [layers][experts]")
            num_logical = int(replica_count.shape[1])
        placement = cls.from_phy2log(phy2log, num_logical)
        if "replica_count" in data and not np.array_equal(
            placement.replica_count, np.asarray(data["replica_count"])
        ):
            raise ValueError("placement 'replica_count' disagrees with 'phy2log'")
        if data.get("share") is not None:
            try:
                return placement.with_share(np.asarray(data["share"], dtype=np.float64))
            except (TypeError, ValueError) as error:
                raise ValueError(f"placement 'share': {error}") from None
        return placement


def _sum_per_row(index: np.ndarray, values: np.ndarray, num_values: int) -> np.ndarray:
    """Per-row sums of ``values`` [X, N] by ``index`` [X, N] in [0, num_values): [X, num_values]."""
    num_rows = index.shape[0]
    offset = (np.arange(num_rows, dtype=np.int64) * num_values)[:, None]
    sums = np.bincount(
        (index + offset).ravel(), weights=values.ravel(), minlength=num_rows * num_values
    )
    return sums.reshape(num_rows, num_values)


def _count_per_row(index: np.ndarray, num_values: int) -> np.ndarray:
    """Per-row histogram: ``index`` [X, N], values in [0, num_values) -> counts [X, num_values]."""
    num_rows = index.shape[0]
    offset = (np.arange(num_rows, dtype=np.int64) * num_values)[:, None]
    counts = np.bincount((index + offset).ravel(), minlength=num_rows * num_values)
    return counts.reshape(num_rows, num_values).astype(np.int64)

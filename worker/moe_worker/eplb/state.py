"""EPLB state of one model: the expert maps and the load window, global and per layer.

Global tensors (L MoE layers, E logical experts, P physical slots, W window steps,
R = P - E + 1 the most replicas an expert can have):

- ``phy2log``       [L, P]     int64
- ``log2phy``       [L, E, R]  int64, -1 padded
- ``replica_count`` [L, E]     int64
- ``route_table``   [L, E, T]  int64, -1 padded: what routing picks from (``shares.route_tables``:
                               the expert's slots, or T = ROUTE_TICKETS weighted entries)
- ``route_length``  [L, E]     int64, the used length of each table
- ``load_window``   [W, L, P]  int64, tokens routed to each slot in each of the last W steps

A layer's state (``EPLBLayerState``) holds views (slices) of these, so updating the global
tensors in place updates every layer. A layer with EPLB off has no state at all (``None``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .policy import Placement
from .policy.shares import ROUTE_TICKETS, route_tables, shares_from_tables

LAYER_TENSORS = (
    "phy2log",
    "log2phy",
    "replica_count",
    "route_table",
    "route_length",
    "load_window",
)


class EPLBStateError(ValueError):
    pass


@dataclass
class EPLBLayerState:
    """One MoE layer's slices of the global EPLB tensors; set through ``set_layer_state``."""

    phy2log: torch.Tensor | None = None  # [P]
    log2phy: torch.Tensor | None = None  # [E, R]
    replica_count: torch.Tensor | None = None  # [E]
    route_table: torch.Tensor | None = None  # [E, T]
    route_length: torch.Tensor | None = None  # [E]
    load_window: torch.Tensor | None = None  # [W, P]
    window_position: list[int] = field(default_factory=lambda: [0])  # shared with the model
    step_slots: torch.Tensor | None = None  # [T, k] slots this step's tokens went to

    def set_layer_state(self, layer: int, state: EPLBState) -> None:
        """Point every tensor at layer ``layer`` of the global ``state``."""
        self.phy2log = state.phy2log[layer]
        self.log2phy = state.log2phy[layer]
        self.replica_count = state.replica_count[layer]
        self.route_table = state.route_table[layer]
        self.route_length = state.route_length[layer]
        self.load_window = state.load_window[:, layer]
        self.window_position = state.window_position

    def validate(self) -> None:
        for name in LAYER_TENSORS:
            if getattr(self, name) is None:
                raise EPLBStateError(f"EPLB requires {name} in the layer state; it is missing")

    def routing_maps(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(route_table [E, T], route_length [E]) for routing; EPLBStateError when unset."""
        if self.route_table is None or self.route_length is None:
            raise EPLBStateError(
                "EPLB routing needs route_table and route_length in the layer state; "
                "register the model with the EPLB controller first"
            )
        return self.route_table, self.route_length

    def note_step(self, slots: torch.Tensor) -> None:
        """Remember which physical slots [T, k] this step's tokens use (recorded at step end)."""
        self.step_slots = slots


class EPLBState:
    """Global EPLB tensors of one model (main or draft)."""

    def __init__(
        self, placement: Placement, window_size: int, device: torch.device | str = "cpu"
    ) -> None:
        num_layers, num_physical = placement.phy2log.shape
        num_logical = placement.num_logical
        self.max_replicas = num_physical - num_logical + 1
        self.phy2log = torch.zeros((num_layers, num_physical), dtype=torch.long, device=device)
        self.log2phy = torch.full(
            (num_layers, num_logical, self.max_replicas), -1, dtype=torch.long, device=device
        )
        self.replica_count = torch.zeros((num_layers, num_logical), dtype=torch.long, device=device)
        self.route_width = max(self.max_replicas, ROUTE_TICKETS)
        self.route_table = torch.full(
            (num_layers, num_logical, self.route_width), -1, dtype=torch.long, device=device
        )
        self.route_length = torch.zeros_like(self.replica_count)
        self.load_window = torch.zeros(
            (window_size, num_layers, num_physical), dtype=torch.long, device=device
        )
        self.window_position = [0]
        self.steps_recorded = 0
        # steps_recorded when each layer's window was last cleared (its slots changed meaning)
        self.layer_cleared_at = [0] * num_layers
        self.mapping_generation = 0
        self.commit(placement, layers=range(num_layers))
        self.mapping_generation = 0

    @property
    def num_layers(self) -> int:
        return int(self.phy2log.shape[0])

    @property
    def window_size(self) -> int:
        return int(self.load_window.shape[0])

    def placement(self) -> Placement:
        """The current maps as a numpy ``Placement`` (with the shares the tables realise)."""
        phy2log = self.phy2log.cpu().numpy().copy()
        placement = Placement.from_phy2log(phy2log, int(self.replica_count.shape[1]))
        table, length = self.route_table.cpu().numpy(), self.route_length.cpu().numpy()
        share = shares_from_tables(table, length, phy2log)
        if np.allclose(share, placement.slot_share(), rtol=0, atol=1e-12):
            return placement  # equal shares
        return placement.with_share(share)

    def commit(
        self, placement: Placement, layers: range | list[int], new_generation: bool = True
    ) -> None:
        """Write ``placement``'s maps for ``layers`` into the global tensors, in place.

        ``new_generation``: this commit starts a new mapping generation (an async rebalance
        commits layer by layer and starts one generation with its first layer).
        """
        replicas = placement.log2phy.shape[2]
        if replicas > self.max_replicas:
            raise EPLBStateError(
                f"placement has {replicas} replicas of an expert, at most {self.max_replicas} fit"
            )
        table, length = route_tables(placement, layers)  # one row per committed layer
        for row, layer in enumerate(layers):
            self.route_table[layer].fill_(-1)
            self.route_table[layer, :, : table.shape[2]].copy_(torch.from_numpy(table[row]))
            self.route_length[layer].copy_(torch.from_numpy(length[row]))
            self.phy2log[layer].copy_(torch.from_numpy(placement.phy2log[layer]))
            self.replica_count[layer].copy_(torch.from_numpy(placement.replica_count[layer]))
            padded = np.full((placement.num_logical, self.max_replicas), -1, dtype=np.int64)
            padded[:, :replicas] = placement.log2phy[layer]
            self.log2phy[layer].copy_(torch.from_numpy(padded))
        if new_generation:
            self.mapping_generation += 1

    def record_step(self, layers: list[EPLBLayerState | None]) -> None:
        """Add the step's tokens per slot of every layer to the current window row, at once."""
        keys = []
        num_physical = self.phy2log.shape[1]
        for index, layer in enumerate(layers):
            if layer is not None and layer.step_slots is not None:
                keys.append(layer.step_slots.flatten() + index * num_physical)
                layer.step_slots = None
        if keys:
            counts = torch.bincount(torch.cat(keys), minlength=self.num_layers * num_physical)
            self.load_window[self.window_position[0]] += counts.view(self.num_layers, -1)

    def advance_window(self) -> None:
        """Start the next step's window row (clearing what it held W steps ago)."""
        self.steps_recorded += 1
        self.window_position[0] = self.steps_recorded % self.window_size
        self.load_window[self.window_position[0]].zero_()

    def clear_window(self) -> None:
        """Forget recorded load (slot meanings changed after a remap)."""
        self.load_window.zero_()
        self.steps_recorded = 0
        self.window_position[0] = 0
        self.layer_cleared_at = [0] * self.num_layers

    def clear_layer_window(self, layer: int) -> None:
        """Forget one layer's recorded load (its slots changed meaning: a layer commit)."""
        self.load_window[:, layer].zero_()
        self.layer_cleared_at[layer] = self.steps_recorded

    def layer_window_steps(self) -> np.ndarray:
        """Steps of load each layer's window holds now [L] (at most the window size)."""
        since = self.steps_recorded - np.asarray(self.layer_cleared_at)
        return np.minimum(since, self.window_size)

    def window_slot_load(self) -> torch.Tensor:
        """Tokens per slot over the window, [L, P]."""
        return self.load_window.sum(dim=0)

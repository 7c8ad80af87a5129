"""EPLBController: owned by the engine (composition), steps after every forward.

It registers the main model and an optional draft model (unwrapping wrappers that expose
``get_language_model()``), counts steps, rebalances every ``stepInterval`` steps (the first as
soon as the window has filled once) or when asked, and logs balancedness.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from moe_worker.config import EPLBConfig

from .async_worker import AsyncRebalance, FaultHook
from .channels import open_channels
from .communicator import Communicator
from .layout import Layout, nodes_in_use
from .policy import Placement, overall_balancedness
from .rebalance import RebalanceResult, global_logical_load, rebalance
from .state import EPLBLayerState, EPLBState

# Steps of load a layer's window needs after its maps changed before its balancedness is read:
# at least this many, and a quarter of the window, up to READING_MAX_STEPS (at most half of it).
READING_MIN_STEPS = 16
READING_MAX_STEPS = 200

log = logging.getLogger("moe_worker.eplb")


def reading_min_steps(window_size: int) -> int:
    """Steps of load under new maps before a layer's balancedness is read again."""
    quarter = min(max(READING_MIN_STEPS, window_size // 4), READING_MAX_STEPS)
    return max(1, min(quarter, window_size // 2))


F = TypeVar("F", bound=Callable[..., Any])


class EPLBRegistrationError(ValueError):
    pass


def unwrap_moe(model: Any) -> Any:
    """The MoE language model inside a wrapper (vision-language models), or the model itself."""
    if not getattr(model, "moe_layers", None) and hasattr(model, "get_language_model"):
        return model.get_language_model()
    return model


@dataclass
class RegisteredModel:
    name: str
    model: Any
    state: EPLBState


class EPLBController:
    def __init__(
        self,
        config: EPLBConfig,
        rank: int = 0,
        world: int = 1,
        group: dist.ProcessGroup | None = None,
        device: torch.device | str = "cpu",
        communicator: Communicator | None = None,
        control_group: dist.ProcessGroup | None = None,
        fault_hook: FaultHook | None = None,
        layout: Layout = Layout(),
    ) -> None:
        """``communicator`` moves weights (for async: one with its own group and stream);
        ``control_group`` (gloo) carries the per-step agreement of async rebalances;
        ``layout``: the model's expert groups and the nodes declared (checked against the
        ranks' NODE_NAME at the first rebalance)."""
        self.config = config
        self.layout = layout
        self._checked_layout: Layout | None = None
        self.rank, self.world, self.group = rank, world, group
        self.device = torch.device(device)
        self.own_channels = None  # opened here when none are given (tests, tools)
        if communicator is None:
            self.own_channels = open_channels(config, rank, world, self.device)
            communicator = self.own_channels.communicator
            control_group = self.own_channels.control_group
        self.communicator = communicator
        self.control_group = control_group
        self.fault_hook = fault_hook
        self._async: AsyncRebalance | None = None
        self._async_model = ""  # the model the in-flight async rebalance moves
        self._async_queue: list[tuple[str, str]] = []
        self.models: dict[str, RegisteredModel] = {}
        self.step_count = 0
        self.history: list[RebalanceResult] = []
        self._last_measured: dict[str, np.ndarray] = {}  # per model: the last per-layer reading
        self.balancedness_log: list[tuple[int, float]] = []
        self._requested: str | None = None

    @property
    def first_rebalance_step(self) -> int:
        return min(self.config.window_size, self.config.step_interval)

    def register_model(self, model: Any, placement: Placement, name: str = "main") -> Any:
        """Give every MoE layer of ``model`` its EPLB state; fails loudly if it has none."""
        inner = unwrap_moe(model)
        layers = getattr(inner, "moe_layers", None)
        if not layers:
            raise EPLBRegistrationError(
                f"EPLB is enabled but the {name} model ({type(model).__name__}) has no MoE layers"
            )
        if placement.num_layers != len(layers):
            raise EPLBRegistrationError(
                f"placement covers {placement.num_layers} layers, "
                f"the {name} model has {len(layers)}"
            )
        state = EPLBState(placement, self.config.window_size, self.device)
        for index, layer in enumerate(layers):
            layer_state = EPLBLayerState()
            layer_state.set_layer_state(index, state)
            layer_state.validate()
            layer.eplb_state = layer_state
        self.models[name] = RegisteredModel(name, inner, state)
        return inner

    def register_draft_model(self, model: Any, placement: Placement) -> Any:
        return self.register_model(model, placement, name="draft")

    def request_rebalance(self, trigger: str = "manual") -> None:
        """Rebalance after the next step (every rank must ask at the same step)."""
        self._requested = trigger

    def _due(self) -> str | None:
        if self._requested:
            return self._requested
        first = self.first_rebalance_step
        if self.step_count == first or (
            self.step_count > first and (self.step_count - first) % self.config.step_interval == 0
        ):
            return "interval"
        return None

    def step(self) -> list[RebalanceResult]:
        """Called after every forward step."""
        self.step_count += 1
        for registered in self.models.values():
            layers = registered.model.moe_layers
            registered.state.record_step([layer.eplb_state for layer in layers])
        results = []
        if (
            self.config.log_balancedness
            and self.step_count % self.config.log_balancedness_interval == 0
        ):
            self.log_balancedness()
        if self._async is not None:
            results.extend(self._poll_async())
        trigger = self._due()
        if trigger is not None:
            self._requested = None
            if not self.config.use_async:
                results = [self.rebalance_now(trigger)]
            elif self._async is None and not self._async_queue:
                self._async_queue = [(name, trigger) for name in self.models]
                results.extend(self._start_next_async())
            else:
                log.info(
                    "step %d: %s rebalance skipped, one is in flight", self.step_count, trigger
                )
        for registered in self.models.values():
            registered.state.advance_window()
        return results

    @property
    def rebalancing(self) -> bool:
        """A rebalance is requested, queued or in flight."""
        return self._requested is not None or self._async is not None or bool(self._async_queue)

    def _start_next_async(self) -> list[RebalanceResult]:
        """Start the next queued model's async rebalance (skipping models with no load)."""
        results = []
        while self._async_queue and self._async is None:
            name, trigger = self._async_queue.pop(0)
            registered = self.models[name]
            load = global_logical_load(registered.state, self.group, self.world)
            if load.sum() == 0:
                skipped = RebalanceResult(
                    trigger,
                    "skipped",
                    mapping_generation=registered.state.mapping_generation,
                    model=name,
                )
                self.history.append(skipped)
                results.append(skipped)
                continue
            layout = self.placement_layout()
            self._async_model = name
            self._async = AsyncRebalance(
                registered.state,
                registered.model.moe_layers,
                self.config.policy,
                load,
                self.rank,
                self.world,
                self.communicator,
                self.control_group,
                self.config.rebalance_timeout_s,
                trigger,
                self.device,
                self.fault_hook,
                layout=layout,
                options=self.config.policy_options(),
            )
        return results

    def _poll_async(self) -> list[RebalanceResult]:
        assert self._async is not None
        result = self._async.poll()
        if result is None:
            return []
        result = dataclasses.replace(result, model=self._async_model)
        self._async = None
        self.history.append(result)
        log.info(
            "async rebalance (%s) of %s: %s, balancedness %.4f -> %.4f, %d copies moved%s",
            result.trigger,
            result.model,
            result.result,
            result.balancedness_before,
            result.balancedness_after,
            result.copies_moved,
            f" ({result.error})" if result.error else "",
        )
        if result.result != "ok":
            self._async_queue.clear()
        return [result, *self._start_next_async()]

    def placement_layout(self) -> Layout:
        """The layout placement assumes in this group: the declared one, node-aware only where
        the ranks' nodes bear it out (``layout.nodes_in_use``). The first call gathers every
        rank's NODE_NAME (a collective: all ranks call it at the same rebalance)."""
        if self._checked_layout is None:
            layout = self.layout.at(self.world)
            if layout.num_nodes > 1:
                mine = os.environ.get("NODE_NAME", "")
                names: list[Any] = [mine] * self.world
                if self.world > 1:
                    dist.all_gather_object(names, mine, group=self.group)
                nodes, why = nodes_in_use(layout.num_nodes, [str(n) for n in names])
                if why is not None:
                    log.warning("rank %d: placement goes flat over nodes: %s", self.rank, why)
                layout = Layout(layout.num_groups, nodes)
            self._checked_layout = layout
        return self._checked_layout

    def shutdown(self, timeout: float = 10.0) -> None:
        """Abandon an in-flight async rebalance (all ranks call it at the same step)."""
        self._async_queue.clear()
        if self._async is not None:
            result = self._async._abandon("shutting down")
            self.history.append(dataclasses.replace(result, model=self._async_model))
            self._async.wait_stopped(timeout)
            self._async = None

    def rebalance_now(self, trigger: str) -> RebalanceResult:
        result = RebalanceResult(trigger, "skipped")
        for registered in self.models.values():
            result = rebalance(
                registered.state,
                registered.model.moe_layers,
                self.config.policy,
                self.rank,
                self.world,
                self.group,
                self.communicator,
                trigger,
                self.placement_layout(),
                self.config.policy_options(),
            )
            result = dataclasses.replace(result, model=registered.name)
            self.history.append(result)
            log.info(
                "rebalance %s (%s) of %s: %s, balancedness %.4f -> %.4f, %d copies moved",
                result.mapping_generation,
                trigger,
                registered.name,
                result.result,
                result.balancedness_before,
                result.balancedness_after,
                result.copies_moved,
            )
        return result

    def measured_layer_balancedness(self, name: str | None = None) -> np.ndarray:
        """Per layer [L], over the window and all ranks' tokens: mean / max rank load.

        A layer whose window was cleared (its maps changed) fewer than ``reading_min_steps``
        steps ago keeps its last measured value: a nearly empty window says little yet (an empty
        one would read 1.0, a perfect balance never measured; a few steps of served requests
        read the few requests' own skew). A
        collective: every rank must call it at the same step. ``name``: the registered model
        (default: the first, the main model when it has MoE layers).
        """
        name = name or self.primary
        state = self.models[name].state
        slot_load = state.window_slot_load().double()
        if self.world > 1:
            dist.all_reduce(slot_load, group=self.group)
        rank_load = slot_load.view(slot_load.shape[0], self.world, -1).sum(dim=2)
        peak = rank_load.max(dim=1).values
        ratio = torch.where(peak > 0, rank_load.mean(dim=1) / peak.clamp_min(1e-30), 1.0)
        measured = ratio.cpu().numpy()
        last = self._last_measured.get(name)
        if last is not None:
            enough = reading_min_steps(state.window_size)
            too_few = state.layer_window_steps() < enough
            measured = np.where(too_few, last, measured)
        self._last_measured[name] = measured
        return measured

    def current_balancedness(self, name: str | None = None) -> float:
        """``overall_balancedness`` of ``measured_layer_balancedness`` (a collective)."""
        return overall_balancedness(self.measured_layer_balancedness(name))

    def window_logical_load(self, name: str | None = None) -> np.ndarray:
        """Tokens per logical expert over the window, all ranks: [L, E] (a collective)."""
        return global_logical_load(self.models[name or self.primary].state, self.group, self.world)

    @property
    def primary(self) -> str:
        """The first registered model's name (main, or the draft of a dense main model)."""
        return next(iter(self.models))

    def log_balancedness(self) -> None:
        value = self.current_balancedness()
        self.balancedness_log.append((self.step_count, value))
        if self.rank == 0:
            log.info("step %d: balancedness %.4f", self.step_count, value)


def step_eplb_after(method: F) -> F:
    """Decorate an engine's step method: after it returns, its ``eplb`` controller steps."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = method(self, *args, **kwargs)
        controller = getattr(self, "eplb", None)
        if controller is not None:
            controller.step()
        return result

    return wrapper  # type: ignore[return-value]

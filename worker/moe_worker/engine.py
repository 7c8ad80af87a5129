"""The step loop: one EP rank's model, its EPLB controller and its workload.

The engine owns the controller (composition); ``step`` is decorated so the controller steps
after every forward.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from moe_worker.config import WorkerConfig
from moe_worker.eplb.channels import Channels, open_channels
from moe_worker.eplb.controller import EPLBController, EPLBRegistrationError, step_eplb_after
from moe_worker.eplb.layout import Layout
from moe_worker.eplb.policy import Placement, default_placement, start_warm_up
from moe_worker.model.experts import DTYPES, SyntheticSource, WeightSource
from moe_worker.model.moe import DenseReference, EPGroup, MoEModel, build_model, set_placement
from moe_worker.model.simulator import RoutingSimulator

log = logging.getLogger("moe_worker.engine")


def resolve_device(requested: str, rank: int) -> torch.device:
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1)))
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def make_source(config: WorkerConfig) -> WeightSource:
    """The routing simulator's weights: synthetic MoE layers (real models are served)."""
    if config.model.source == "checkpoint":
        raise ValueError(
            "model.source: checkpoint models run with serving.enabled: true "
            "(the routing simulator runs synthetic MoE layers only)"
        )
    return SyntheticSource(config.model)


def check_platform(config: WorkerConfig, device: torch.device) -> None:
    """Reject settings this device cannot run, naming the field."""
    if device.type != "cuda":
        if config.model.dtype == "float16":
            raise ValueError("model.dtype: float16 needs a GPU; use float32 or bfloat16 on CPU")
        if config.eplb.communicator in ("torch_nccl", "pynccl"):
            raise ValueError(
                f"eplb.communicator: {config.eplb.communicator} needs GPUs; use auto or torch_gloo"
            )


def initial_placement(
    config: WorkerConfig, num_layers: int, num_experts: int, num_physical: int
) -> Placement:
    """The placement a fresh group starts with: ``eplb.initialPlacementFile`` or the default."""
    path = config.eplb.initial_placement_file
    if path is None:
        return default_placement(num_layers, num_experts, num_physical)
    try:
        placement = Placement.from_json(json.loads(Path(path).read_text()))
    except (OSError, ValueError) as exc:
        raise ValueError(f"eplb.initialPlacementFile {path}: {exc}") from None
    want = (num_layers, num_physical)
    if placement.phy2log.shape != want or placement.num_logical != num_experts:
        raise ValueError(
            f"eplb.initialPlacementFile {path}: phy2log is {list(placement.phy2log.shape)} over "
            f"{placement.num_logical} experts; the model needs {list(want)} over {num_experts}"
        )
    return placement


def create_engine(config: WorkerConfig, *args: Any, **kwargs: Any) -> RankEngine:
    """The engine ``config`` asks for: serving real requests, or the routing simulator."""
    if config.serving.enabled:
        from moe_worker.serving.engine import ServingEngine

        return ServingEngine(config, *args, **kwargs)
    return Engine(config, *args, **kwargs)


@dataclass
class StepStats:
    step: int
    tokens: int
    seconds: float


class RankEngine:
    """One EP rank's model and its EPLB controller (composition); subclasses define ``step``.

    ``Engine`` runs the routing simulator (benchmarks, the demo's synthetic load);
    ``moe_worker.serving.engine.ServingEngine`` serves real requests with a transformers model.
    Both expose the same surface to the service loop, elastic membership and EPLB: ``model``
    (with ``moe_layers``), ``ep``, ``eplb``, ``step_index``, ``layer_slots``, ``install``...
    """

    def __init__(
        self,
        config: WorkerConfig,
        rank: int = 0,
        world: int = 1,
        device: torch.device | None = None,
        source: Any = None,
        placement: Placement | None = None,
        joining: bool = False,
        channel_store: dist.Store | None = None,
    ) -> None:
        """``joining``: a rank entering a running group: its slots start zeroed (a resize fills
        them) and EPLB starts in ``install``, in step with the other ranks; ``channel_store``:
        where the pynccl communicator's id is exchanged."""
        if world != config.ep_size:
            raise ValueError(f"world size {world} differs from epSize {config.ep_size}")
        self.config = config
        self.device = device or torch.device("cpu")
        check_platform(config, self.device)
        self.ep = EPGroup(rank=rank, size=world, group=None, device=self.device)
        self.source = source if source is not None else self._make_source()
        num_layers, num_experts = self._model_shape()
        num_physical = num_experts + config.eplb.num_redundant_experts
        self.placement = placement or initial_placement(
            config, num_layers, num_experts, num_physical
        )
        self.model: Any = self._build_model(load_weights=not joining)
        self.eplb: EPLBController | None = None
        self.channels: Channels | None = None
        if config.eplb.enabled:
            start_warm_up()  # the placement kernels compile while the first steps run
        if not joining:
            self._start_eplb(channel_store)
        self.step_index = 0
        self.tokens_processed = 0
        self.outputs_checked = 0
        self.output_mismatches = 0

    # Set by the serving loop: called (any thread) when work arrives while ranks may be idle.
    on_work: Callable[[], None] | None = None

    def has_work(self) -> bool:
        """Whether this rank has something to run now (the simulator always has)."""
        return True

    def stop_accepting(self) -> None:
        """This rank is leaving the group: take no new requests (the simulator takes none)."""

    # --- what a kind of engine defines -----------------------------------------------------

    def _make_source(self) -> Any:
        raise NotImplementedError

    def _model_shape(self) -> tuple[int, int]:
        """(MoE layers, logical experts per layer) of the source's model."""
        raise NotImplementedError

    def _build_model(self, load_weights: bool) -> Any:
        raise NotImplementedError

    def _expert_groups(self) -> int:
        """Expert groups of the model's grouped top-k (1: none)."""
        return self.config.model.num_expert_groups

    @property
    def layout(self) -> Layout:
        """Expert groups and declared nodes, for node-aware placement."""
        return Layout(self._expert_groups(), self.config.num_nodes)

    def step(self) -> Any:
        raise NotImplementedError

    def _start_eplb(self, channel_store: dist.Store | None) -> None:
        if not self.config.eplb.enabled:
            return
        rank, world = self.ep.rank, self.ep.size
        self.close_channels()  # a generation's channels end with it (normally closed already)
        self.channels = open_channels(self.config.eplb, rank, world, self.device, channel_store)
        self.eplb = EPLBController(
            self.config.eplb,
            rank,
            world,
            None,
            self.device,
            self.channels.communicator,
            self.channels.control_group,
            layout=self.layout,
        )
        models = self._eplb_models()
        if not models:
            raise EPLBRegistrationError(
                "EPLB is enabled but neither the main model nor its draft has MoE layers"
            )
        for name, model, placement in models:
            self.eplb.register_model(model, placement, name=name)

    def _eplb_models(self) -> list[tuple[str, Any, Placement]]:
        """(name, model, placement) of each model EPLB balances; the first is the primary
        (its mapping generation and placement are the engine's)."""
        return [("main", self.model, self.placement)]

    def all_moe_layers(self) -> list[Any]:
        """Every MoE layer this rank runs, of every model (the main model's, a draft's)."""
        return list(self.model.moe_layers)

    @property
    def primary_model(self) -> str:
        """The name of the model whose mapping generation and placement the engine reports."""
        assert self.eplb is not None
        return self.eplb.primary

    def close_channels(self, abort: bool = False) -> None:
        """Close this generation's EPLB channels (every rank of the group at the same point;
        ``abort`` after a failure, when a peer may be gone)."""
        if self.channels is not None:
            self.channels.close(abort)
            self.channels = None

    @property
    def mapping_generation(self) -> int:
        if self.eplb is None:
            return 0
        return self.eplb.models[self.primary_model].state.mapping_generation

    def current_placement(self) -> Placement:
        if self.eplb is None:
            return self.placement
        return self.eplb.models[self.primary_model].state.placement()

    def install(
        self,
        world: int,
        placement: Placement,
        mapping_generation: int,
        channel_store: dist.Store | None = None,
    ) -> None:
        """Serve as this rank of a ``world``-rank group with ``placement`` (slots already hold
        its experts); the default process group must already be the new generation's.
        Every rank of the new group calls it at the same step."""
        self.config = self.config.resized(world)
        self.ep.size = world
        self.placement = placement
        set_placement(self.model.moe_layers, placement)
        self._start_eplb(channel_store)
        if self.eplb is not None:
            self.eplb.models[self.primary_model].state.mapping_generation = mapping_generation

    def layer_slots(self) -> list[dict[str, torch.Tensor]]:
        """Each layer's slot weights (name -> [S, ...]), updated in place by moves."""
        return [layer.slots for layer in self.model.moe_layers]

    def reload_expert(self, layer: int) -> Callable[[int], dict[str, torch.Tensor]]:
        """A loader of ``layer``'s experts from the model source (the last resort of recovery)."""
        return lambda expert: self.source.expert(layer, expert)

    def run(self, steps: int) -> list[StepStats]:
        stats = []
        for _ in range(steps):
            started = time.perf_counter()
            tokens_before = self.tokens_processed
            self.step()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            stats.append(
                StepStats(
                    self.step_index,
                    self.tokens_processed - tokens_before,
                    time.perf_counter() - started,
                )
            )
        return stats


class Engine(RankEngine):
    """The routing simulator's engine: synthetic hidden states and routing, MoE layers only."""

    def __init__(self, config: WorkerConfig, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        model_config = self.source.config
        self.dtype = DTYPES[model_config.dtype]
        self.simulator = RoutingSimulator(
            config.workload, model_config, model_config.num_layers, self.ep.rank, self.ep.size
        )
        self.reference = DenseReference(self.source) if config.check_outputs else None

    def _make_source(self) -> WeightSource:
        return make_source(self.config)

    def _model_shape(self) -> tuple[int, int]:
        return self.source.config.num_layers, self.source.config.num_experts

    def _build_model(self, load_weights: bool) -> MoEModel:
        return build_model(self.source, self.placement, self.ep, load_weights=load_weights)

    def install(self, world: int, *args: Any, **kwargs: Any) -> None:
        super().install(world, *args, **kwargs)
        self.simulator.world = world

    @step_eplb_after
    def step(self) -> torch.Tensor:
        """One forward step on this rank's batch; all ranks step together."""
        batch = self.simulator.batch(self.step_index)
        routed = [r.to(self.device) for r in batch.routed]
        out = self.model(batch.hidden.to(self.device, self.dtype), batch.token_offset, routed)
        if self.reference is not None:
            self._check(batch.hidden, batch.routed, out)
        self.step_index += 1
        self.tokens_processed += batch.hidden.shape[0]
        return out

    def _check(
        self, hidden: torch.Tensor, routed: list[torch.Tensor] | None, out: torch.Tensor
    ) -> None:
        assert self.reference is not None
        want = self.reference(hidden.to(self.dtype), routed).float()
        tolerance = 1e-4 if self.dtype == torch.float32 else 5e-2
        self.outputs_checked += 1
        if not torch.allclose(out.float().cpu(), want, rtol=tolerance, atol=tolerance):
            self.output_mismatches += 1
            log.warning("step %d: output differs from the dense reference", self.step_index)

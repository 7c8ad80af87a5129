"""EPLB state (optional per layer, views of global tensors) and the controller (one process)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moe_worker.config import EPLBConfig, ModelConfig
from moe_worker.eplb.controller import EPLBController, EPLBRegistrationError, step_eplb_after
from moe_worker.eplb.policy import Placement, default_placement
from moe_worker.eplb.state import EPLBLayerState, EPLBState, EPLBStateError
from moe_worker.model.experts import SyntheticSource
from moe_worker.model.moe import EPGroup, build_model, dense_reference


def small_model():  # type: ignore[no-untyped-def]
    config = ModelConfig(num_experts=8, num_layers=3, hidden_size=16, intermediate_size=8)
    placement = default_placement(3, 8, 10)
    return build_model(SyntheticSource(config), placement, EPGroup()), placement


def test_layer_state_is_a_view_of_the_global_tensors() -> None:
    placement = default_placement(3, 8, 10)
    state = EPLBState(placement, window_size=5)
    layer = EPLBLayerState()
    layer.set_layer_state(1, state)
    assert layer.phy2log is not None and layer.phy2log.data_ptr() == state.phy2log[1].data_ptr()
    new = Placement.from_phy2log(np.tile([2, 3, 4, 5, 6, 7, 0, 1, 2, 2], (3, 1)), 8)
    state.commit(new, layers=range(3))
    assert layer.phy2log.tolist() == [2, 3, 4, 5, 6, 7, 0, 1, 2, 2]
    assert layer.replica_count is not None and int(layer.replica_count[2]) == 3
    layer.note_step(torch.arange(10).view(5, 2))
    state.record_step([None, layer, None])
    assert state.load_window[0, 1].tolist() == [1] * 10 and int(state.load_window.sum()) == 10


def test_missing_tensor_is_named() -> None:
    layer = EPLBLayerState()
    with pytest.raises(EPLBStateError, match="log2phy"):
        layer.phy2log = torch.zeros(4, dtype=torch.long)
        layer.validate()


def test_window_slides_and_clears() -> None:
    state = EPLBState(default_placement(1, 2, 2), window_size=2)
    layer = EPLBLayerState()
    layer.set_layer_state(0, state)
    for tokens in (1, 2, 4):
        if tokens > 1:
            state.advance_window()  # the controller advances after each step's reads
        layer.note_step(torch.tensor([0, 1]).repeat(tokens))
        state.record_step([layer])
    # A window of 2 steps holds the last two (2 and 4 tokens per slot).
    assert state.window_slot_load().tolist() == [[6, 6]]
    state.clear_window()
    assert int(state.window_slot_load().sum()) == 0


def test_layers_without_state_use_the_load_time_map() -> None:
    model, _ = small_model()
    assert all(layer.eplb_state is None for layer in model.moe_layers)
    hidden = torch.randn(4, 16)
    source = SyntheticSource(model.config)
    for index, layer in enumerate(model.layers):
        torch.testing.assert_close(layer(hidden), dense_reference(source, index, hidden))


class Wrapper:
    """A vision-language style wrapper: not MoE itself, exposes its language model."""

    def __init__(self, inner) -> None:  # type: ignore[no-untyped-def]
        self.inner = inner

    def get_language_model(self):  # type: ignore[no-untyped-def]
        return self.inner


class NotMoE:
    moe_layers: list = []


def test_registers_wrapped_main_and_draft_models() -> None:
    main, placement = small_model()
    draft, _ = small_model()
    controller = EPLBController(EPLBConfig(window_size=4, step_interval=10))
    assert controller.register_model(Wrapper(main), placement) is main
    assert controller.register_draft_model(Wrapper(draft), placement) is draft
    assert set(controller.models) == {"main", "draft"}
    assert all(layer.eplb_state is not None for layer in main.moe_layers + draft.moe_layers)


def test_model_without_moe_layers_fails_loudly() -> None:
    controller = EPLBController(EPLBConfig())
    with pytest.raises(EPLBRegistrationError, match="no MoE layers"):
        controller.register_model(NotMoE(), default_placement(1, 2, 2))
    with pytest.raises(EPLBRegistrationError, match="draft"):
        controller.register_draft_model(Wrapper(NotMoE()), default_placement(1, 2, 2))


class TinyEngine:
    def __init__(self, config: EPLBConfig) -> None:
        self.model, placement = small_model()
        self.eplb = EPLBController(config)
        self.eplb.register_model(self.model, placement)
        self.forwards = 0
        self.generator = torch.Generator().manual_seed(0)  # routing: random, but the same

    @step_eplb_after
    def step(self) -> None:
        self.model(torch.randn((8, 16), generator=self.generator))
        self.forwards += 1


def test_decorator_steps_controller_and_triggers_on_schedule() -> None:
    engine = TinyEngine(
        EPLBConfig(window_size=3, step_interval=5, log_balancedness=True, use_async=False)
    )
    for _ in range(13):
        engine.step()
    assert engine.eplb.step_count == engine.forwards == 13
    # First rebalance when the window has filled once (step 3), then every 5 steps.
    assert [r.trigger for r in engine.eplb.history] == ["interval"] * 3
    assert len(engine.eplb.balancedness_log) == 13
    engine.eplb.request_rebalance()
    engine.step()
    assert engine.eplb.history[-1].trigger == "manual"


def test_a_layer_whose_maps_changed_keeps_its_reading_until_its_window_refills(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An emptied window would read a perfect 1.0 that nobody measured; the last value holds
    for READING_MIN_STEPS steps instead, then the new window speaks."""
    import moe_worker.eplb.controller as controller
    from moe_worker.eplb.controller import READING_MIN_STEPS

    engine = TinyEngine(EPLBConfig(window_size=64, step_interval=10**6, use_async=False))
    # Read the 10 slots as two ranks of 5 (one process: the all-reduce is the identity).
    engine.eplb.world = 2
    monkeypatch.setattr(controller.dist, "all_reduce", lambda *args, **kwargs: None)
    for _ in range(40):
        engine.step()
    state = engine.eplb.models["main"].state
    before = engine.eplb.measured_layer_balancedness()
    assert (before < 1).all()
    state.clear_layer_window(1)  # layer 1's maps changed (an async commit does this)
    assert state.layer_window_steps().tolist() == [40, 0, 40]
    held = engine.eplb.measured_layer_balancedness()
    assert held[1] == before[1] and held[0] == pytest.approx(before[0])
    for _ in range(READING_MIN_STEPS):
        engine.step()
    assert state.layer_window_steps()[1] == READING_MIN_STEPS
    fresh = engine.eplb.measured_layer_balancedness()
    window = state.window_slot_load()[1].double().view(2, -1).sum(dim=1)
    assert fresh[1] == pytest.approx(float(window.mean() / window.max()))


def test_the_configured_move_budget_reaches_the_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    """eplb.movedFraction goes to the incremental policy of every rebalance (and nowhere else)."""
    from moe_worker.eplb import rebalance as rebalance_module

    seen: list[dict] = []
    real = rebalance_module.compute_placement

    def recording(policy: str, weight: object, **kwargs: object) -> object:
        seen.append({"policy": policy, **kwargs})
        return real(policy, weight, **kwargs)

    monkeypatch.setattr(rebalance_module, "compute_placement", recording)
    engine = TinyEngine(
        EPLBConfig(window_size=3, step_interval=5, use_async=False, moved_fraction=0.05)
    )
    for _ in range(4):
        engine.step()
    assert seen and all(call["moved_fraction"] == 0.05 for call in seen)
    assert EPLBConfig(moved_fraction=0.05).policy_options() == {"moved_fraction": 0.05}
    assert EPLBConfig(policy="deepseek", moved_fraction=0.05).policy_options() == {}
    assert EPLBConfig().policy_options() == {}


def test_replica_shares_reach_the_policy_and_the_routing(monkeypatch: pytest.MonkeyPatch) -> None:
    """eplb.replicaShares: the incremental policy chooses with shares, and what it returns
    (slots and shares) is what the state routes by after the rebalance commits. (One rank:
    its shares are equal; test_replica_shares routes unequal ones through the state.)"""
    from moe_worker.eplb import rebalance as rebalance_module
    from moe_worker.eplb.policy.shares import route_tables

    returned: list[Placement] = []
    real = rebalance_module.compute_placement

    def recording(policy: str, weight: object, **kwargs: object) -> Placement:
        assert kwargs.get("shares") is True
        returned.append(real(policy, weight, **kwargs))
        return returned[-1]

    monkeypatch.setattr(rebalance_module, "compute_placement", recording)
    engine = TinyEngine(
        EPLBConfig(window_size=3, step_interval=5, use_async=False, replica_shares=True)
    )
    for _ in range(4):
        engine.step()
    assert returned and returned[-1].share is not None
    state = engine.eplb.models["main"].state
    committed = state.placement()
    np.testing.assert_array_equal(committed.phy2log, returned[-1].phy2log)
    np.testing.assert_allclose(committed.slot_share(), returned[-1].slot_share())
    table, length = route_tables(returned[-1])
    np.testing.assert_array_equal(state.route_length.numpy(), length)
    np.testing.assert_array_equal(state.route_table.numpy()[:, :, : table.shape[2]], table)
    assert EPLBConfig(replica_shares=True).policy_options() == {"shares": True}

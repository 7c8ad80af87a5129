"""Replica shares on a CUDA GPU: the EPLB state's routing tables live on the device, route an
expert's tokens to its replicas in proportion to their shares, and the layer's output equals
the dense reference (EP 1). Skips without a GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moe_worker.config import ModelConfig
from moe_worker.eplb.policy import compute_placement, fit_shares
from moe_worker.eplb.policy.shares import ROUTE_TICKETS, route_tables
from moe_worker.eplb.state import EPLBLayerState, EPLBState
from moe_worker.model.experts import SyntheticSource
from moe_worker.model.moe import EPGroup, build_model, dense_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_shares_route_on_the_gpu_and_keep_the_dense_output() -> None:
    rng = np.random.default_rng(3)
    weight = rng.lognormal(0.0, 1.0, size=(2, 16)) * 1000
    placement = compute_placement("balanced", weight, num_physical=24, num_gpus=4)
    fitted = fit_shares(weight * rng.lognormal(0.0, 0.3, size=weight.shape), placement, 4)
    table, length = route_tables(fitted)
    layer, expert = (int(v) for v in np.argwhere(length == ROUTE_TICKETS)[0])
    config = ModelConfig(num_experts=16, num_layers=2, hidden_size=32, intermediate_size=16)
    source = SyntheticSource(config)
    device = torch.device("cuda")
    model = build_model(source, fitted, EPGroup(device=device))
    state = EPLBState(fitted, window_size=4, device=device)
    experts = model.moe_layers[layer]
    experts.eplb_state = EPLBLayerState()
    experts.eplb_state.set_layer_state(layer, state)
    assert experts.eplb_state.route_table is not None
    assert experts.eplb_state.route_table.device.type == "cuda"
    ids = torch.full((ROUTE_TICKETS * 2, 1), expert, dtype=torch.long, device=device)
    slots = experts.physical_slots(ids, token_offset=3).flatten().cpu().numpy()
    got = np.bincount(slots, minlength=fitted.num_physical) / slots.size
    assert fitted.share is not None
    want = fitted.share[layer] * (fitted.phy2log[layer] == expert)
    np.testing.assert_allclose(got, want)
    hidden = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
    out = model.layers[layer](hidden.to(device)).float().cpu()
    torch.testing.assert_close(out, dense_reference(source, layer, hidden), rtol=1e-4, atol=1e-5)

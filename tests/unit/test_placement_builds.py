"""The placement kernels' two builds (numba's JIT and the ahead-of-time module) agree, and the
AOT one is used only while it matches the sources (issue 19: a fast first run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_placement_policies import problems

from moe_worker.eplb.policy import POLICIES, compute_placement, jit
from moe_worker.eplb.policy import default_placement as static_placement


@pytest.fixture(scope="module")
def aot() -> Any:
    module = jit.aot_module()
    if module is None:
        if os.environ.get("CI"):  # `make setup` builds it: in CI its absence is a failure
            pytest.fail("the AOT kernels are not built (python -m moe_worker.eplb.policy.aot)")
        pytest.skip("the AOT kernels are not built here (make setup builds them)")
    return module


def placed_with(build: str, policy: str, **problem: Any) -> Any:
    module = jit.aot_module()

    def chosen(kernel: jit.RowKernel) -> Any:
        return kernel.jit if build == "jit" else getattr(module, kernel.name)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(jit, "build_for", chosen)
        return compute_placement(policy, **problem)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems(), policy=st.sampled_from(sorted(POLICIES)), drift=st.booleans())
def test_aot_and_jit_place_identically(aot: Any, problem: dict, policy: str, drift: bool) -> None:
    if drift:  # from a previous placement (what `incremental` moves from)
        num_layers, num_logical = problem["weight"].shape
        problem["previous"] = static_placement(num_layers, num_logical, problem["num_physical"])
    by_jit = placed_with("jit", policy, **problem)
    by_aot = placed_with("aot", policy, **problem)
    assert np.array_equal(by_jit.phy2log, by_aot.phy2log)


def test_large_shapes_agree(aot: Any) -> None:
    """The DeepSeek-V3 shape, global, node-aware and two slots per GPU."""
    rng = np.random.default_rng(3)
    weight = rng.lognormal(0.0, 0.8, size=(8, 256)) * 1000
    shapes = ((320, 64, 1, 1), (288, 32, 8, 4), (288, 144, 1, 1))
    for num_physical, num_gpus, groups, nodes in shapes:
        problem = dict(
            weight=weight, num_physical=num_physical, num_gpus=num_gpus, num_groups=groups,
            num_nodes=nodes,
        )  # fmt: skip
        by_jit = placed_with("jit", "balanced", **problem)
        by_aot = placed_with("aot", "balanced", **problem)
        assert np.array_equal(by_jit.phy2log, by_aot.phy2log), (num_physical, num_gpus)


def fake_module(digest: int) -> types.SimpleNamespace:
    return types.SimpleNamespace(source_digest=lambda: digest)


def test_a_stale_aot_build_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    current = jit.source_digest()
    for digest, usable in ((current, True), (current + 1, False)):
        module = fake_module(digest)
        monkeypatch.setattr(jit, "_aot", {})
        monkeypatch.setattr(jit.importlib, "import_module", lambda name, m=module: m)
        assert (jit.aot_module() is module) is usable
    monkeypatch.setattr(jit, "_aot", {})
    monkeypatch.setenv("MOE_EPLB_AOT", "off")
    assert jit.aot_module() is None


def test_digest_follows_the_kernel_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    before = jit.source_digest()
    packing = sys.modules["moe_worker.eplb.policy.packing"]
    real = jit.inspect.getsource
    monkeypatch.setattr(
        jit.inspect, "getsource", lambda m: real(m) + ("# edited\n" if m is packing else "")
    )
    assert jit.source_digest() != before


CHOICE = """
import json
from moe_worker.eplb.policy import jit, kernel_build, warm_up
aot = jit.aot_module()
kernel = jit.ROW_KERNELS["refine_rows"]
first = jit.build_for(kernel) is getattr(aot, "refine_rows")
build_before = kernel_build()
warm_up()
later = jit.build_for(kernel) is kernel.jit
print(json.dumps({"first_is_aot": first, "after_warm_up_is_jit": later,
                  "reported": [build_before, kernel_build()]}))
"""


def test_a_fresh_process_uses_aot_until_the_jit_is_compiled(aot: Any) -> None:
    answer = subprocess.run(
        [sys.executable, "-c", CHOICE], capture_output=True, text=True, timeout=300, check=True
    )
    assert json.loads(answer.stdout.strip().splitlines()[-1]) == {
        "first_is_aot": True,
        "after_warm_up_is_jit": True,
        "reported": ["numba-aot", "numba-jit"],
    }


def test_the_reported_build_names_a_compile_in_progress(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without an AOT build, a rank whose warm-up thread still compiles says ``compiling`` (the
    serving benchmark waits for it to end), and ``numba-lazy`` when nothing compiles yet."""
    import threading

    from moe_worker.eplb import policy

    kernel = policy.ROW_KERNELS["refine_rows"]
    monkeypatch.setattr(policy, "aot_available", lambda: False)
    monkeypatch.setattr(type(kernel), "jit_ready", lambda self: False)
    release = threading.Event()
    compiling = threading.Thread(target=release.wait, args=(30,))
    monkeypatch.setattr(policy, "_warming", [compiling])
    assert policy.kernel_build() == "numba-lazy"
    compiling.start()
    try:
        assert policy.kernel_build() == "compiling"
    finally:
        release.set()
        compiling.join()
    assert policy.kernel_build() == "numba-lazy"
    monkeypatch.setattr(policy, "HAVE_NUMBA", False)
    assert policy.kernel_build() == "python"

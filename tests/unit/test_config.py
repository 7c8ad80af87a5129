"""EPLBConfig: defaults, camelCase wire names, rules that name the field."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from moe_worker.config import EPLBConfig


def test_defaults() -> None:
    config = EPLBConfig()
    assert (config.window_size, config.step_interval, config.num_redundant_experts) == (
        1000,
        3000,
        0,
    )
    assert config.use_async and not config.log_balancedness
    assert config.log_balancedness_interval == 1
    assert (config.policy, config.communicator) == ("incremental", "auto")


def test_camel_case_round_trip() -> None:
    config = EPLBConfig.model_validate({"windowSize": 10, "useAsync": False, "policy": "deepseek"})
    assert config.window_size == 10 and not config.use_async
    assert config.model_dump(by_alias=True)["windowSize"] == 10


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"windowSize": 0}, "windowSize"),
        ({"stepInterval": -1}, "stepInterval"),
        ({"numRedundantExperts": -1}, "numRedundantExperts"),
        ({"logBalancednessInterval": 0}, "logBalancednessInterval"),
        ({"policy": "magic"}, "policy"),
        ({"communicator": "mpi"}, "communicator"),
        ({"windowSizes": 5}, "windowSizes"),
    ],
)
def test_invalid_values_name_the_field(data: dict, field: str) -> None:
    with pytest.raises(ValidationError) as info:
        EPLBConfig.model_validate(data)
    assert field in str(info.value)

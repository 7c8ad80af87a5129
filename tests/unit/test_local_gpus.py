"""`moe-eplb run --device cuda`: each local pod gets its own GPUs; too few is one clear error."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from moe_operator.api import MoEDeployment
from moe_operator.cli import app
from moe_operator.runtime.local import LocalGpuError, choose_device, local_gpus

ROOT = Path(__file__).resolve().parents[2]
TINY = yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())


def deployment(ep: int, gpus_per_pod: int, elastic_max: int | None) -> MoEDeployment:
    document = copy.deepcopy(TINY)
    document["spec"]["parallelism"] = {"pods": ep // gpus_per_pod, "gpusPerPod": gpus_per_pod}
    if elastic_max is None:
        document["spec"]["elastic"] = {"enabled": False}
    else:
        document["spec"]["elastic"].update(
            minExpertParallelSize=ep, maxExpertParallelSize=elastic_max
        )
    return MoEDeployment.model_validate(document)


def test_each_pod_gets_its_own_gpus_up_to_the_elastic_maximum() -> None:
    assert local_gpus(deployment(2, 1, 4), ["0", "1", "2", "3"]) == [["0"], ["1"], ["2"], ["3"]]
    # Visible ids are used as given (CUDA_VISIBLE_DEVICES may name any subset).
    visible = ["4", "5", "6", "7", "1"]
    assert local_gpus(deployment(2, 2, 4), visible) == [["4", "5"], ["6", "7"]]
    assert local_gpus(deployment(2, 1, None), ["0", "1"]) == [["0"], ["1"]]


def test_too_few_gpus_names_the_field_and_both_counts() -> None:
    with pytest.raises(LocalGpuError, match=r"spec\.elastic\.maxExpertParallelSize = 4 .*has 2"):
        local_gpus(deployment(2, 1, 4), ["0", "1"])
    with pytest.raises(LocalGpuError, match=r"spec\.parallelism\.pods x gpusPerPod = 2 .*has 1"):
        local_gpus(deployment(2, 1, None), ["0"])


def test_run_with_too_few_gpus_exits_2_before_starting_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    report = tmp_path / "out" / "run.json"
    result = CliRunner().invoke(
        app,
        ["run", str(ROOT / "examples" / "tiny.yaml"), "--device", "cuda", "--report", str(report)],
    )
    assert result.exit_code == 2
    assert "--device cuda: spec.elastic.maxExpertParallelSize" in result.stderr
    assert "this machine has 0" in result.stderr
    assert not report.exists()
    tiny = str(ROOT / "examples" / "tiny.yaml")
    wrong = CliRunner().invoke(app, ["run", tiny, "--device", "tpu"])
    assert wrong.exit_code == 2 and "--device: must be cpu, cuda or auto" in wrong.stderr


def test_auto_takes_the_gpus_only_when_every_rank_gets_one() -> None:
    tiny = deployment(2, 1, 4)  # up to 4 ranks
    assert choose_device("auto", tiny, ["0", "1", "2", "3"]) == ("cuda", "local GPUs 0,1,2,3")
    device, why = choose_device("auto", tiny, ["0"])
    assert device == "cpu" and "maxExpertParallelSize = 4 ranks need 4 GPUs" in why
    assert choose_device("auto", tiny, []) == ("cpu", "CPU: no local GPU")
    assert choose_device("cpu", tiny, ["0", "1", "2", "3"])[0] == "cpu"
    assert choose_device("cuda", tiny, [])[0] == "cuda"  # checked (and refused) when pods start


def test_visible_gpus_from_cuda_visible_devices_or_nvidia_smi(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from moe_operator.runtime.local import visible_gpus

    smi = tmp_path / "nvidia-smi"
    smi.write_text(
        "#!/bin/sh\necho 'GPU 0: NVIDIA H100 (UUID: a)'\necho '  MIG 1g.10gb Device 0: (UUID: m)'\n"
        "echo 'GPU 1: NVIDIA H100 (UUID: b)'\n"
    )
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert visible_gpus() == ["0", "1"]  # MIG lines are not GPUs of their own here
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3, 5")
    assert visible_gpus() == ["3", "5"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    assert visible_gpus() == []

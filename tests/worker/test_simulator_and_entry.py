"""Routing simulator workloads, worker config, and `python -m moe_worker` as real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from pydantic import ValidationError

from distributed import free_port
from moe_worker.config import ModelConfig, RankEnv, WorkerConfig, WorkloadConfig
from moe_worker.model.simulator import RoutingSimulator

MODEL = ModelConfig(num_experts=16, top_k=2, num_layers=2, hidden_size=16, intermediate_size=8)
TRACE = Path(__file__).resolve().parents[2] / "examples" / "loads" / "qwen2_57b_a14b_sharegpt.json"


def routed_counts(simulator: RoutingSimulator, steps: range) -> np.ndarray:
    counts = np.zeros((2, 16))
    for step in steps:
        for layer, ids in enumerate(simulator.batch(step).routed):
            counts[layer] += np.bincount(ids.flatten().numpy(), minlength=16)
    return counts


def test_reproducible_and_rank_dependent() -> None:
    workload = WorkloadConfig(kind="zipf", tokens_per_step=32, seed=3)
    a, b = (
        RoutingSimulator(workload, MODEL, 2, rank=0),
        RoutingSimulator(workload, MODEL, 2, rank=0),
    )
    other = RoutingSimulator(workload, MODEL, 2, rank=1)
    assert all((x == y).all() for x, y in zip(a.batch(5).routed, b.batch(5).routed, strict=True))
    assert (a.batch(5).hidden == b.batch(5).hidden).all()
    assert not (a.batch(5).hidden == other.batch(5).hidden).all()
    ids = a.batch(0).routed[0]
    assert all(len(set(row.tolist())) == 2 for row in ids), "k distinct experts per token"


def test_zipf_is_skewed_and_uniform_is_not() -> None:
    zipf = routed_counts(
        RoutingSimulator(WorkloadConfig(kind="zipf", tokens_per_step=256), MODEL, 2), range(20)
    )
    uniform = routed_counts(
        RoutingSimulator(WorkloadConfig(kind="uniform", tokens_per_step=256), MODEL, 2), range(20)
    )
    assert (zipf.max(axis=1) / zipf.mean(axis=1) > 2.5).all()
    assert (uniform.max(axis=1) / uniform.mean(axis=1) < 1.3).all()
    # Each layer has its own order of hot experts.
    popularity = RoutingSimulator(WorkloadConfig(kind="zipf"), MODEL, 2).popularity(0)
    assert not np.array_equal(np.argsort(popularity[0]), np.argsort(popularity[1]))


def test_drift_moves_the_hot_spot() -> None:
    simulator = RoutingSimulator(WorkloadConfig(kind="drift", drift_period=100), MODEL, 2)
    early, later = simulator.popularity(0), simulator.popularity(50)
    assert early[0].argmax() != later[0].argmax()
    assert np.allclose(np.sort(early[0]), np.sort(later[0]))


def test_trace_replay_follows_the_trace() -> None:
    model = MODEL.model_copy(update={"num_experts": 64, "top_k": 8})
    workload = WorkloadConfig(kind="trace", trace_path=str(TRACE))
    popularity = RoutingSimulator(workload, model, 2).popularity(0)
    counts = np.asarray(json.loads(TRACE.read_text())["counts"], dtype=float)[:2]
    assert np.allclose(popularity, counts / counts.sum(axis=1, keepdims=True))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"epSize": 3, "model": {"numExperts": 8}}, "divisible by epSize"),
        ({"model": {"topK": 20}}, "topK"),
        ({"model": {"source": "checkpoint"}}, "path"),
        ({"workload": {"kind": "trace"}}, "tracePath"),
        ({"model": {"numExperts": 10, "numExpertGroups": 4}}, "numExpertGroups"),
    ],
)
def test_worker_config_rules(data: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        WorkerConfig.model_validate(data)


def test_rank_env() -> None:
    env = RankEnv.from_environ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": "1234"})
    assert (env.rank, env.world_size, env.master_port) == (1, 2, 1234)
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        RankEnv.from_environ({"RANK": "0"})
    # A rank beyond the initial group is a joiner (elastic scale-up), not an error.
    assert RankEnv.from_environ({"RANK": "2", "WORLD_SIZE": "2"}).rank == 2
    with pytest.raises(ValidationError, match="rank"):
        RankEnv.from_environ({"RANK": "-1", "WORLD_SIZE": "2"})


def test_two_worker_processes_run_and_rebalance(tmp_path: Path) -> None:
    config = {
        "epSize": 2,
        "steps": 24,
        "model": {"numExperts": 8, "numLayers": 2, "hiddenSize": 16, "intermediateSize": 8},
        "eplb": {"numRedundantExperts": 2, "windowSize": 8, "stepInterval": 8, "useAsync": False},
        "workload": {"kind": "zipf", "tokensPerStep": 64, "zipfExponent": 1.5},
        "device": "cpu",
    }
    # Fixed free ports: a rank's port-0 server could otherwise take the master port from the
    # OS before rank 0 listens on it (seen once: EADDRINUSE, the other rank's store client
    # talking to an HTTP server).
    base = free_port(consecutive=4)
    config["metrics"] = {"port": base + 1}  # ranks 0 and 1: base + 1, base + 2
    config["control"] = {"port": base + 3}
    path = tmp_path / "worker.yaml"
    path.write_text(yaml.safe_dump(config))
    port = str(base)
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "moe_worker", "--config", str(path)],
            env={**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_PORT": port},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    summaries = []
    for process in processes:
        out, err = process.communicate(timeout=180)
        assert process.returncode == 0, err
        summaries.append(json.loads(out.strip().splitlines()[-1]))
    for summary in summaries:
        assert summary["steps"] == 24 and summary["tokens"] == 24 * 64
        assert summary["rebalances"] == ["ok", "ok", "ok"]
    # Balanced after the last rebalance (window measured since it).
    assert summaries[0]["balancedness"] > 0.85


@pytest.mark.parametrize(
    ("text", "said"),
    [
        (
            "epSize: 0\neplb: {windowSize: -1}\n",
            "Input should be greater than 0 (and 1 more)",
        ),
        ("eplb: {policy: magic}\n", "eplb.policy: Input should be"),
        ("model: [unclosed\n", "while parsing a flow sequence"),
    ],
)
def test_bad_config_exits_2_with_one_error_line(tmp_path: Path, text: str, said: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    result = subprocess.run(
        [sys.executable, "-m", "moe_worker", "--config", str(path)],
        env={**os.environ, "RANK": "0", "WORLD_SIZE": "1"},
        capture_output=True,
        text=True,
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {path}: ") and said in lines[0], lines[0]
    assert "https://" not in lines[0] and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"model": {"dtype": "float16"}}, "model.dtype: float16 needs a GPU"),
        ({"eplb": {"communicator": "torch_nccl"}}, "eplb.communicator: torch_nccl needs GPUs"),
    ],
)
def test_engine_rejects_what_the_cpu_cannot_run(data: dict, message: str) -> None:
    import torch

    from moe_worker.engine import check_platform

    with pytest.raises(ValueError, match=message):
        check_platform(WorkerConfig.model_validate(data), torch.device("cpu"))


def test_pod_launcher_starts_one_process_per_local_rank(tmp_path: Path) -> None:
    """As in a StatefulSet pod: POD_NAME gives the ordinal, LOCAL_WORLD_SIZE the ranks per pod."""
    config = {
        "epSize": 2,
        "steps": 5,
        "model": {"numExperts": 8, "numLayers": 1, "hiddenSize": 16, "intermediateSize": 8},
        "eplb": {"numRedundantExperts": 2, "useAsync": False},
        "metrics": {"port": free_port(consecutive=2)},
        "control": {"port": 0},
        "device": "cpu",
    }
    path = tmp_path / "worker.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {
        **os.environ,
        "POD_NAME": "demo-0",
        "LOCAL_WORLD_SIZE": "2",
        "WORLD_SIZE": "2",
        "MASTER_PORT": str(free_port()),
    }
    env.pop("RANK", None)
    result = subprocess.run(
        [sys.executable, "-m", "moe_worker", "--config", str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    summaries = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert sorted(s["rank"] for s in summaries) == [0, 1]
    assert all(s["steps"] == 5 for s in summaries)

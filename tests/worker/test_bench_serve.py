"""`moe-eplb bench-serve` against a real `moe-eplb serve` (a tiny random Qwen3-MoE, EP 2, CPU):
every request completes with the planned lengths, the JSON report adds up, requests the server
refuses are reported as failures with their HTTP status, not lost, and the ranks' serving
metrics (promtool-clean) count the same requests and tokens the client saw."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from hf_checkpoints import save_checkpoint
from serving_harness import ROOT, ServeProcess


def bench_serve(url: str, *args: str) -> dict:  # type: ignore[type-arg]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "operator"), str(ROOT / "worker")]),
    }
    done = subprocess.run(
        [sys.executable, "-m", "moe_operator.cli", "bench-serve", url, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_bench_serve_drives_the_served_model(tmp_path: Path) -> None:
    model_dir = save_checkpoint(tmp_path / "qwen3", "qwen3_moe")
    with ServeProcess(model_dir, 2, {"serving": {"maxModelLen": 128}}, tmp_path) as server:
        report = bench_serve(
            server.url + "/v1",
            "--concurrency", "4",
            "--requests", "16",
            "--duration", "120",
            "--prompt-words", "6",
            "--prompt-dist", "uniform",
            "--output-tokens", "5",
            "--drift-period", "1",
            "--out", str(tmp_path / "report.json"),
        )  # fmt: skip
        refused = bench_serve(
            server.url, "--rate", "20", "--requests", "3", "--output-tokens", "1000"
        )
        expositions = [httpx.get(url + "/metrics", timeout=10).text for url in server.rank_urls]
    assert len(expositions) == 2
    samples = serving_samples(expositions)
    assert samples[("moe_request_success_total", "length")] == 16
    assert samples[("moe_request_success_total", "stop")] == 0
    assert samples[("moe_generation_tokens_total", "")] == 16 * 5
    assert samples[("moe_prompt_tokens_total", "")] == report["prompt_tokens"]
    assert samples[("moe_time_to_first_token_seconds_count", "")] == 16
    assert samples[("moe_request_queue_time_seconds_count", "")] == 16
    assert samples[("moe_inter_token_latency_seconds_count", "")] == 16 * 4
    assert samples[("moe_e2e_request_latency_seconds_count", "")] == 16
    # the operator's per-rank load (rate of moe_tokens_processed_total) is served tokens:
    # every prompt token (prefill) and every generated token but the last (decode)
    assert samples[("moe_tokens_processed_total", "")] == report["prompt_tokens"] + 16 * (5 - 1)
    assert samples[("moe_num_requests_running", "")] == 0
    assert samples[("moe_num_requests_waiting", "")] == 0
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is missing: `make setup` installs Debian's prometheus package")
    for text in expositions:
        check = subprocess.run(
            [promtool, "check", "metrics"], input=text, capture_output=True, text=True
        )
        assert check.returncode == 0, check.stdout + check.stderr
    assert report["requests_completed"] == 16 and report["requests_failed"] == 0
    assert report["output_tokens"] == 16 * 5 and report["finish_reasons"] == {"length": 16}
    assert report["prompt_tokens"] > 16 * 6  # byte-level tokens: several per word
    assert report["ttft_p50_ms"] > 0 and report["itl_p50_ms"] > 0
    assert report["e2e_p99_ms"] >= report["e2e_p50_ms"] >= report["ttft_p50_ms"]
    assert json.loads((tmp_path / "report.json").read_text()) == report
    assert refused["requests_failed"] == 3 and refused["failures"] == {"HTTP 400": 3}
    assert refused["requests_completed"] == 0


def serving_samples(expositions: list[str]) -> dict[tuple[str, str], float]:
    """Serving samples summed over ranks: (sample name, finished_reason or "") -> value."""
    total: dict[tuple[str, str], float] = {}
    for text in expositions:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                key = (sample.name, sample.labels.get("finished_reason", ""))
                if "le" not in sample.labels:
                    total[key] = total.get(key, 0.0) + sample.value
    return total


def test_bench_serve_names_the_option_it_refuses() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "operator") + os.pathsep + str(ROOT / "worker")}
    for args, message in [
        (["--duration", "5"], "--concurrency (or --rate): required"),
        (["--rate-profile", "0:2,x"], "--rate-profile: 'x' is not SECONDS:REQUESTS_PER_S"),
        (["--concurrency", "0"], "--concurrency: Input should be greater than 0"),
        (["--concurrency", "2", "--prompt-dist", "zipf"], "--prompt-words/--prompt-dist:"),
    ]:
        done = subprocess.run(
            [sys.executable, "-m", "moe_operator.cli", "bench-serve", "http://127.0.0.1:9", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2, done.stderr
        assert done.stderr.strip().startswith(f"error: {message}"), done.stderr
        assert len(done.stderr.strip().splitlines()) == 1

"""`moe-eplb run`: the tiny deployment as local processes under the operator's policy loop."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from openai import OpenAI

from distributed import free_port

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def first_requests(url: str) -> list[str]:
    """The README's first requests against the demo's endpoint: the curl line's body (posted
    with httpx) and the ``openai`` client's completion; returns their texts."""
    body = {"model": "synthetic-qwen3_moe", "prompt": "Hello", "max_tokens": 8}
    answer = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    completion = client.completions.create(
        model="synthetic-qwen3_moe", prompt="Hello", max_tokens=8
    )
    return [answer.json()["choices"][0]["text"], completion.choices[0].text]


def run_tiny(tmp_path: Path, document: dict) -> tuple[dict, str, list[str]]:
    """``moe-eplb run`` of ``document`` on a free port; the README's first requests are sent
    to its endpoint while it runs."""
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(document))
    report = tmp_path / "out" / "run.json"
    port = free_port()
    command = [str(Path(sys.executable).parent / "moe-eplb"), "run", str(path)]
    command += ["--report", str(report), "--check-outputs", "--port", str(port)]
    out, err = tmp_path / "run.out", tmp_path / "run.err"
    with out.open("w") as stdout, err.open("w") as stderr:
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr, text=True)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 120
            while True:
                assert process.poll() is None, err.read_text()[-2000:]
                try:
                    if httpx.get(f"{url}/v1/models", timeout=5).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, "the endpoint never served"
                time.sleep(0.5)
            texts = first_requests(url)
            code = process.wait(timeout=400)
        finally:
            if process.poll() is None:
                process.kill()
    assert code == 0, out.read_text()[-2000:] + err.read_text()[-2000:]
    assert report.with_suffix(".png").stat().st_size > 10_000
    return json.loads(report.read_text()), out.read_text(), texts


def test_run_serves_the_workload_remaps_and_resizes_with_no_request_lost(tmp_path: Path) -> None:
    """The tiny example as it is: its traffic's drifting prompt mix sags balancedness and the
    policy remaps; its burst scales EP 2 -> 3 -> 4 and back; no request fails and every check
    answer, at every EP size, equals the single-process reference's."""
    document = yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())
    # only the policy remaps within the run (besides the workers' one rebalance when their
    # window first fills): their periodic rebalance is far away
    assert document["spec"]["eplb"]["stepInterval"] >= 100000
    report, stdout, texts = run_tiny(tmp_path, document)
    assert all(isinstance(text, str) for text in texts), texts  # the README's requests work
    threshold = report["threshold"]
    points, actions = report["points"], report["actions"]

    # only what the leader accepted counts; each accepted remap is seen done (the mapping
    # generation moved) and the report says when
    remaps = [a for a in actions if a["action"] == "remap" and a["outcome"] == "done"]
    assert remaps, f"no remap of the sagging balancedness was accepted and done: {actions}"
    assert all(r["finished_t"] >= r["t"] for r in remaps)
    assert all(
        a["outcome"] == "done" or a["outcome"].startswith("refused")
        for a in actions
        if a["action"] == "remap" and a["t"] < points[-1]["t"] - 10
    ), actions
    # A remap lifts the measured balancedness (over a refilled window: a layer's reading waits
    # for its window to hold load under the new maps) above the threshold within 8 s.
    lifted = [
        (r["t"], p["t"], p["balancedness"])
        for r in remaps
        for p in points
        if r["t"] < p["t"] <= r["t"] + 8 and p["balancedness"] > threshold
    ]
    assert lifted, f"no snapshot above {threshold} within 8 s of any remap: {remaps}"
    # ... and it stays above until the prompt mix drifts (its popularity ranking rotates every
    # driftPeriodS from the traffic's start)
    started = next(e["t"] for e in report["events"] if e["event"].startswith("traffic started"))
    period = document["spec"]["workload"]["driftPeriodS"]
    held = []
    for remap_t, lifted_t, _ in lifted:
        drift = started + period * math.ceil((lifted_t - started) / period)
        window = [p for p in points if lifted_t <= p["t"] < drift]
        if all(p["balancedness"] > threshold for p in window):
            held.append((remap_t, lifted_t, drift))
    assert held, f"no lifted balancedness held until the next drift: {lifted}"

    resizes = [
        (a["from_ep_size"], a["to_ep_size"])
        for a in actions
        if a["action"] == "resize" and a["outcome"] == "done"
    ]
    assert resizes[:2] == [(2, 3), (3, 4)], resizes
    assert (4, 3) in resizes and (3, 2) in resizes, resizes
    sizes = [p["ep_size"] for p in points]
    assert 4 in sizes and sizes[-1] == 2

    # Real traffic throughout, none of it lost: the leaving ranks finished their requests
    # before they left, and the answers checked at every size equal the reference.
    traffic = report["traffic"]
    assert traffic["requests_failed"] == 0, traffic["failures"]
    assert traffic["requests_completed"] > 200, traffic
    assert max(p["requests_per_s"] or 0 for p in points) > 12  # the burst was served
    checks = report["checks"]
    assert checks["errors"] == [] and checks["mismatches"] == [], checks
    assert checks["checked"] >= 10 and {2, 4} <= set(checks["epSizes"]), checks
    assert report["podRestarts"] == 0
    ranks = report["ranks"]
    assert len([r for r in ranks if r["retired"]]) >= 2, "ranks 2 and 3 retired"
    assert all(r["recoveries"] == 0 for r in ranks), ranks
    assert sum(r.get("requestsFinished", 0) for r in ranks) >= traffic["requests_completed"]
    assert "0 failed" in stdout and "0 differ" in stdout


def test_run_rejects_an_invalid_file_with_the_field_named(tmp_path: Path) -> None:
    document = yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())
    document["spec"]["parallelism"]["pods"] = 0
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(document))
    result = subprocess.run(
        [str(Path(sys.executable).parent / "moe-eplb"), "run", str(path), "--duration", "5"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "spec.parallelism.pods" in result.stderr

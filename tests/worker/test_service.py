"""Worker service: metrics (promtool-clean, moving with the load), control API, health, SIGTERM."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from distributed import free_port
from moe_worker.eplb.controller import reading_min_steps
from moe_worker.eplb.policy import kernel_build
from moe_worker.metrics import SPECS, WorkerMetrics, reference_markdown
from moe_worker.server import WorkerStatus, serve_control, serve_metrics
from rank_processes import http

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "s3cret-token"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(scrape: dict, name: str, **labels: str) -> float:
    found = [
        v
        for (n, ls), v in scrape.items()
        if n == name and all((k, w) in ls for k, w in labels.items())
    ]
    assert found, f"no sample {name} {labels}"
    return sum(found)


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool is not installed (Debian package prometheus; `make setup` installs it)"
        )
    return path


def test_metrics_reference_is_generated_from_the_code() -> None:
    assert (ROOT / "docs" / "metrics.md").read_text() == reference_markdown()


def test_exposition_passes_promtool_and_names_follow_conventions() -> None:
    metrics = WorkerMetrics("demo", 0, "torch_gloo", "incremental", True, per_expert=True)
    metrics.observe_step(0.01, 64, 128)
    metrics.observe_rebalance("manual", "ok", 0.2, 4096, 3, "main", 0.004)
    metrics.set_balancedness(np.array([0.9, 0.8]))
    metrics.set_expert_load(np.ones((2, 4)))
    text = metrics.exposition().decode()
    result = subprocess.run(
        [promtool(), "check", "metrics"], input=text, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    names = {family.name for family in text_string_to_metric_families(text)}
    for spec in SPECS:
        assert spec.name.startswith("moe_")
        exposed = spec.name.removesuffix("_total") if spec.kind == "counter" else spec.name
        assert exposed in names, spec.name
    scrape = samples(text)
    assert value(scrape, "moe_rebalances_total", trigger="manual", result="ok") == 1
    assert value(scrape, "moe_rebalances_total", trigger="interval", result="failed") == 0
    assert value(scrape, "moe_rebalance_gain_per_moved_copy", model="main") == 0.004
    assert value(scrape, "moe_worker_info", communicator="torch_gloo", policy="incremental") == 1


def test_control_api_auth_and_errors() -> None:
    status = WorkerStatus(ready=True, state={"epSize": 2, "mappingGeneration": 4})
    server = serve_control(0, status, TOKEN, host="127.0.0.1")
    base = f"http://127.0.0.1:{server.port}"
    try:
        assert http("GET", f"{base}/v1/state")[0] == 401
        assert http("GET", f"{base}/v1/state", token="wrong")[0] == 401
        code, state = http("GET", f"{base}/v1/state", token=TOKEN)
        assert (
            code == 200 and state["mappingGeneration"] == 4 and state["rebalancePending"] is False
        )
        assert state["placementKernels"] == kernel_build()
        assert http("POST", f"{base}/v1/eplb/rebalance", token="wrong")[0] == 401
        assert status.rebalance_requested is False, "a rejected request changes nothing"
        code, body = http("POST", f"{base}/v1/eplb/rebalance", token=TOKEN, body=b"{not json")
        assert code == 422 and body == {
            "error": "body is not JSON: Expecting property name enclosed in double quotes"
        }
        code, body = http(
            "POST", f"{base}/v1/eplb/rebalance", token=TOKEN, body=b'{"layers": [1], "reason": 5}'
        )
        assert code == 422 and body["error"] == (
            "reason: Input should be a valid string; layers: Extra inputs are not permitted"
        ), "our own 422 text, not FastAPI's"
        code, body = http("POST", f"{base}/v1/eplb/rebalance", token=TOKEN, body=b"[1]")
        assert code == 422 and body["error"].startswith("body: ")
        assert status.rebalance_requested is False
        assert (
            http("POST", f"{base}/v1/eplb/rebalance", token=TOKEN, body=b'{"reason": "test"}')[0]
            == 202
        )
        assert status.rebalance_requested is True
        assert http("POST", f"{base}/v1/eplb/rebalance", token=TOKEN)[0] == 409
        assert http("GET", f"{base}/v1/nothing?x=1", token=TOKEN) == (
            404,
            {"error": "no route GET /v1/nothing?x=1"},
        )
        assert http("GET", f"{base}/v1/eplb/rebalance", token=TOKEN) == (
            404,
            {"error": "no route GET /v1/eplb/rebalance"},
        ), "a known path with another method is no route either (not 405)"
        assert (
            http("GET", f"{base}/docs")[0] == 404 and http("GET", f"{base}/openapi.json")[0] == 404
        )
    finally:
        server.shutdown()


def test_control_api_resize() -> None:
    status = WorkerStatus(ready=True, state={"epSize": 2})
    problems: dict[int, tuple[int, str]] = {3: (422, "8 experts do not fit on 3 ranks")}
    status.resize_check = problems.get
    server = serve_control(0, status, TOKEN, host="127.0.0.1")
    url = f"http://127.0.0.1:{server.port}/v1/ep/resize"
    try:
        assert http("POST", url, body={"epSize": 4})[0] == 401
        assert http("POST", url, token=TOKEN, body={}) == (422, {"error": "epSize: Field required"})
        code, body = http("POST", url, token=TOKEN, body={"epSize": 0, "extra": 1})
        assert code == 422 and body["error"] == (
            "epSize: Input should be greater than 0; extra: Extra inputs are not permitted"
        )
        assert http("POST", url, token=TOKEN, body={"epSize": 3}) == (
            422,
            {"error": "8 experts do not fit on 3 ranks"},
        )
        assert status.resize_target == 0
        assert http("POST", url, token=TOKEN, body={"epSize": 4, "reason": "scale"}) == (
            202,
            {"accepted": True, "epSize": 4},
        )
        assert (status.resize_target, status.resize_reason) == (4, "scale")
        assert http("POST", url, token=TOKEN, body={"epSize": 6}) == (
            409,
            {"error": "a resize is already pending or running"},
        )
        code, state = http("GET", url.replace("/v1/ep/resize", "/v1/state"), token=TOKEN)
        assert code == 200 and state["resize"] == {
            "target": 4,
            "phase": "requested",
            "reason": "scale",
        }
    finally:
        server.shutdown()


def get(url: str) -> tuple[int, str, bytes]:
    """Status, Content-Type and raw body of a GET."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read()


def test_metrics_health_and_readiness() -> None:
    status = WorkerStatus()
    exposition = b"# HELP x A gauge.\n# TYPE x gauge\nx 1.0\n"
    server = serve_metrics(0, lambda: exposition, status, host="127.0.0.1")
    disabled = serve_metrics(0, None, WorkerStatus(), host="127.0.0.1")
    base = f"http://127.0.0.1:{server.port}"
    try:
        assert get(f"{base}/metrics") == (200, CONTENT_TYPE_LATEST, exposition)
        assert get(f"http://127.0.0.1:{disabled.port}/metrics") == (
            404,
            "application/json",
            b'{"error": "metrics are disabled"}\n',
        )
        assert get(f"{base}/healthz") == (200, "application/json", b'{"status": "alive"}\n')
        assert http("GET", f"{base}/readyz") == (
            503,
            {"status": "not ready", "reason": "starting (group or weights)"},
        )
        status.ready = True
        assert http("GET", f"{base}/readyz") == (200, {"status": "ready"})
        status.resizing = True  # requests queue during a resize: still admitting
        assert http("GET", f"{base}/readyz") == (200, {"status": "ready"})
        status.leaving = True  # left out by a scale-down: new requests go elsewhere
        assert http("GET", f"{base}/readyz") == (
            503,
            {"status": "leaving", "reason": "finishing its requests"},
        )
        status.resizing, status.ready, status.leaving, status.standby = False, False, False, True
        assert http("GET", f"{base}/readyz") == (
            503,
            {"status": "standby", "reason": "waiting to join the group"},
        )
        assert http("POST", f"{base}/readyz") == (404, {"error": "no route POST /readyz"})
        assert http("GET", f"{base}/metrics/") == (404, {"error": "no route GET /metrics/"})
    finally:
        server.shutdown()
        disabled.shutdown()


def test_slow_scrapes_and_a_held_status_lock_block_nothing_else() -> None:
    """A slow exposition runs off the event loop: health, readiness and the control API answer
    meanwhile; while the step loop holds the status lock, /healthz still answers."""
    status = WorkerStatus(ready=True)
    release = threading.Event()

    def slow_exposition() -> bytes:
        release.wait(30)
        return b""

    metrics = serve_metrics(0, slow_exposition, status, host="127.0.0.1")
    control = serve_control(0, status, TOKEN, host="127.0.0.1")
    scrapes = [
        threading.Thread(target=get, args=(f"http://127.0.0.1:{metrics.port}/metrics",))
        for _ in range(4)
    ]
    try:
        for scrape_ in scrapes:
            scrape_.start()
        time.sleep(0.2)
        started = time.monotonic()
        assert http("GET", f"http://127.0.0.1:{metrics.port}/healthz")[0] == 200
        assert http("GET", f"http://127.0.0.1:{metrics.port}/readyz")[0] == 200
        assert http("GET", f"http://127.0.0.1:{control.port}/v1/state", token=TOKEN)[0] == 200
        assert time.monotonic() - started < 2
        with status.lock:
            assert http("GET", f"http://127.0.0.1:{metrics.port}/healthz")[0] == 200
    finally:
        release.set()
        for scrape_ in scrapes:
            scrape_.join(10)
        metrics.shutdown()
        control.shutdown()


def test_control_api_without_configured_token_refuses() -> None:
    status = WorkerStatus()
    server = serve_control(0, status, None, host="127.0.0.1")
    try:
        code, body = http("POST", f"http://127.0.0.1:{server.port}/v1/eplb/rebalance", token="x")
        assert code == 401 and "no control token" in body["error"]
        assert status.rebalance_requested is False
    finally:
        server.shutdown()


def start_workers(
    tmp_path: Path, world: int, metrics_port: int, control_port: int
) -> list[subprocess.Popen]:
    (tmp_path / "token").write_text(TOKEN + "\n")
    config = {
        "deployment": "svc-test",
        "epSize": world,
        "steps": 0,
        "model": {
            "numExperts": 8,
            "numLayers": 2,
            "hiddenSize": 16,
            "intermediateSize": 8,
            "topK": 2,
        },
        # The window (20000 steps) never fills during the test: no automatic rebalance.
        "eplb": {"numRedundantExperts": 2 * world, "windowSize": 20_000, "stepInterval": 1_000_000},
        "workload": {"kind": "zipf", "tokensPerStep": 64, "zipfExponent": 1.4},
        "metrics": {"port": metrics_port, "perExpert": True, "updateInterval": 5},
        "control": {"port": control_port, "tokenFile": str(tmp_path / "token")},
        "device": "cpu",
    }
    path = tmp_path / "worker.yaml"
    path.write_text(yaml.safe_dump(config))
    master = str(free_port())
    RUNNING[:] = [
        subprocess.Popen(
            [sys.executable, "-m", "moe_worker", "--config", str(path)],
            env={**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_PORT": master},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(world)
    ]
    return list(RUNNING)


RUNNING: list[subprocess.Popen] = []


def wait_for(condition, timeout: float = 60.0, what: str = "condition"):  # type: ignore[no-untyped-def]
    """Poll ``condition`` until truthy; fail at once if a worker process has died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for process in RUNNING:
            if process.poll() is not None:
                raise AssertionError(
                    f"a worker exited ({process.returncode}): {process.stderr.read()[-3000:]}"
                )
        try:
            result = condition()
        except (urllib.error.URLError, ConnectionError, AssertionError):
            result = None
        if result:
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def scrape(port: int) -> dict:
    code, text = http("GET", f"http://127.0.0.1:{port}/metrics")
    assert code == 200
    return samples(text)


def test_two_ranks_serve_metrics_control_and_stop_on_sigterm(tmp_path: Path) -> None:
    metrics_port, control_port = free_port(), free_port()
    processes = start_workers(tmp_path, 2, metrics_port, control_port)
    ports = [metrics_port, metrics_port + 1]
    try:
        for port in ports:
            wait_for(
                lambda port=port: http("GET", f"http://127.0.0.1:{port}/readyz")[0] == 200,
                what="readyz",
            )
            assert http("GET", f"http://127.0.0.1:{port}/healthz")[0] == 200
        before = wait_for(
            lambda: (s := scrape(ports[0])) and value(s, "moe_steps_total") >= 40 and s,
            what="a full window",
        )
        b0 = value(before, "moe_balancedness")
        assert b0 < 0.9, "zipf load on the static placement is unbalanced"
        code, text = http("GET", f"http://127.0.0.1:{ports[0]}/metrics")
        lint = subprocess.run(
            [promtool(), "check", "metrics"], input=text, capture_output=True, text=True
        )
        assert lint.returncode == 0, lint.stdout + lint.stderr
        assert any(n == "moe_expert_load_tokens" for n, _ in before), (
            "per-expert series on the leader"
        )
        assert not any(n == "moe_expert_load_tokens" for n, _ in scrape(ports[1]))

        control = f"http://127.0.0.1:{control_port}"
        assert http("POST", f"{control}/v1/eplb/rebalance", token="nope")[0] == 401
        code, state = http("GET", f"{control}/v1/state", token=TOKEN)
        assert code == 200 and state["mappingGeneration"] == 0 and state["epSize"] == 2
        assert http("POST", f"{control}/v1/eplb/rebalance", token=TOKEN, body=b"[1, 2")[0] == 422
        assert http("POST", f"{control}/v1/eplb/rebalance", token=TOKEN)[0] == 202

        for port in ports:
            wait_for(
                lambda port=port: (
                    value(scrape(port), "moe_rebalances_total", trigger="manual", result="ok") == 1
                ),
                what="the manual rebalance on every rank",
            )
        steps_at_rebalance = value(scrape(ports[0]), "moe_steps_total")
        reading = reading_min_steps(20_000) + 40  # a fresh reading, then 40 steps more
        after = wait_for(
            lambda: (
                (s := scrape(ports[0]))
                and value(s, "moe_steps_total") >= steps_at_rebalance + reading
                and s
            ),
            what="a fresh balancedness reading after the rebalance",
        )
        assert value(after, "moe_mapping_generation") == 1
        assert value(after, "moe_balancedness") > max(0.9, b0 + 0.05)
        assert value(after, "moe_rebalance_moved_expert_copies_total") > 0
        assert value(after, "moe_rebalance_gain_per_moved_copy") > 0
        assert (
            value(after, "moe_rebalance_transferred_bytes_total") > 0
            or value(scrape(ports[1]), "moe_rebalance_transferred_bytes_total") > 0
        )
        for name in (
            "moe_steps_total",
            "moe_tokens_processed_total",
            "moe_rank_routed_tokens_total",
        ):
            assert value(after, name) > value(before, name)
        code, state = http("GET", f"{control}/v1/state", token=TOKEN)
        assert (
            state["lastRebalance"]["trigger"] == "manual"
            and state["lastRebalance"]["result"] == "ok"
        )

        RUNNING.clear()
        processes[1].send_signal(signal.SIGTERM)  # one rank's signal stops both at the same step
        for process in processes:
            out, err = process.communicate(timeout=60)
            assert process.returncode == 0, err
            summary = json.loads(out.strip().splitlines()[-1])
            assert summary["stopped_by_signal"] is True
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()


def test_single_rank_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    metrics_port, control_port = free_port(), free_port()
    (process,) = start_workers(tmp_path, 1, metrics_port, control_port)
    try:
        wait_for(lambda: value(scrape(metrics_port), "moe_steps_total") >= 5, what="steps")
        first = value(scrape(metrics_port), "moe_tokens_processed_total")
        wait_for(
            lambda: value(scrape(metrics_port), "moe_tokens_processed_total") > first,
            what="more tokens",
        )
        RUNNING.clear()
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0, err
        assert json.loads(out.strip().splitlines()[-1])["stopped_by_signal"] is True
    finally:
        if process.poll() is None:
            process.kill()

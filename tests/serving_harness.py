"""Run ``moe-eplb serve`` as a user does (its own process) and talk to it; greedy references.

``ServeProcess`` starts the CLI on a free port, waits (with a deadline) for its "serving ... at
URL" line and stops it with SIGINT. ``reference_greedy`` is transformers' own ``generate``;
``same_greedy`` accepts a difference only where the reference's top-2 logits were within
``NEAR_TIE`` at the first differing step.
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import torch
import yaml

NEAR_TIE = 1e-3
TOKEN = "test-control-token"
ROOT = Path(__file__).resolve().parent.parent


class ServeProcess:
    """``moe-eplb serve MODEL_DIR --port 0 ...`` in its own process."""

    def __init__(
        self,
        model_dir: Path,
        ep_size: int,
        config: dict[str, Any] | None,
        workdir: Path,
        timeout_s: float = 300.0,
        device: str = "cpu",
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.lines: list[str] = []
        args = [sys.executable, "-m", "moe_operator.cli", "serve", str(model_dir)]
        args += ["--ep-size", str(ep_size), "--port", "0", "--device", device, *extra_args]
        if config is not None:
            config_file = workdir / "serve-config.yaml"
            config_file.write_text(yaml.safe_dump(config))
            args += ["--config", str(config_file)]
        env = {
            **os.environ,
            "MOE_CONTROL_TOKEN": TOKEN,
            "PYTHONPATH": os.pathsep.join(
                [str(ROOT / "operator"), str(ROOT / "worker"), os.environ.get("PYTHONPATH", "")]
            ),
            "OMP_NUM_THREADS": "1",
        }
        self.process = subprocess.Popen(
            args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self._ready = threading.Event()
        self.url = ""
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(timeout_s) or not self.url:
            self.stop()
            raise AssertionError("serve did not come up:\n" + "\n".join(self.lines[-30:]))

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip())
            match = re.search(r"serving \S+ at (http://\S+)/v1", line)
            if match:
                self.url = match.group(1)
                self._ready.set()
        self._ready.set()  # exited

    @property
    def rank_urls(self) -> list[str]:
        """Each rank's own API (and /metrics), as `serve` reported them ready."""
        found = (re.match(r"\s*(http://\S+) ready$", line) for line in self.lines)
        return sorted({match.group(1) for match in found if match})

    def state(self) -> dict[str, Any]:
        response = httpx.get(
            self.url + "/v1/state", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10
        )
        response.raise_for_status()
        return dict(response.json())

    def rebalance(self) -> httpx.Response:
        return httpx.post(
            self.url + "/v1/eplb/rebalance",
            headers={"Authorization": f"Bearer {TOKEN}"},
            json={"reason": "test"},
            timeout=10,
        )

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return int(self.process.wait())

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *_: Any) -> None:
        self.stop()


def random_placement_file(path: Path, layers: int, experts: int, slots: int, seed: int) -> Path:
    """``verify``'s random placement [layers, slots] as the JSON of ``moe-eplb plan --out``."""
    from moe_worker.verify import random_placement

    path.write_text(json.dumps(random_placement(layers, experts, slots, seed).to_json()))
    return path


def random_placement_config(
    path: Path, layers: int, experts: int, slots: int, seed: int, **eplb: Any
) -> dict[str, Any]:
    """A serve ``--config`` starting from a random placement written to ``path`` (no periodic
    rebalance; a 16-token step budget, 8 requests running), ``eplb`` fields added."""
    placement = random_placement_file(path, layers, experts, slots, seed)
    return {
        "eplb": {
            "numRedundantExperts": slots - experts,
            "initialPlacementFile": str(placement),
            "windowSize": 1000,
            "stepInterval": 100000,
            **eplb,
        },
        "serving": {"maxBatchTokens": 16, "maxRunningRequests": 8},
    }


def generate_in_process(
    engine: Any, prompts: list[list[int]], max_new_tokens: int
) -> list[list[int]]:
    """Greedy tokens of ``prompts`` (end of sequence ignored), all submitted to a
    ``ServingEngine`` at once and stepped until done in this process."""
    from moe_worker.serving.backend import SamplingParams

    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0, ignore_eos=True)
    tokens: list[list[int]] = [[] for _ in prompts]
    for i, prompt in enumerate(prompts):
        engine.submit(str(i), prompt, params, lambda out, i=i: tokens[i].append(out.token_id))
    while engine.has_work():
        engine.step()
    return tokens


def complete_ids(
    url: str, prompt: list[int], max_tokens: int, stream: bool = False, **extra: Any
) -> list[int]:
    """Greedy token ids of one completion request (``return_token_ids``), streamed or not."""
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "return_token_ids": True,
        "stream": stream,
        **extra,
    }
    with httpx.Client(timeout=300) as client:
        if not stream:
            response = client.post(url + "/v1/completions", json=body)
            assert response.status_code == 200, response.text
            return list(response.json()["choices"][0]["token_ids"])
        ids: list[int] = []
        with client.stream("POST", url + "/v1/completions", json=body) as response:
            assert response.status_code == 200, response.read()
            for line in response.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    for choice in json.loads(line[6:])["choices"]:
                        ids.extend(choice.get("token_ids") or [])
        return ids


def reference_greedy(model: Any, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy ``generate``, end of sequence ignored as ``ignore_eos`` does
    (min_new_tokens would instead forbid eos, changing the tokens)."""
    config = copy.deepcopy(model.generation_config)
    config.eos_token_id = [1 << 30]  # an id no token has (None falls back to the model)
    config.pad_token_id = 0
    config.do_sample = False
    config.max_new_tokens = max_new_tokens
    with torch.no_grad():
        ids = torch.tensor([prompt], device=model.device)
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            generation_config=config,
        )
    return [int(t) for t in out[0, len(prompt) :]]


def same_greedy(
    model: Any, prompt: list[int], want: list[int], got: list[int], near_tie: float = NEAR_TIE
) -> str | None:
    """None when ``got`` equals ``want`` (or first differs at a near tie of the reference),
    else a description of the difference."""
    if len(got) != len(want):
        return f"{len(got)} tokens, the reference {len(want)}"
    for step, (a, b) in enumerate(zip(want, got, strict=True)):
        if a == b:
            continue
        with torch.no_grad():
            ids = torch.tensor([prompt + want[:step]], device=model.device)
            logits = model(ids).logits[0, -1].float()
        top2 = torch.topk(logits, 2).values
        gap = float(top2[0] - top2[1])
        if gap < near_tie:
            return None
        return f"step {step}: got {b}, reference {a} (top-2 gap {gap:.2e})"
    return None


def wait_for(condition: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)

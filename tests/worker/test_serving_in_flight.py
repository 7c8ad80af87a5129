"""Elastic EP with requests in flight: a resize 2 -> 4 -> 2 under steady load through a router
(as a Service spreads requests) loses no request, and every answer equals transformers' own
greedy generate; a killed rank fails only the requests it had admitted, the other rank's clients
see none fail, and the recovered group answers correctly."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch

from distributed import free_port
from hf_checkpoints import E, save_checkpoint
from rank_processes import RankProcesses
from serving_harness import reference_greedy, same_greedy

MAX_TOKENS = 12


@dataclass
class Outcome:
    prompt: int
    tokens: list[int] | None = None
    error: str | None = None
    finished_at: float = 0.0


@dataclass
class LoadLoop:
    """``clients`` threads, each sending one greedy completion after another to its URL (a
    router, or one rank), until stopped. Not admitted (connection refused, 503) is retried, as
    clients do; an admitted request that breaks or errs is a failure."""

    urls: list[str]
    prompts: list[list[int]]
    outcomes: list[Outcome] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> LoadLoop:
        for index, url in enumerate(self.urls):
            thread = threading.Thread(target=self._client, args=(index, url), daemon=True)
            thread.start()
            self.threads.append(thread)
        return self

    def finished(self) -> int:
        with self.lock:
            return len(self.outcomes)

    def _client(self, index: int, url: str) -> None:
        body: dict[str, Any] = {
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
            "ignore_eos": True,
            "return_token_ids": True,
        }
        turn = index
        with httpx.Client(timeout=120, trust_env=False) as client:
            while not self.stop.is_set():
                prompt = turn % len(self.prompts)
                turn += len(self.urls)
                outcome = self._send(client, url, {**body, "prompt": self.prompts[prompt]})
                outcome.prompt, outcome.finished_at = prompt, time.monotonic()
                with self.lock:
                    self.outcomes.append(outcome)

    def _send(self, client: httpx.Client, url: str, body: dict[str, Any]) -> Outcome:
        while not self.stop.is_set():
            try:
                response = client.post(url + "/v1/completions", json=body)
            except httpx.ConnectError:  # nobody listening: not admitted, try again
                time.sleep(0.1)
                continue
            except httpx.HTTPError as exc:  # admitted, then broken off
                return Outcome(-1, error=f"{type(exc).__name__}: {exc}")
            if response.status_code == 503:
                time.sleep(min(float(response.headers.get("retry-after", "0.2")), 0.5))
                continue
            if response.status_code != 200:
                return Outcome(-1, error=f"{response.status_code}: {response.text}")
            return Outcome(-1, tokens=list(response.json()["choices"][0]["token_ids"]))
        return Outcome(-1, error="stopped before it was admitted")

    def end(self) -> list[Outcome]:
        self.stop.set()
        for thread in self.threads:
            thread.join(180)
        return [o for o in self.outcomes if o.error != "stopped before it was admitted"]


def wrong_answers(model: Any, prompts: list[list[int]], outcomes: list[Outcome]) -> list[str]:
    references = [reference_greedy(model, prompt, MAX_TOKENS) for prompt in prompts]
    problems = []
    for outcome in outcomes:
        if outcome.tokens is None:
            continue
        problem = same_greedy(
            model, prompts[outcome.prompt], references[outcome.prompt], outcome.tokens
        )
        if problem is not None:
            problems.append(f"prompt {outcome.prompt}: {problem}")
    return problems


def serving_ranks(tmp_path: Path, world: int, max_world: int) -> tuple[RankProcesses, Any, int]:
    from transformers import AutoModelForCausalLM

    model_dir = save_checkpoint(tmp_path / "model", "qwen2_moe", layout="fused")
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    api_port = free_port(consecutive=max_world)
    config = {
        "deployment": "in-flight",
        "model": {"source": "checkpoint", "path": str(model_dir), "numExperts": E},
        "serving": {
            "enabled": True,
            "port": api_port,
            "maxBatchTokens": 16,
            "maxRunningRequests": 4,
        },
        # 2 ranks x 5 slots; 4 ranks hold the same 5 slots each (12 redundant copies).
        "eplb": {"numRedundantExperts": 2, "windowSize": 50, "stepInterval": 100000},
        "elastic": {"collectiveTimeoutS": 20, "replacementTimeoutS": 90, "drainTimeoutS": 60},
    }
    return RankProcesses(tmp_path, config, world=world), reference, api_port


def resize(ranks: RankProcesses, ep_size: int) -> None:
    """Ask the leader for ``ep_size`` ranks and wait until the new generation is committed."""
    code, body = ranks.control("POST", "/v1/ep/resize", {"epSize": ep_size})
    assert code == 202, body
    ranks.wait(
        lambda: (
            ranks.state()["epSize"] == ep_size and ranks.state()["resize"]["phase"] == "committed"
        ),
        120,
        f"the resize to {ep_size} to commit",
    )


def start_standby(ranks: RankProcesses, joiners: list[int]) -> None:
    """A scale-up's new pods: started, registered, not admitting until the resize."""
    for rank in joiners:
        ranks.start(rank)
    ranks.wait(lambda: ranks.state()["standbyRanks"] == joiners, 120, "the joiners on standby")


def admit(ranks: RankProcesses, joiners: list[int], ep_size: int) -> None:
    """Resize up to ``ep_size``; wait until the joiners take requests."""
    resize(ranks, ep_size)
    ranks.wait(lambda: all(ranks.readyz(r)[0] == 200 for r in joiners), 60, "joiners admit")


def retire(ranks: RankProcesses, leavers: list[int], ep_size: int) -> None:
    """Resize down to ``ep_size``; the leavers exit once drained."""
    ranks.expected_exits.update(leavers)
    resize(ranks, ep_size)


def stop_serving(load: LoadLoop | None, router: Any, ranks: RankProcesses) -> None:
    """Stop the clients, the router and the ranks (whichever were started)."""
    if load is not None:
        load.stop.set()
    if router is not None:
        router.shutdown()
    ranks.stop()


def prompts_for(seed: int, count: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 20, (count,), generator=generator).tolist()
    return [torch.randint(0, 256, (n,), generator=generator).tolist() for n in lengths]


def test_resize_2_4_2_under_load_loses_no_request(tmp_path: Path) -> None:
    from moe_worker.asgi import start_server
    from moe_worker.serving.router import router_app

    ranks, reference, api_port = serving_ranks(tmp_path, world=2, max_world=4)
    urls = [f"http://127.0.0.1:{api_port + rank}" for rank in range(4)]
    router = None
    load = None
    try:
        for rank in (0, 1):
            ranks.start(rank)
        ranks.wait(lambda: all(ranks.readyz(r)[0] == 200 for r in (0, 1)), 120, "ready")
        router = start_server(router_app(urls), 0, "127.0.0.1", "router")
        prompts = prompts_for(seed=5, count=8)
        load = LoadLoop([f"http://127.0.0.1:{router.port}"] * 6, prompts).start()
        ranks.wait(lambda: load.finished() >= 6, 120, "the first answers")

        start_standby(ranks, [2, 3])
        assert ranks.readyz(2) == (
            503,
            {"status": "standby", "reason": "waiting to join the group"},
        )
        admit(ranks, [2, 3], 4)
        served_at_4 = load.finished()
        ranks.wait(lambda: load.finished() >= served_at_4 + 12, 120, "answers at EP 4")

        retire(ranks, [2, 3], 2)
        leavers = [ranks.summary(rank) for rank in (2, 3)]
        assert all(s["retired"] for s in leavers), leavers
        assert sum(s["requestsFinished"] for s in leavers) > 0, leavers  # they served load
        served_at_2 = load.finished()
        ranks.wait(lambda: load.finished() >= served_at_2 + 12, 120, "answers at EP 2 again")
        outcomes = load.end()
        failures = [o.error for o in outcomes if o.error is not None]
        assert failures == [], failures
        assert wrong_answers(reference, prompts, outcomes) == []
        assert len(outcomes) >= 36
    finally:
        stop_serving(load, router, ranks)


def test_a_killed_rank_fails_only_its_own_requests(tmp_path: Path) -> None:
    ranks, reference, api_port = serving_ranks(tmp_path, world=2, max_world=2)
    urls = [f"http://127.0.0.1:{api_port + rank}" for rank in range(2)]
    survivor = victim = None
    try:
        for rank in (0, 1):
            ranks.start(rank)
        ranks.wait(lambda: all(ranks.readyz(r)[0] == 200 for r in (0, 1)), 120, "ready")
        prompts = prompts_for(seed=9, count=6)
        survivor = LoadLoop([urls[0]] * 3, prompts).start()  # clients of rank 0 only
        victim = LoadLoop([urls[1]] * 3, prompts).start()  # clients of rank 1 only
        ranks.wait(lambda: victim.finished() >= 3 and survivor.finished() >= 3, 120, "answers")

        killed_at = time.monotonic()
        ranks.kill(1)
        ranks.expected_exits.add(1)
        ranks.wait(lambda: ranks.state()["resize"].get("phase") == "recovering", 60, "noticed")
        ranks.expected_exits.discard(1)
        ranks.start(1)  # the pod's replacement, same ordinal
        ranks.wait(
            lambda: (
                ranks.state()["recoveries"] >= 1 and ranks.state()["resize"]["phase"] == "committed"
            ),
            120,
            "the recovery",
        )
        ranks.wait(lambda: ranks.readyz(1)[0] == 200, 60, "the replacement to admit")
        recovered_at = time.monotonic()
        ranks.wait(
            lambda: sum(o.finished_at > recovered_at for o in victim.outcomes) >= 6,
            120,
            "the replacement's answers",
        )
        survivor_outcomes, victim_outcomes = survivor.end(), victim.end()
        assert [o.error for o in survivor_outcomes if o.error] == []
        victim_failures = [o for o in victim_outcomes if o.error is not None]
        # Only the requests caught by its death: each client's request in flight, and at most
        # one more per client (a retry that reached the dying process's listen backlog before
        # the kernel closed it, then reset), all broken off at the transport, none answered
        # with an error, and all before the replacement served.
        errors = [o.error or "" for o in victim_failures]
        assert len(victim_failures) <= 2 * 3, errors
        assert all(e.startswith(("RemoteProtocolError", "ReadError")) for e in errors), errors
        assert all(killed_at <= o.finished_at < recovered_at for o in victim_failures)
        after = [o for o in victim_outcomes if o.finished_at > recovered_at]
        assert after and all(o.error is None for o in after)
        state = ranks.state()
        assert state["epSize"] == 2 and state["resize"]["lostRanks"] == [1], state
        # every expert back in place: the answers that use them all equal the reference
        assert wrong_answers(reference, prompts, survivor_outcomes + victim_outcomes) == []
    finally:
        for load in (survivor, victim):
            if load is not None:
                load.stop.set()
        ranks.stop()

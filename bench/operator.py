"""Operator benchmark: many MoEDeployments created at once against KMock's API emulator.

The real operator (Kopf + moe_operator.handlers) runs in-process against the test emulator
(``tests/kube_emulator.py``) over HTTP on 127.0.0.1. All CRs are created concurrently; the
benchmark polls the emulator's state and reports the time until every CR has all its children
and a status for its generation, and per-CR latency (creation answered -> children and status
in place) p50/p99. The baseline in the same run is one CR alone (an idle operator's latency).

    python bench/operator.py [--count 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("MOE_OPERATOR_RESYNC_SECONDS", "300")
os.environ.setdefault("MOE_OPERATOR_METRICS_PORT", "0")

from kube_emulator import ClusterEmulator, running_cluster  # noqa: E402
from moe_operator.api import GROUP, PLURAL, VERSION  # noqa: E402
from moe_operator.k8s import KubeClient  # noqa: E402
from operator_harness import running_operator  # noqa: E402

CHILDREN = [
    ("v1", "configmaps", "{}-config"),
    ("v1", "secrets", "{}-control"),
    ("v1", "services", "{}-ranks"),
    ("v1", "services", "{}-metrics"),
    ("policy/v1", "poddisruptionbudgets", "{}"),
    ("networking.k8s.io/v1", "networkpolicies", "{}"),
    ("apps/v1", "statefulsets", "{}"),
]


def _done(cluster: ClusterEmulator, name: str) -> bool:
    cr = cluster.get(f"{GROUP}/{VERSION}", PLURAL, "default", name)
    if not cr or (cr.get("status") or {}).get("observedGeneration") != 1:
        return False
    return all(cluster.get(a, p, "default", n.format(name)) for a, p, n in CHILDREN)


async def _wave(cluster: ClusterEmulator, kube: KubeClient, names: list[str]) -> dict[str, Any]:
    template = yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())
    created: dict[str, float] = {}
    finished: dict[str, float] = {}

    async def create(name: str) -> None:
        document = json.loads(json.dumps(template))
        document["metadata"] = {"name": name, "namespace": "default"}
        await kube.create(document)
        created[name] = time.perf_counter()

    start = time.perf_counter()
    await asyncio.gather(*(create(name) for name in names))
    pending = set(names)
    while pending:
        now = time.perf_counter()
        for name in [n for n in pending if _done(cluster, n)]:
            finished[name] = now
            pending.discard(name)
        if now - start > 600:
            raise TimeoutError(f"{len(pending)} deployments not reconciled after 600 s")
        await asyncio.sleep(0.02)
    latencies = sorted(finished[n] - created[n] for n in names)
    return {
        "all_done_s": round(max(finished.values()) - start, 3),
        "latency_p50_s": round(statistics.median(latencies), 4),
        "latency_p99_s": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 4),
    }


async def run(count: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        async with running_cluster(Path(tmp)) as (cluster, kubeconfig):
            os.environ["KUBECONFIG"] = str(kubeconfig)
            async with running_operator(kubeconfig):
                kube = await KubeClient.connect()
                try:
                    baseline = await _wave(cluster, kube, ["solo"])
                    burst = await _wave(cluster, kube, [f"d{i:04d}" for i in range(count)])
                finally:
                    await kube.close()
                requests = len(cluster.calls)
    return {
        "bench": "operator",
        "deployments": count,
        "children_per_deployment": len(CHILDREN),
        "all_reconciled_s": burst["all_done_s"],
        "per_cr_latency_p50_s": burst["latency_p50_s"],
        "per_cr_latency_p99_s": burst["latency_p99_s"],
        "baseline_single_cr_latency_s": baseline["latency_p50_s"],
        "p50_over_baseline": round(burst["latency_p50_s"] / baseline["latency_p50_s"], 1),
        "api_requests": requests,
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
        "python": platform.python_version(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.count))))


if __name__ == "__main__":
    main()

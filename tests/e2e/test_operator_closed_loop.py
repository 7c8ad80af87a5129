"""The full loop on one machine: the operator (Kopf, on the KMock emulator) creates the
children; the StatefulSet's pods run as local processes from its pod template and serve the
API; the load generator sends requests through the pods' API ports (as through the Service); a
real Prometheus scrapes the ranks, the operator's policy reads PromQL from it (the load and
balancedness of that traffic) and asks the leader for a remap, and the workers carry it out.
Then live resizes and a killed rank (direct scrape, the routing simulator's load)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from distributed import free_port
from kube_emulator import running_cluster
from local_pods import LocalPods, pod_address
from moe_operator.api import GROUP, PLURAL, VERSION
from moe_operator.dashboards import ANNOTATION_EXPR, OPERATOR
from moe_operator.k8s import KubeClient
from moe_operator.loadgen.runner import run_traffic
from moe_operator.metrics_source import promql
from moe_worker.asgi import start_server
from moe_worker.config import TrafficConfig
from moe_worker.serving.router import router_app
from operator_harness import OperatorProcess, eventually, running_operator
from prometheus_server import for_prometheus, logged_queries, query, start_prometheus

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def manual_rebalances(text: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if (
                sample.name == "moe_rebalances_total"
                and labels.get("trigger") == "manual"
                and labels.get("result") == "ok"
            ):
                return sample.value
    return 0.0


# The pods run the routing simulator here: skewed, drifting expert load at a steady pace.
SIMULATOR = {
    "kind": "drift",
    "tokensPerStep": 64,
    "driftPeriod": 2400,
    "offeredTokensPerStep": 128,
    "stepsPerSecond": 20,
}


def has_data(base: str, expr: str, namespace: str = ".*", deployment: str = ".*") -> bool:
    try:
        filled = for_prometheus(expr, namespace, deployment).replace("[1h]", "[5m]")
        return bool(query(base, filled))
    except OSError:
        return False


async def test_promql_drives_a_remap_and_missing_metrics_degrade(tmp_path: Path) -> None:
    """spec.metrics.prometheusUrl set: the policy's snapshots come from PromQL only."""
    document = yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())
    document["metadata"]["namespace"] = "default"
    spec = document["spec"]
    spec["parallelism"] = {"pods": 1, "gpusPerPod": 2}  # one pod, two ranks
    api_port = free_port(consecutive=3)  # the pod's router, then its two ranks' APIs
    spec["serving"] = {"port": api_port, "maxBatchTokens": 128, "maxRunningRequests": 8}
    spec["elastic"] = {"enabled": False}
    spec["eplb"].update({"stepInterval": 1000000, "windowSize": 20})  # no periodic rebalance
    spec["remap"] = {
        "balancednessThreshold": 0.999,
        "sustainedSeconds": 0,
        "minIntervalSeconds": 3,
    }
    rank_port = free_port(consecutive=2)
    async with running_cluster(tmp_path) as (cluster, kubeconfig):
        os.environ["KUBECONFIG"] = str(kubeconfig)
        kube = await KubeClient.connect(user_agent="moe-tests")
        pods = LocalPods(cluster, "default", "tiny", tmp_path)
        # One Prometheus scrapes the pod's two ranks (on the pod's address, in the
        # deployment's namespace) and the operator (in its own namespace, "moe-system", as the
        # chart's ServiceMonitor has it scraped: its series keep their own namespace label).
        targets = [f"{pod_address(0)}:{rank_port}", f"{pod_address(0)}:{rank_port + 1}"]
        operator_target = f"127.0.0.1:{os.environ['MOE_OPERATOR_METRICS_PORT']}"
        server, prometheus = start_prometheus(
            tmp_path, targets, "default", operator=(operator_target, "moe-system")
        )
        spec["metrics"] = {"port": rank_port, "prometheusUrl": prometheus}
        spec["control"] = {"port": free_port()}

        def cr() -> dict:
            return cluster.get(f"{GROUP}/{VERSION}", PLURAL, "default", "tiny") or {}

        def degraded() -> dict:
            conditions = (cr().get("status") or {}).get("conditions") or []
            return next((c for c in conditions if c["type"] == "Degraded"), {})

        stop_traffic = False
        try:
            async with running_operator(kubeconfig):
                await kube.create(document)
                await eventually(
                    lambda: cluster.get("apps/v1", "statefulsets", "default", "tiny"), what="sts"
                )
                # Prometheus has seen the operator's action counter at 0 (so the annotation
                # query can see the first action) before any pod runs.
                await eventually(
                    lambda: has_data(
                        prometheus, 'moe_operator_actions_total{deployment="tiny"} == 0'
                    ),
                    timeout=60,
                    what="Prometheus scraping the operator",
                )
                pods.start(kube)
                await eventually(pods.ready, timeout=180, what="ranks ready")
                await eventually(
                    lambda: (cr().get("status") or {}).get("phase") == "Running", what="Running"
                )
                assert cr()["status"]["endpoint"] == f"http://tiny.default.svc:{api_port}/v1"
                # Requests through the pods' API (what the Service `tiny` reaches); the policy
                # reads the ranks' metrics of that traffic from Prometheus and asks the leader
                # for remaps.
                pods_api = [f"http://{pod_address(0)}:{api_port}"]  # the pod's port http
                router = start_server(router_app(pods_api), 0, "127.0.0.1", "service")
                traffic = asyncio.create_task(
                    run_traffic(
                        f"http://127.0.0.1:{router.port}",
                        TrafficConfig(concurrency=4, durationS=150, topics=4, topicSkew=2.0),
                        should_stop=lambda: stop_traffic,
                    )
                )
                try:
                    await eventually(
                        lambda: manual_rebalances(pods.scrape(0)) >= 1,
                        timeout=120,
                        what="a remap carried out by the workers",
                    )
                finally:
                    stop_traffic = True
                    served = (await traffic).summary()
                    router.shutdown()
                assert served["requests_failed"] == 0 and served["requests_completed"] > 0
                # the pod's router spread them over both of its ranks
                assert counter(pods.scrape(0), "moe_prompt_tokens") > 0
                assert counter(pods.scrape(1), "moe_prompt_tokens") > 0
                status = cr()["status"]
                assert status["policy"]["lastRemapAt"] is not None
                assert 0 < float(status["balancedness"]) <= 1
                events = [
                    cluster.get("v1", "events", "default", n)
                    for n in cluster.names("v1", "events", "default")
                ]
                assert any(e and e["reason"] == "Remap" for e in events)
                # Mapping generation moves: the remap committed.
                await eventually(
                    lambda: (cr()["status"].get("mappingGeneration") or 0) >= 1,
                    what="mapping generation",
                )
                # The snapshots were Prometheus' answers to the operator's PromQL.
                answered = logged_queries(tmp_path)
                for expr in promql("default", "tiny").values():
                    assert expr in answered, f"the operator never asked Prometheus for {expr}"
                # Ranks gone: Prometheus marks their series stale, the queries come back
                # empty -> Degraded, and no action is taken.
                await pods.stop()
                await eventually(
                    lambda: degraded().get("reason") == "MetricsUnavailable",
                    timeout=30,
                    what="Degraded MetricsUnavailable",
                )
                assert degraded()["status"] == "True"
                assert "no moe_ep_size series" in degraded()["message"], degraded()
                # Every panel of the "moe-operator" dashboard, and the overview's annotation of
                # operator actions, has data in a real Prometheus scraping the operator.
                missing: list[str] = []
                for _ in range(60):
                    # as a user sees them with the deployment's namespace picked
                    missing = [
                        p.title
                        for p in OPERATOR
                        if not has_data(prometheus, p.expr, "default", "tiny")
                    ]
                    if not missing:
                        break
                    await asyncio.sleep(1)
                assert not missing, f"operator panels without data: {missing}"
                annotation = ANNOTATION_EXPR.replace("[2m]", "[10m]")
                assert has_data(prometheus, annotation, "default", "tiny")
        finally:
            await pods.stop()
            server.terminate()
            server.wait(timeout=30)
            await kube.close()


def counter(text: str, name: str) -> float:
    """The sum of counter ``name``'s samples (its ``_total`` series) in an exposition."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if family.name == name and sample.name == f"{name}_total"
    )


def gauge(text: str, name: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    return None


async def test_live_resize_through_the_operator_and_a_killed_rank(
    tmp_path: Path,
) -> None:
    """kubectl scale 2 -> 4 with the operator SIGKILLed mid-resize and started again (the
    resize resumes from status.resize), 4 -> 2, then rank 1 killed, then the leader (rank 0)
    killed; every step of every rank equals the dense reference. The operator runs as its image
    does, in its own process."""
    document = yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())
    document["metadata"]["namespace"] = "default"
    spec = document["spec"]
    spec["parallelism"] = {"pods": 2, "gpusPerPod": 1}
    # Elastic on (live resizes), but a load band so wide the policy itself never resizes.
    spec["elastic"] = {
        "enabled": True,
        "minExpertParallelSize": 2,
        "maxExpertParallelSize": 4,
        "tokensPerRankLow": 0,
        "tokensPerRankHigh": 1e12,
    }
    spec["simulator"] = {**SIMULATOR, "stepsPerSecond": 25}
    spec["metrics"] = {"port": free_port(consecutive=2)}
    spec["control"] = {"port": free_port()}
    api = f"{GROUP}/{VERSION}"
    async with running_cluster(tmp_path) as (cluster, kubeconfig):
        os.environ["KUBECONFIG"] = str(kubeconfig)
        kube = await KubeClient.connect(user_agent="moe-tests")
        pods = LocalPods(cluster, "default", "tiny", tmp_path, check_outputs=True)

        def status() -> dict:
            return (cluster.get(api, PLURAL, "default", "tiny") or {}).get("status") or {}

        def reasons() -> list[str]:
            names = cluster.names("v1", "events", "default")
            return [(cluster.get("v1", "events", "default", n) or {}).get("reason") for n in names]

        async def scale(replicas: int) -> None:
            await kube.patch(
                api, "MoEDeployment", "default", "tiny", {"spec": {"replicas": replicas}}, "scale"
            )

        operator = OperatorProcess(kubeconfig, tmp_path / "operator.log")
        try:
            await operator.start()
            await kube.create(document)
            await eventually(
                lambda: cluster.get("apps/v1", "statefulsets", "default", "tiny"), what="sts"
            )
            pods.start(kube)
            await eventually(lambda: status().get("phase") == "Running", 180, "Running")
            template = cluster.get("apps/v1", "statefulsets", "default", "tiny")["spec"]["template"]
            await scale(4)
            progress = await eventually(lambda: status().get("resize"), 30, "resize begun")
            assert progress["fromEpSize"] == 2 and progress["toEpSize"] == 4
            # The operator dies mid-resize (the new pods are starting); its successor
            # knows nothing but what the API holds.
            operator.kill()
            interrupted = status().get("resize")
            assert interrupted and interrupted["phase"] == "pods-up", interrupted
            await eventually(pods.up, 120, "the new pods up, on standby")
            assert status().get("expertParallelSize") == 2
            await operator.start()
            await eventually(
                lambda: status().get("expertParallelSize") == 4 and not status().get("resize"),
                120,
                "EP 4 served",
            )
            assert gauge(pods.scrape(3), "moe_ep_size") == 4
            sts = cluster.get("apps/v1", "statefulsets", "default", "tiny")
            assert sts["spec"]["replicas"] == 4 and sts["spec"]["template"] == template
            await eventually(lambda: {"Resizing", "Resized"} <= set(reasons()), 10, "events")

            await scale(2)
            await eventually(
                lambda: (
                    status().get("expertParallelSize") == 2
                    and not status().get("resize")
                    and cluster.get("apps/v1", "statefulsets", "default", "tiny")["spec"][
                        "replicas"
                    ]
                    == 2
                ),
                120,
                "EP 2 served, pods 2 and 3 gone",
            )
            await eventually(lambda: len(pods.pods) == 2, 60, "two pods")
            generation = gauge(pods.scrape(0), "moe_topology_generation")
            assert generation == 2

            async def kill_and_recover(killed: int, survivor: int, generation: int) -> None:
                """Kill ``killed``'s pod; the survivor reaches ``generation`` and the
                restarted rank serves 25 steps; only that one pod restarted."""
                restarts = pods.restarts
                pods.kill(killed)
                await eventually(
                    lambda: (
                        gauge(pods.try_scrape(survivor), "moe_topology_generation") == generation
                    ),
                    120,
                    f"rank {killed} replaced in generation {generation}",
                )
                # The survivor's generation can move before the restarted pod listens.
                first = await eventually(lambda: pods.try_scrape(killed), 60, f"rank {killed} up")
                steps = gauge(first, "moe_steps_total") or 0
                await eventually(
                    lambda: (gauge(pods.try_scrape(killed), "moe_steps_total") or 0) >= steps + 25,
                    60,
                    f"the restarted rank {killed} serving",
                )
                assert pods.restarts == restarts + 1, "only the killed pod restarted"

            # A rank dies; the kubelet restarts its pod; the group takes it back in.
            await kill_and_recover(killed=1, survivor=0, generation=3)
            # The leader dies, and the rendezvous store with it; its restarted pod takes the
            # survivor back in generation 4.
            await kill_and_recover(killed=0, survivor=1, generation=4)
            await eventually(lambda: status().get("phase") == "Running", 60, "Running")
        finally:
            operator.stop()
            await pods.stop()
            await kube.close()
    summaries = pods.summaries()
    served = [s for s in summaries if not s.get("standby")]
    assert {s["rank"] for s in served if s.get("retired")} == {2, 3}
    assert all(s["outputMismatches"] == 0 for s in served), summaries
    # What is left: the restarted leader and rank 1's replacement, both in generation 4.
    final = {s["rank"]: s for s in served if not s.get("retired")}
    assert sorted(final) == [0, 1], summaries
    assert all(s["topologyGeneration"] == 4 for s in final.values()), summaries
    assert final[1]["recoveries"] == 1 and final[1]["outputsChecked"] > 50
    assert final[0]["outputsChecked"] >= 25

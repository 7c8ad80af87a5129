"""The operator (real Kopf, real handlers) against KMock's API emulator over HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import copy
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client import REGISTRY

from distributed import free_port
from hpa import api_call
from kube_emulator import ClusterEmulator, running_cluster
from moe_operator.api import GROUP, PLURAL, VERSION
from moe_operator.k8s import KubeClient, KubeError
from operator_harness import METRICS_URL, WEBHOOK_URL, eventually, running_operator

ROOT = Path(__file__).resolve().parents[2]
API = f"{GROUP}/{VERSION}"
NS = "default"
CHILDREN = [
    ("v1", "configmaps", "tiny-config"),
    ("v1", "secrets", "tiny-control"),
    ("v1", "services", "tiny-ranks"),
    ("v1", "services", "tiny-metrics"),
    ("v1", "services", "tiny"),  # the inference Service
    ("policy/v1", "poddisruptionbudgets", "tiny"),
    ("networking.k8s.io/v1", "networkpolicies", "tiny"),
    ("apps/v1", "statefulsets", "tiny"),
]


def reconcile_rounds(result: str) -> float:
    """Reconcile rounds the in-process operator has finished with ``result`` (its own counter)."""
    return REGISTRY.get_sample_value("moe_operator_reconciles_total", {"result": result}) or 0.0


def tiny() -> dict[str, Any]:
    document = yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())
    document["metadata"]["namespace"] = NS
    return document


class World:
    def __init__(self, cluster: ClusterEmulator, kube: KubeClient, kubeconfig: Path) -> None:
        self.cluster, self.kube, self.kubeconfig = cluster, kube, kubeconfig

    def cr(self, name: str = "tiny") -> dict[str, Any] | None:
        return self.cluster.get(API, PLURAL, NS, name)

    def status(self, name: str = "tiny") -> dict[str, Any]:
        return (self.cr(name) or {}).get("status") or {}

    def condition(self, kind: str, name: str = "tiny") -> dict[str, Any]:
        return next((c for c in self.status(name).get("conditions", []) if c["type"] == kind), {})

    def children_present(self) -> bool:
        return all(self.cluster.get(a, p, NS, n) for a, p, n in CHILDREN)

    def events(self) -> list[dict[str, Any]]:
        out = []
        for name in self.cluster.names("v1", "events", NS):
            event = self.cluster.get("v1", "events", NS, name)
            if event and event.get("involvedObject", {}).get("kind") == "MoEDeployment":
                out.append(event)
        return out

    async def patch_spec(self, spec: dict[str, Any], name: str = "tiny") -> None:
        await self.kube.patch(API, "MoEDeployment", NS, name, {"spec": spec})

    async def mark_pods_ready(self, name: str = "tiny") -> None:
        """What the StatefulSet controller would report once every pod is up."""
        sts = self.cluster.get("apps/v1", "statefulsets", NS, name)
        assert sts is not None
        replicas = sts["spec"]["replicas"]
        status = {
            "replicas": replicas,
            "readyReplicas": replicas,
            "updatedReplicas": replicas,
            "observedGeneration": sts["metadata"]["generation"],
        }
        await self.kube.patch("apps/v1", "StatefulSet", NS, name, {"status": status}, "status")


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    async with running_cluster(tmp_path) as (cluster, kubeconfig):
        import os

        os.environ["KUBECONFIG"] = str(kubeconfig)
        kube = await KubeClient.connect(user_agent="moe-tests")
        try:
            yield World(cluster, kube, kubeconfig)
        finally:
            await kube.close()


async def test_create_makes_owned_children_status_and_events(world: World) -> None:
    async with running_operator(world.kubeconfig):
        await world.kube.create(tiny())
        await eventually(world.children_present, what="all children")
        await eventually(lambda: world.status().get("observedGeneration") == 1, what="status")
        uid = world.cr()["metadata"]["uid"]
        for api_version, plural, name in CHILDREN:
            child = world.cluster.get(api_version, plural, NS, name)
            owners = child["metadata"]["ownerReferences"]
            assert owners[0]["uid"] == uid and owners[0]["controller"] is True, (plural, name)
        sts = world.cluster.get("apps/v1", "statefulsets", NS, "tiny")
        assert sts["spec"]["replicas"] == 2
        status = world.status()
        assert status["phase"] == "Pending"
        assert status["expertParallelSize"] == 2 and status["readyRanks"] == 0
        assert (
            status["selector"]
            == "app.kubernetes.io/name=moe-worker,app.kubernetes.io/instance=tiny"
        )
        assert world.condition("Progressing")["status"] == "True"
        assert world.condition("Degraded")["status"] == "False"
        assert status["endpoint"] == f"http://tiny.{NS}.svc:8000/v1"
        service = world.cluster.get("v1", "services", NS, "tiny")
        assert service["spec"]["ports"] == [{"name": "http", "port": 8000, "targetPort": "http"}]
        # Kopf's bookkeeping stays in its own annotations, never in our status.
        assert set(status) <= {
            "phase",
            "conditions",
            "observedGeneration",
            "expertParallelSize",
            "pods",
            "readyRanks",
            "selector",
            "endpoint",
            "balancedness",
            "mappingGeneration",
            "topologyGeneration",
        }
        await eventually(
            lambda: [
                e
                for e in world.events()
                if e["reason"] == "Created" and "StatefulSet/tiny" in e["message"]
            ],
            what="an Event for the StatefulSet's creation",
        )

        async with aiohttp.ClientSession() as http, http.get(METRICS_URL) as response:
            exposition = await response.text()
        assert 'moe_operator_reconciles_total{result="ok"}' in exposition
        assert 'moe_operator_child_writes_total{kind="StatefulSet",verb="created"}' in exposition

        await world.mark_pods_ready()
        await eventually(lambda: world.status().get("phase") == "Running", what="Running")
        # Every request the operator (Kopf or our client) made is one its RBAC grants.
        from moe_operator.handlers import CLUSTER_WIDE_CALLS, KOPF_API_CALLS
        from moe_operator.k8s import API_CALLS

        granted = {
            (verb, group, resource)
            for group, resource, verbs in API_CALLS + KOPF_API_CALLS + CLUSTER_WIDE_CALLS
            for verb in verbs
        }
        made = {
            (verb, group, resource)
            for verb, group, resource, agent in world.cluster.verbs
            if agent.startswith(("kopf/", "moe-operator")) and resource != "None"
        }  # ("None": discovery, /api/v1 and /apis/<group>/<version>, open to everyone)
        assert made and made <= granted, made - granted
        # Children block their owner's deletion: the API server's OwnerReferencesPermission-
        # Enforcement then wants update on the owner's finalizers, which the chart grants.
        from moe_operator.k8s import OWNER_REFERENCE_GRANTS

        blocking = [
            api_version
            for api_version, plural, name in CHILDREN
            if world.cluster.get(api_version, plural, NS, name)["metadata"]["ownerReferences"][0][
                "blockOwnerDeletion"
            ]
        ]
        chart_grants = granted | {
            (verb, group, resource)
            for group, resource, verbs in OWNER_REFERENCE_GRANTS
            for verb in verbs
        }
        assert blocking and ("update", "moe.eplb.dev", "moedeployments/finalizers") in (
            chart_grants
        )
        assert world.status()["readyRanks"] == 2
        assert world.condition("Ready")["status"] == "True"
        assert world.condition("Progressing")["status"] == "False"


async def test_restart_resumes_without_recreating_anything(world: World) -> None:
    async with running_operator(world.kubeconfig):
        await world.kube.create(tiny())
        await eventually(lambda: world.status().get("observedGeneration") == 1, what="status")
    token = world.cluster.get("v1", "secrets", NS, "tiny-control")["data"]["token"]
    writes_before = {p: len(world.cluster.writes(p)) for _, p, _ in CHILDREN}
    async with running_operator(world.kubeconfig):
        # Wait for at least one resume round and one resync round to have run.
        await eventually(
            lambda: len(world.cluster.writes(PLURAL)) > 0 and world.cluster.calls[-1], what="rounds"
        )
        done = reconcile_rounds("ok")
        await eventually(lambda: reconcile_rounds("ok") >= done + 2, what="two more resyncs")
    for _, plural, _ in CHILDREN:
        assert len(world.cluster.writes(plural)) == writes_before[plural], plural
    assert world.cluster.get("v1", "secrets", NS, "tiny-control")["data"]["token"] == token
    assert len(base64.b64decode(token)) >= 32


async def test_spec_update_rolls_pods_and_ep_size_change_is_consistent(world: World) -> None:
    """Without elastic, an EP size change re-deploys: replicas, WORLD_SIZE and config move."""
    document = tiny()
    document["spec"]["elastic"] = {"enabled": False}
    async with running_operator(world.kubeconfig):
        await world.kube.create(document)
        await eventually(world.children_present, what="children")
        sts = world.cluster.get("apps/v1", "statefulsets", NS, "tiny")
        hash_before = sts["spec"]["template"]["metadata"]["annotations"][f"{GROUP}/config-hash"]

        await world.patch_spec({"image": "ghcr.io/moe-eplb/worker:0.2.0"})
        await eventually(lambda: world.status().get("observedGeneration") == 2, what="gen 2")
        sts = world.cluster.get("apps/v1", "statefulsets", NS, "tiny")
        assert sts["spec"]["template"]["spec"]["containers"][0]["image"].endswith(":0.2.0")
        assert sts["spec"]["template"]["metadata"]["annotations"][f"{GROUP}/config-hash"] != (
            hash_before
        )

        await world.patch_spec({"parallelism": {"pods": 4}})
        await eventually(lambda: world.status().get("observedGeneration") == 3, what="gen 3")
        sts = world.cluster.get("apps/v1", "statefulsets", NS, "tiny")
        config = yaml.safe_load(
            world.cluster.get("v1", "configmaps", NS, "tiny-config")["data"]["worker.yaml"]
        )
        assert sts["spec"]["replicas"] == 4
        assert config["epSize"] == 4
        world_size = {
            e["name"]: e.get("value")
            for e in sts["spec"]["template"]["spec"]["containers"][0]["env"]
        }["WORLD_SIZE"]
        assert world_size == "4"
        assert world.status()["expertParallelSize"] == 4
        assert any(e["reason"] == "Updated" for e in world.events())


async def test_elastic_ep_change_raises_replicas_without_rolling_pods(world: World) -> None:
    """With elastic on, an EP change keeps the template (no pod restarts) and adds pods; the
    live resize itself waits for the new pods (none run here: see the e2e test)."""
    async with running_operator(world.kubeconfig):
        await world.kube.create(tiny())
        await eventually(world.children_present, what="children")
        template = world.cluster.get("apps/v1", "statefulsets", NS, "tiny")["spec"]["template"]
        await world.patch_spec({"parallelism": {"pods": 4}})
        await eventually(lambda: world.status().get("observedGeneration") == 2, what="gen 2")
        sts = world.cluster.get("apps/v1", "statefulsets", NS, "tiny")
        assert sts["spec"]["replicas"] == 4
        assert sts["spec"]["template"] == template, "the pods do not roll"
        assert world.status()["expertParallelSize"] == 2, "still serving at 2"


async def test_scale_subresource_goes_through_the_same_path(world: World) -> None:
    async with running_operator(world.kubeconfig):
        await world.kube.create(tiny())
        await eventually(world.children_present, what="children")
        # What `kubectl scale moed/tiny --replicas=4` sends.
        await world.kube.patch(API, "MoEDeployment", NS, "tiny", {"spec": {"replicas": 4}}, "scale")
        await eventually(
            lambda: (
                world.cluster.get("apps/v1", "statefulsets", NS, "tiny")["spec"]["replicas"] == 4
            ),
            what="replicas 4",
        )


async def run_pods(world: World, name: str = "tiny") -> int:
    """What the StatefulSet controller does: one ready pod per replica, labelled as the
    template says; returns the replicas."""
    sts = world.cluster.get("apps/v1", "statefulsets", NS, name)
    assert sts is not None
    replicas = int(sts["spec"]["replicas"])
    labels = sts["spec"]["template"]["metadata"]["labels"]
    ready = {"conditions": [{"type": "Ready", "status": "True"}]}
    host = world.kube.api.configuration.host
    for ordinal in range(replicas):
        pod_name = f"{name}-{ordinal}"
        if world.cluster.get("v1", "pods", NS, pod_name) is None:
            pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": pod_name}}
            pod["metadata"].update(namespace=NS, labels=labels)
            pods = f"/api/v1/namespaces/{NS}/pods"
            await api_call(host, "POST", pods, pod)
            await api_call(host, "PATCH", f"{pods}/{pod_name}/status", {"status": ready})
    await world.mark_pods_ready(name)
    return replicas


# Per-rank load 400 then 40 tokens/s against a target of 250: ratio 1.6, then 0.16.
# gpusPerPod 1, 2 pods: ceil(1.6 x 2) = 4 -> max 3; 3 stays 3 (ceil 4.8 -> 3); ceil(0.48) -> min 2.
# gpusPerPod 4, 1 pod: ceil(1.6) = 2 pods (EP 8); ceil(3.2) -> max 3 (EP 12); ceil(0.48) = 1.
@pytest.mark.parametrize(("gpus_per_pod", "ep_sizes"), [(1, [3, 3, 2]), (4, [8, 12, 4])])
async def test_an_hpa_sizes_pods_through_the_scale_subresource(
    world: World, gpus_per_pod: int, ep_sizes: list[int]
) -> None:
    """An HPA (tests/hpa.py: Kubernetes' formula over the pods the scale's selector selects)
    owns the size (elastic.scaler external): the scale subresource counts pods, so with one or
    four GPUs a pod its sizes up under load and down when quiet are valid EP sizes (the API
    server's rules pass), the StatefulSet follows, and the operator writes no size itself."""
    from hpa import Autoscaler
    from moe_operator.validation import problems

    document = tiny()
    g = gpus_per_pod
    document["spec"]["parallelism"].update(pods=2 if g == 1 else 1, gpusPerPod=g)
    document["spec"]["elastic"].update(
        scaler="external", minExpertParallelSize=2 * g if g == 1 else g, maxExpertParallelSize=3 * g
    )
    per_rank_target = 250.0
    hpa = Autoscaler(
        world.kube,
        API,
        "MoEDeployment",
        NS,
        "tiny",
        target=per_rank_target * g,  # tokens/s per pod
        min_replicas=document["spec"]["elastic"]["minExpertParallelSize"] // g,
        max_replicas=3,
    )
    async with running_operator(world.kubeconfig):
        await world.kube.create(document)
        await eventually(lambda: world.status().get("selector"), what="status.selector")
        load = {"tokens_per_s": 0.0}

        def per_pod(_: str) -> float:  # the load spread evenly over the ranks
            cr = world.cr() or {}
            ranks = cr["spec"]["parallelism"]["pods"] * g
            return load["tokens_per_s"] / ranks * g

        sizes = []
        for total_per_rank in (400.0, 400.0, 40.0):
            pods = await run_pods(world)
            spec_pods = (world.cr() or {})["spec"]["parallelism"]["pods"]
            load["tokens_per_s"] = total_per_rank * spec_pods * g
            before, after = await hpa.round(per_pod)
            cr = world.cr() or {}
            assert before == pods and cr["spec"]["parallelism"]["pods"] == after
            assert problems(cr) == [], "the size the HPA wrote is one the API server accepts"
            sizes.append(after * g)
            await eventually(
                lambda a=after: (
                    world.cluster.get("apps/v1", "statefulsets", NS, "tiny")["spec"]["replicas"]
                    >= a
                ),
                what=f"the StatefulSet at {after} pods",
            )
        assert sizes == ep_sizes
        scale_writers = {
            agent
            for verb, group, resource, agent in world.cluster.verbs
            if resource == f"{PLURAL}/scale" and verb == "patch"
        }
        assert scale_writers == {"moe-tests"}, "only the HPA wrote a size"


async def test_child_deleted_by_hand_is_restored(world: World) -> None:
    async with running_operator(world.kubeconfig):
        await world.kube.create(tiny())
        await eventually(world.children_present, what="children")
        token = world.cluster.get("v1", "secrets", NS, "tiny-control")["data"]["token"]
        base = world.kube.api.configuration.host
        async with aiohttp.ClientSession() as http:
            for path in (
                "/apis/apps/v1/namespaces/default/statefulsets/tiny",
                "/api/v1/namespaces/default/configmaps/tiny-config",
            ):
                async with http.delete(base + path) as response:
                    assert response.status == 200
        assert world.cluster.get("apps/v1", "statefulsets", NS, "tiny") is None
        await eventually(world.children_present, timeout=15, what="restored children")
        # The Secret was not touched, so the token is the same.
        assert world.cluster.get("v1", "secrets", NS, "tiny-control")["data"]["token"] == token


async def test_deleting_the_deployment_removes_its_children(world: World) -> None:
    async with running_operator(world.kubeconfig):
        await world.kube.create(tiny())
        await eventually(world.children_present, what="children")
        base = world.kube.api.configuration.host
        async with aiohttp.ClientSession() as http:
            path = f"/apis/{API}/namespaces/{NS}/{PLURAL}/tiny"
            async with http.delete(base + path) as response:
                assert response.status == 200
        await eventually(lambda: world.cr() is None, what="CR gone (finalizer released)")
        await eventually(
            lambda: not any(world.cluster.get(a, p, NS, n) for a, p, n in CHILDREN),
            what="children collected",
        )


async def test_invalid_spec_degrades_without_crashing_and_recovers(world: World) -> None:
    bad = tiny()
    bad["metadata"]["name"] = "bad"
    bad["spec"]["parallelism"]["pods"] = 3  # not a multiple of numNodes 2
    bad["spec"]["parallelism"]["numNodes"] = 2
    async with running_operator(world.kubeconfig):
        await world.kube.create(bad)
        await world.kube.create(tiny())
        await eventually(lambda: world.status("bad").get("phase") == "Degraded", what="Degraded")
        degraded = world.condition("Degraded", "bad")
        assert degraded["status"] == "True" and degraded["reason"] == "InvalidSpec"
        assert "spec.parallelism.pods" in degraded["message"]
        assert world.cluster.get("apps/v1", "statefulsets", NS, "bad") is None
        await eventually(
            lambda: [e for e in world.events() if e["reason"] == "InvalidSpec"], what="warning"
        )
        # The other deployment is served as usual: the operator did not stop.
        await eventually(world.children_present, what="the valid deployment's children")
        # Repeated rounds on the same bad spec do not repeat the warning.
        done = reconcile_rounds("invalid")
        await eventually(lambda: reconcile_rounds("invalid") >= done + 2, what="two more rounds")
        warnings = [e for e in world.events() if e["reason"] == "InvalidSpec"]
        assert len(warnings) == 1
        # Fixing the spec recovers.
        await world.patch_spec({"parallelism": {"pods": 4}}, name="bad")
        await eventually(
            lambda: world.cluster.get("apps/v1", "statefulsets", NS, "bad"), what="bad's sts"
        )
        await eventually(
            lambda: world.condition("Degraded", "bad").get("status") == "False", what="recovered"
        )


async def test_pod_monitor_only_when_the_monitoring_crds_exist(tmp_path: Path) -> None:
    async with running_cluster(tmp_path, with_monitoring=True) as (cluster, kubeconfig):
        async with running_operator(kubeconfig):
            import os

            os.environ["KUBECONFIG"] = str(kubeconfig)
            kube = await KubeClient.connect(user_agent="moe-tests")
            try:
                await kube.create(tiny())
                await eventually(
                    lambda: cluster.get("monitoring.coreos.com/v1", "podmonitors", NS, "tiny"),
                    what="PodMonitor",
                )
            finally:
                await kube.close()


def _review(operation: str, obj: dict, old: dict | None = None) -> dict:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "review-1",
            "kind": {"group": GROUP, "version": VERSION, "kind": "MoEDeployment"},
            "resource": {"group": GROUP, "version": VERSION, "resource": PLURAL},
            "requestKind": {"group": GROUP, "version": VERSION, "kind": "MoEDeployment"},
            "requestResource": {"group": GROUP, "version": VERSION, "resource": PLURAL},
            "name": obj["metadata"]["name"],
            "namespace": NS,
            "operation": operation,
            "userInfo": {"username": "tester"},
            "object": obj,
            "oldObject": old,
            "dryRun": False,
            "options": {},
        },
    }


async def webhook_listening(http: aiohttp.ClientSession) -> None:
    """Wait (10 s at most) until the operator's webhook answers."""
    url = f"{WEBHOOK_URL}/validate-moedeployment"
    for _ in range(200):
        try:
            async with http.post(url, json=_review("CREATE", tiny())):
                return
        except aiohttp.ClientConnectorError:
            await asyncio.sleep(0.05)
    raise AssertionError("the webhook did not listen within 10 s")


async def test_admission_webhook_rejects_with_the_field_named(world: World) -> None:
    async with running_operator(world.kubeconfig), aiohttp.ClientSession() as http:
        url = f"{WEBHOOK_URL}/validate-moedeployment"
        good = tiny()
        await webhook_listening(http)
        async with http.post(url, json=_review("CREATE", good)) as response:
            assert (await response.json())["response"]["allowed"] is True
        bad = copy.deepcopy(good)
        bad["spec"]["elastic"]["minExpertParallelSize"] = 1
        bad["spec"]["parallelism"]["slotsPerRank"] = 5
        bad["spec"]["model"]["numExperts"] = 8
        bad["spec"]["eplb"]["numRedundantExperts"] = 2
        bad["spec"]["parallelism"]["pods"] = 2
        async with http.post(url, json=_review("CREATE", bad)) as response:
            answer = (await response.json())["response"]
        assert answer["allowed"] is False
        assert "spec.elastic.minExpertParallelSize" in answer["status"]["message"]
        changed = copy.deepcopy(good)
        changed["spec"]["model"]["numExperts"] = 32
        async with http.post(url, json=_review("UPDATE", changed, good)) as response:
            answer = (await response.json())["response"]
        assert answer["allowed"] is False
        assert "spec.model.numExperts: is immutable" in answer["status"]["message"]
        # An object stored before its rule existed can still be deleted: Kopf's metadata-only
        # patch that drops its finalizer passes.
        stored = copy.deepcopy(bad)
        stored["metadata"]["finalizers"] = ["kopf.zalando.org/KopfFinalizerMarker"]
        stored["metadata"]["deletionTimestamp"] = "2026-12-01T00:00:00Z"
        released = copy.deepcopy(stored)
        released["metadata"]["finalizers"] = []
        async with http.post(url, json=_review("UPDATE", released, stored)) as response:
            assert (await response.json())["response"]["allowed"] is True


async def test_live_resize_in_progress_resumes_from_the_status_after_a_restart(
    world: World,
) -> None:
    """The resize's progress lives in status.resize: what a fresh operator runs first (its
    autopilot round, with a new API client and nothing in memory) reads it and finishes.

    The leader here is the worker's real control API (``serve_control``) over a status whose
    EP size follows the accepted request, standing in for a group of ranks (the e2e tests run
    real ones); the StatefulSet's readiness is reported as its controller would.
    """
    import threading

    from moe_operator.api import MoEDeployment
    from moe_operator.autopilot import resize_round
    from moe_operator.builders import control_port
    from moe_operator.reconcile import reconcile
    from moe_worker.server import WorkerStatus, serve_control

    document = tiny()
    document["spec"]["control"] = {"port": free_port()}
    leader = WorkerStatus(ready=True, state={"epSize": 2})
    leader.resize_check = lambda target: None
    done = threading.Event()

    def group() -> None:  # the ranks carry an accepted resize out
        while not done.wait(0.05):
            with leader.lock:
                if leader.resize_target:
                    leader.state = {"epSize": leader.resize_target}
                    leader.resize_target = 0

    threading.Thread(target=group, daemon=True).start()
    await world.kube.create(document)
    await reconcile(world.kube, world.cr() or {}, False)
    secret = world.cluster.get("v1", "secrets", NS, "tiny-control")
    token = base64.b64decode(secret["data"]["token"]).decode()
    deployment = MoEDeployment.model_validate(document)
    server = serve_control(control_port(deployment), leader, token, host="127.0.1.0")
    try:
        await world.mark_pods_ready()
        await world.kube.patch(API, "MoEDeployment", NS, "tiny", {"spec": {"replicas": 4}}, "scale")
        document["spec"]["parallelism"]["pods"] = 4
        deployment = MoEDeployment.model_validate(document)
        first = await resize_round(world.kube, deployment, {"expertParallelSize": 2})
        await world.kube.patch_status(NS, "tiny", first.status)
        assert first.event is not None and first.event[1] == "Resizing"
        assert world.status()["resize"]["phase"] == "pods-up"
        sts = world.cluster.get("apps/v1", "statefulsets", NS, "tiny")
        assert sts["spec"]["replicas"] == 4, "the new pods are asked for first"
        assert leader.state["epSize"] == 2, "nothing asked of the leader before they are ready"

        # The operator process is gone; a new one (new client, no memory) resumes from the API.
        await world.kube.close()
        world.kube = await KubeClient.connect(user_agent="moe-tests")
        await world.mark_pods_ready()  # the new pods came up on standby meanwhile
        actions = []
        for _ in range(20):
            status = world.status()
            if status.get("expertParallelSize") == 4 and not status.get("resize"):
                break
            rnd = await resize_round(world.kube, deployment, status)
            await world.kube.patch_status(NS, "tiny", rnd.status)
            actions.append((rnd.status.get("resize") or {}).get("phase"))
            await asyncio.sleep(0.1)
        assert world.status()["expertParallelSize"] == 4 and not world.status().get("resize")
        assert leader.state["epSize"] == 4
        assert actions[0] == "moving", "the resumed round asks the leader"
    finally:
        done.set()
        server.shutdown()


async def test_an_invalid_object_is_deleted_with_the_webhook_on(world: World) -> None:
    """An object stored before a rule it breaks existed, in an API server that sends every
    create and update of a MoEDeployment to the operator's webhook (as the chart registers it):
    Kopf still adds its finalizer, the operator marks it Degraded, creates and edits that break
    the rules are refused with the field named, and deleting it releases the finalizer through
    the webhook: it is gone."""
    stale = tiny()
    stale["metadata"]["name"] = "stale"
    stale["spec"]["elastic"]["maxExpertParallelSize"] = 1  # below the minimum and the size
    await world.kube.create(stale)  # stored before the webhook (or the rule) existed
    world.cluster.admission_url = f"{WEBHOOK_URL}/validate-moedeployment"
    async with running_operator(world.kubeconfig), aiohttp.ClientSession() as http:
        await webhook_listening(http)
        await eventually(
            lambda: ((world.cr("stale") or {}).get("metadata") or {}).get("finalizers"),
            what="Kopf's finalizer on the invalid object",
        )
        await eventually(
            lambda: world.condition("Degraded", "stale").get("reason") == "InvalidSpec",
            what="Degraded InvalidSpec",
        )
        fresh = copy.deepcopy(stale)
        fresh["metadata"]["name"] = "fresh"
        with pytest.raises(KubeError) as refused:
            await world.kube.create(fresh)
        assert "spec.elastic: minExpertParallelSize <=" in str(refused.value)
        assert world.cr("fresh") is None
        with pytest.raises(KubeError) as refused:
            await world.kube.patch(API, "MoEDeployment", NS, "stale", {"spec": {"image": "w:2"}})
        assert "spec.elastic" in str(refused.value)
        await world.kube.create(tiny())  # a valid one passes
        path = f"/apis/{API}/namespaces/{NS}/{PLURAL}/stale"
        async with http.delete(world.kube.api.configuration.host + path) as response:
            assert response.status == 200
        await eventually(lambda: world.cr("stale") is None, what="the invalid object gone")
        operations = world.cluster.admissions
        assert ("CREATE", False) in operations and ("UPDATE", False) in operations
        assert ("UPDATE", True) in operations, "Kopf's finalizer patches went through it"


def chart_scope(values: list[str]) -> tuple[tuple[str, ...], dict[str, str]]:
    """The namespace arguments and the MOE_OPERATOR_NAMESPACED env the chart gives the
    operator with these ``--set`` values."""
    import shutil
    import subprocess
    import sys

    helm = shutil.which("helm") or str(Path(sys.executable).parent / "helm")
    sets = [part for value in values for part in ("--set", value)]
    rendered = subprocess.run(
        [helm, "template", "moe", str(ROOT / "helm" / "moe-operator"), *sets],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    (deployment,) = [d for d in yaml.safe_load_all(rendered) if d and d["kind"] == "Deployment"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    env = {
        e["name"]: e["value"] for e in container["env"] if e["name"] == "MOE_OPERATOR_NAMESPACED"
    }
    return tuple(a for a in args if a.startswith("--namespace") or a == "--all-namespaces"), env


async def test_namespaced_mode_serves_only_the_listed_namespaces(
    world: World, tmp_path: Path
) -> None:
    """The operator as the chart starts it with watchNamespaces [team-a, team-b]: deployments
    there get their children; one in team-c (created first) is left alone."""
    from operator_harness import OperatorProcess

    scope, env = chart_scope(["watchNamespaces={team-a,team-b}"])
    assert scope == ("--namespace=team-a", "--namespace=team-b")
    assert env == {"MOE_OPERATOR_NAMESPACED": "true"}
    assert chart_scope([]) == (("--all-namespaces",), {})
    for namespace in ("team-c", "team-a", "team-b"):
        document = tiny()
        document["metadata"]["namespace"] = namespace
        document["spec"]["control"] = {"port": free_port()}
        await world.kube.create(document)
    operator = OperatorProcess(world.kubeconfig, tmp_path / "operator.log", scope, env)
    first_call = len(world.cluster.calls)
    await operator.start()
    try:
        for namespace in ("team-a", "team-b"):
            await eventually(
                lambda n=namespace: world.cluster.get("apps/v1", "statefulsets", n, "tiny"),
                timeout=60,
                what=f"the StatefulSet in {namespace}",
            )
            await eventually(
                lambda n=namespace: (
                    (world.cluster.get(API, PLURAL, n, "tiny") or {}).get("status") or {}
                ).get("observedGeneration"),
                timeout=60,
                what=f"the status in {namespace}",
            )
        assert world.cluster.get("apps/v1", "statefulsets", "team-c", "tiny") is None
        assert not (world.cluster.get(API, PLURAL, "team-c", "tiny") or {}).get("status")
        touched = {ns for _, _, ns, _, _ in world.cluster.calls[first_call:]}
        assert {"team-a", "team-b"} <= touched and "team-c" not in touched
    finally:
        operator.stop()

"""Child manifests: valid for Kubernetes (strict), consistent with the spec, secure by default."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from manifest_checks import kubernetes_validate_strict
from moe_operator.api import MoEDeployment
from moe_operator.builders import (
    children,
    config_hash,
    endpoint,
    selector_string,
    stateful_set,
    worker_config,
)
from moe_operator.cli import app
from moe_worker.config import RankEnv, WorkerConfig

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def load(example: Path) -> MoEDeployment:
    return MoEDeployment.model_validate(yaml.safe_load(example.read_text()))


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.name for e in EXAMPLES])
def test_render_passes_kubernetes_validate_strict(example: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["render", str(example)])
    assert result.exit_code == 0, result.output
    rendered = tmp_path / "children.yaml"
    rendered.write_text(result.stdout)
    kinds = [d["kind"] for d in yaml.safe_load_all(result.stdout)]
    assert kinds == [
        "ConfigMap",
        "Secret",
        "Service",
        "Service",
        "Service",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "StatefulSet",
    ]
    check = kubernetes_validate_strict(rendered)
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.name for e in EXAMPLES])
def test_children_follow_the_spec(example: Path) -> None:
    deployment = load(example)
    spec = deployment.spec
    manifests = {
        (m["kind"], m["metadata"]["name"]): m
        for m in children(deployment, "t0k3n", owner_uid="uid-1")
    }
    name = deployment.metadata.name
    sts = manifests[("StatefulSet", name)]
    assert (
        sts["spec"]["replicas"]
        == spec.parallelism.expert_parallel_size // spec.parallelism.gpus_per_pod
    )
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    assert sts["spec"]["serviceName"] == f"{name}-ranks"
    container = sts["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == str(spec.parallelism.gpus_per_pod)
    security = container["securityContext"]
    assert security["runAsNonRoot"] and security["readOnlyRootFilesystem"]
    assert security["allowPrivilegeEscalation"] is False and security["capabilities"]["drop"] == [
        "ALL"
    ]
    assert security["seccompProfile"]["type"] == "RuntimeDefault"
    assert {p for p in ("startupProbe", "readinessProbe", "livenessProbe") if p in container} == {
        "startupProbe",
        "readinessProbe",
        "livenessProbe",
    }
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    assert volumes["shm"]["emptyDir"]["medium"] == "Memory"
    assert manifests[("Service", f"{name}-ranks")]["spec"]["clusterIP"] == "None"
    for manifest in manifests.values():
        owner = manifest["metadata"]["ownerReferences"][0]
        assert owner["uid"] == "uid-1" and owner["kind"] == "MoEDeployment" and owner["controller"]
    # The worker config in the ConfigMap is one a worker accepts. With elastic on it is for the
    # elastic minimum (the size a fresh group forms at; EP changes are live and roll nothing).
    config = WorkerConfig.model_validate(
        yaml.safe_load(manifests[("ConfigMap", f"{name}-config")]["data"]["worker.yaml"])
    )
    start_size = (
        spec.elastic.min_expert_parallel_size
        if spec.elastic.enabled
        else spec.parallelism.expert_parallel_size
    )
    assert config.ep_size == start_size
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["WORLD_SIZE"] == str(start_size)
    assert config.slots_per_rank == spec.slots_per_rank
    # numNodes reaches placement, and each rank learns its node to check it against
    assert config.num_nodes == spec.parallelism.num_nodes
    node = next(e for e in container["env"] if e["name"] == "NODE_NAME")
    assert node["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert (
        selector_string(name)
        == "app.kubernetes.io/name=moe-worker,app.kubernetes.io/instance=" + name
    )


def test_config_or_image_change_rolls_the_pods() -> None:
    base = load(EXAMPLES[-1])
    other_image = base.model_copy(update={"spec": base.spec.model_copy(update={"image": "x:2"})})
    bigger = yaml.safe_load(EXAMPLES[-1].read_text())
    bigger["spec"]["eplb"] = {"windowSize": 7}
    assert config_hash(base) != config_hash(other_image)
    assert config_hash(base) != config_hash(MoEDeployment.model_validate(bigger))
    assert worker_config(base) == worker_config(load(EXAMPLES[-1]))


def test_live_resize_changes_only_the_replicas() -> None:
    """With elastic on, an EP size change keeps the pod template and config (no pod rolls)."""
    document = yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())
    small = MoEDeployment.model_validate(document)
    document["spec"]["parallelism"]["pods"] = 4
    big = MoEDeployment.model_validate(document)
    assert small.spec.elastic.enabled
    assert config_hash(small) == config_hash(big)
    assert worker_config(small) == worker_config(big)
    assert stateful_set(big)["spec"]["template"] == stateful_set(small)["spec"]["template"]
    assert stateful_set(big)["spec"]["replicas"] == 4
    assert stateful_set(big, pods=3)["spec"]["replicas"] == 3


def test_render_rejects_an_invalid_file(tmp_path: Path) -> None:
    bad = yaml.safe_load(EXAMPLES[0].read_text())
    bad["spec"]["parallelism"]["pods"] = 0
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    result = CliRunner().invoke(app, ["render", str(path)])
    assert result.exit_code == 2 and "spec.parallelism.pods" in result.stderr


def test_rank_from_the_pod_ordinal() -> None:
    env = {
        "POD_NAME": "qwen3-30b-a3b-1",
        "LOCAL_RANK": "2",
        "LOCAL_WORLD_SIZE": "4",
        "WORLD_SIZE": "8",
    }
    assert RankEnv.from_environ(env).rank == 6


def test_a_serving_deployment_gets_its_inference_service_and_api_ingress() -> None:
    document = yaml.safe_load((ROOT / "examples" / "qwen3-30b-a3b.yaml").read_text())
    deployment = MoEDeployment.model_validate(document)  # 2 pods of 4 GPUs, serving
    manifests = {(m["kind"], m["metadata"]["name"]): m for m in children(deployment, "t")}
    service = manifests[("Service", "qwen3-30b-a3b")]
    assert service["spec"]["ports"] == [{"name": "http", "port": 8000, "targetPort": "http"}]
    assert "clusterIP" not in service["spec"]  # a normal Service: ready pods only
    container = manifests[("StatefulSet", "qwen3-30b-a3b")]["spec"]["template"]["spec"][
        "containers"
    ][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == 8000  # the pod's router over its 4 ranks' APIs (8001-8004)
    assert not [name for name in ports if name.startswith("http-")]
    config = WorkerConfig.model_validate(
        yaml.safe_load(manifests[("ConfigMap", "qwen3-30b-a3b-config")]["data"]["worker.yaml"])
    )
    assert config.serving.enabled and config.serving.port == 8000
    assert config.serving.max_running_requests == 128  # the spec's serving limits
    assert endpoint(deployment) == "http://qwen3-30b-a3b.default.svc:8000/v1"

    rules = manifests[("NetworkPolicy", "qwen3-30b-a3b")]["spec"]["ingress"]
    api = [{"protocol": "TCP", "port": 8000}]
    assert {"from": [{"podSelector": {}}], "ports": api} in rules  # the namespace's pods
    control = [r for r in rules if {"protocol": "TCP", "port": 9390} in r.get("ports", [])]
    assert len(control) == 1 and control[0]["from"][0]["podSelector"]["matchLabels"] == {
        "app.kubernetes.io/name": "moe-operator"
    }
    document["spec"]["apiIngress"] = "any"
    opened = children(MoEDeployment.model_validate(document), "t")
    rules = next(m for m in opened if m["kind"] == "NetworkPolicy")["spec"]["ingress"]
    assert {"ports": api} in rules

    # The simulator's benchmark mode serves no API: no Service, no port, no endpoint.
    document["spec"]["simulator"] = {"kind": "zipf"}
    simulated = MoEDeployment.model_validate(document)
    kinds = [(m["kind"], m["metadata"]["name"]) for m in children(simulated, "t")]
    assert ("Service", "qwen3-30b-a3b") not in kinds and endpoint(simulated) is None
    config = WorkerConfig.model_validate(
        yaml.safe_load(
            next(m for m in children(simulated, "t") if m["kind"] == "ConfigMap")["data"][
                "worker.yaml"
            ]
        )
    )
    assert not config.serving.enabled and config.workload.kind == "zipf"


def test_pod_overrides_reach_the_template_and_validate(tmp_path: Path) -> None:
    document = yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())
    document["spec"]["pod"] = {
        "schedulerName": "volcano",
        "runtimeClassName": "nvidia",
        "imagePullSecrets": ["registry-cred"],
        "annotations": {"example.com/team": "inference"},
        "extraResources": {"rdma/hca_shared_devices_a": 1},
        "addCapabilities": ["IPC_LOCK"],
        "startupTimeoutSeconds": 1801,
    }
    deployment = MoEDeployment.model_validate(document)
    template = stateful_set(deployment)["spec"]["template"]
    pod = template["spec"]
    assert pod["schedulerName"] == "volcano" and pod["runtimeClassName"] == "nvidia"
    assert pod["imagePullSecrets"] == [{"name": "registry-cred"}]
    assert pod["automountServiceAccountToken"] is False
    assert template["metadata"]["annotations"]["example.com/team"] == "inference"
    assert "moe.eplb.dev/config-hash" in template["metadata"]["annotations"]
    container = pod["containers"][0]
    for side in ("requests", "limits"):
        assert container["resources"][side]["rdma/hca_shared_devices_a"] == "1"
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["IPC_LOCK"]}
    probe = container["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] >= 1801
    # the defaults: no token, ten minutes to start, nothing added
    plain = stateful_set(load(ROOT / "examples" / "tiny.yaml"))["spec"]["template"]["spec"]
    assert plain["automountServiceAccountToken"] is False and "schedulerName" not in plain
    startup = plain["containers"][0]["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] == 600
    # and kubernetes-validate --strict takes the result
    rendered = tmp_path / "sts.yaml"
    rendered.write_text(yaml.safe_dump(stateful_set(deployment)))
    check = kubernetes_validate_strict(rendered)
    assert check.returncode == 0, check.stdout + check.stderr
    bad = dict(document["spec"]["pod"], addCapabilities=["SYS_ADMIN"])
    with pytest.raises(ValueError, match="addCapabilities"):
        MoEDeployment.model_validate({**document, "spec": {**document["spec"], "pod": bad}})

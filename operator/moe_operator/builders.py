"""Pure functions: a MoEDeployment -> the child manifests the operator creates.

Children (all labelled, all owned by the MoEDeployment when ``owner`` is given): headless
Service (stable pod DNS for rendezvous), metrics Service, ConfigMap (worker config), Secret
(control token), StatefulSet (pods = EP size / gpusPerPod, Parallel), PodDisruptionBudget,
NetworkPolicy, and a PodMonitor when the prometheus-operator CRDs exist.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import yaml

from .api.models import GROUP, KIND, VERSION, MoEDeployment

RENDEZVOUS_PORT = 29500
CONFIG_DIR = "/etc/moe-eplb/config"
TOKEN_DIR = "/etc/moe-eplb/token"
WORKER_USER = 10001
OPERATOR_LABELS = {"app.kubernetes.io/name": "moe-operator"}
STARTUP_PROBE_PERIOD_S = 5

Manifest = dict[str, Any]


def selector_labels(name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "moe-worker", "app.kubernetes.io/instance": name}


def labels(name: str) -> dict[str, str]:
    return {
        **selector_labels(name),
        "app.kubernetes.io/managed-by": "moe-operator",
        "app.kubernetes.io/part-of": "moe-eplb",
        f"{GROUP}/deployment": name,
    }


def selector_string(name: str) -> str:
    return ",".join(f"{k}={v}" for k, v in selector_labels(name).items())


def _metadata(deployment: MoEDeployment, name: str, owner_uid: str | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": labels(deployment.metadata.name)}
    if deployment.metadata.namespace:
        meta["namespace"] = deployment.metadata.namespace
    if owner_uid:
        meta["ownerReferences"] = [
            {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": KIND,
                "name": deployment.metadata.name,
                "uid": owner_uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
    return meta


def worker_config(deployment: MoEDeployment) -> dict[str, Any]:
    """The WorkerConfig (camelCase) every rank of this deployment reads."""
    spec = deployment.spec
    physical = spec.slots_per_rank * spec.base_ep_size
    eplb = spec.eplb.model_dump(by_alias=True)
    eplb["numRedundantExperts"] = physical - spec.model.num_experts
    return {
        "deployment": deployment.metadata.name,
        "epSize": spec.base_ep_size,
        "numNodes": spec.parallelism.num_nodes,
        "device": "cuda",
        "model": spec.model.model_dump(by_alias=True, exclude_none=True),
        "eplb": eplb,
        "serving": {
            **spec.serving.model_dump(by_alias=True, exclude_none=True),
            "enabled": spec.simulator is None,
        },
        **(
            {}
            if spec.simulator is None
            else {"workload": spec.simulator.model_dump(by_alias=True, exclude_none=True)}
        ),
        "metrics": {"port": spec.metrics.port, "perExpert": spec.metrics.per_expert},
        "control": {"port": spec.control.port, "tokenFile": f"{TOKEN_DIR}/token"},
    }


def control_port(deployment: MoEDeployment) -> int:
    return int(worker_config(deployment)["control"]["port"])


def config_map(deployment: MoEDeployment, owner_uid: str | None = None) -> Manifest:
    name = deployment.metadata.name
    text = yaml.safe_dump(worker_config(deployment), sort_keys=True)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(deployment, f"{name}-config", owner_uid),
        "data": {"worker.yaml": text},
    }


def control_secret(deployment: MoEDeployment, token: str, owner_uid: str | None = None) -> Manifest:
    name = deployment.metadata.name
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _metadata(deployment, f"{name}-control", owner_uid),
        "type": "Opaque",
        "data": {"token": base64.b64encode(token.encode()).decode()},
    }


def headless_service(deployment: MoEDeployment, owner_uid: str | None = None) -> Manifest:
    name = deployment.metadata.name
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(deployment, f"{name}-ranks", owner_uid),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": selector_labels(name),
            "ports": [
                {"name": "rendezvous", "port": RENDEZVOUS_PORT, "targetPort": RENDEZVOUS_PORT}
            ],
        },
    }


def metrics_service(deployment: MoEDeployment, owner_uid: str | None = None) -> Manifest:
    name = deployment.metadata.name
    spec = deployment.spec
    ports = [
        {"name": f"metrics-{i}", "port": spec.metrics.port + i, "targetPort": spec.metrics.port + i}
        for i in range(spec.parallelism.gpus_per_pod)
    ]
    ports.append(
        {
            "name": "control",
            "port": control_port(deployment),
            "targetPort": control_port(deployment),
        }
    )
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(deployment, f"{name}-metrics", owner_uid),
        "spec": {"selector": selector_labels(name), "ports": ports},
    }


def api_ports(deployment: MoEDeployment) -> list[tuple[str, int]]:
    """(port name, port) of a pod's OpenAI-compatible API: ``http`` on ``serving.port`` (its
    one rank's API, or in a pod of several ranks the router over theirs); none in the
    simulator's benchmark mode."""
    spec = deployment.spec
    if spec.simulator is not None:
        return []
    return [("http", spec.serving.port)]


def inference_service(deployment: MoEDeployment, owner_uid: str | None = None) -> Manifest:
    """Service ``<name>``: the API (port ``http``) over the pods that admit requests (ready)."""
    name = deployment.metadata.name
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(deployment, name, owner_uid),
        "spec": {
            "selector": selector_labels(name),
            "ports": [{"name": "http", "port": deployment.spec.serving.port, "targetPort": "http"}],
        },
    }


def endpoint(deployment: MoEDeployment) -> str | None:
    """The URL of the inference Service's API (None in the simulator's benchmark mode)."""
    if deployment.spec.simulator is not None:
        return None
    meta = deployment.metadata
    namespace = meta.namespace or "default"
    return f"http://{meta.name}.{namespace}.svc:{deployment.spec.serving.port}/v1"


def config_hash(deployment: MoEDeployment) -> str:
    """Changes whenever the worker config or image changes: pods roll."""
    payload = json.dumps([worker_config(deployment), deployment.spec.image], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def stateful_set(
    deployment: MoEDeployment, owner_uid: str | None = None, pods: int | None = None
) -> Manifest:
    """The ranks' StatefulSet; ``pods`` overrides the replicas (a live resize in progress)."""
    name = deployment.metadata.name
    spec = deployment.spec
    gpus = spec.parallelism.gpus_per_pod
    namespace = deployment.metadata.namespace or "default"
    env = [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        {"name": "WORLD_SIZE", "value": str(spec.base_ep_size)},
        {"name": "LOCAL_WORLD_SIZE", "value": str(gpus)},
        {"name": "MASTER_ADDR", "value": f"{name}-0.{name}-ranks.{namespace}.svc"},
        {"name": "MASTER_PORT", "value": str(RENDEZVOUS_PORT)},
        {"name": "NUMBA_CACHE_DIR", "value": "/tmp/numba"},
        *({"name": e.name, "value": e.value} for e in spec.env),
    ]
    mounts = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "control-token", "mountPath": TOKEN_DIR, "readOnly": True},
        {"name": "shm", "mountPath": "/dev/shm"},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": f"{name}-config"}},
        {
            "name": "control-token",
            "secret": {"secretName": f"{name}-control", "defaultMode": 0o440},
        },
        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.resources.shm}},
        {"name": "tmp", "emptyDir": {}},
    ]
    if spec.checkpoint_volume is not None:
        mounts.append(
            {"name": "checkpoint", "mountPath": spec.checkpoint_volume.mount_path, "readOnly": True}
        )
        volumes.append(
            {
                "name": "checkpoint",
                "persistentVolumeClaim": {
                    "claimName": spec.checkpoint_volume.claim_name,
                    "readOnly": True,
                },
            }
        )
    probe_port = spec.metrics.port
    container = {
        "name": "worker",
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["moe-eplb", "worker", "--config", f"{CONFIG_DIR}/worker.yaml"],
        "env": env,
        "ports": [
            {"name": "rendezvous", "containerPort": RENDEZVOUS_PORT},
            *(
                {"name": f"metrics-{i}", "containerPort": spec.metrics.port + i}
                for i in range(gpus)
            ),
            {"name": "control", "containerPort": control_port(deployment)},
            *({"name": n, "containerPort": port} for n, port in api_ports(deployment)),
        ],
        "resources": {
            "requests": {
                "cpu": spec.resources.cpu,
                "memory": spec.resources.memory,
                "nvidia.com/gpu": str(gpus),
                **spec.pod.extra_resources,
            },
            "limits": {
                "cpu": spec.resources.cpu,
                "memory": spec.resources.memory,
                "nvidia.com/gpu": str(gpus),
                **spec.pod.extra_resources,
            },
        },
        "volumeMounts": mounts,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": WORKER_USER,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {
                "drop": ["ALL"],
                **({"add": list(spec.pod.add_capabilities)} if spec.pod.add_capabilities else {}),
            },
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "startupProbe": {
            "httpGet": {"path": "/healthz", "port": probe_port},
            "periodSeconds": STARTUP_PROBE_PERIOD_S,
            "failureThreshold": -(-spec.pod.startup_timeout_seconds // STARTUP_PROBE_PERIOD_S),
        },
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": probe_port}, "periodSeconds": 5},
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": probe_port},
            "periodSeconds": 10,
            "failureThreshold": 6,
        },
    }
    pod_spec: dict[str, Any] = {
        "containers": [container],
        "volumes": volumes,
        "securityContext": {
            "runAsNonRoot": True,
            "fsGroup": WORKER_USER,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "terminationGracePeriodSeconds": 60,
        "automountServiceAccountToken": spec.pod.automount_service_account_token,
    }
    if spec.pod.scheduler_name:
        pod_spec["schedulerName"] = spec.pod.scheduler_name
    if spec.pod.runtime_class_name:
        pod_spec["runtimeClassName"] = spec.pod.runtime_class_name
    if spec.pod.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": n} for n in spec.pod.image_pull_secrets]
    if spec.node_selector:
        pod_spec["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        pod_spec["tolerations"] = [
            t.model_dump(by_alias=True, exclude_none=True) for t in spec.tolerations
        ]
    if spec.affinity:
        pod_spec["affinity"] = spec.affinity
    if spec.priority_class_name:
        pod_spec["priorityClassName"] = spec.priority_class_name
    if spec.service_account_name:
        pod_spec["serviceAccountName"] = spec.service_account_name
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _metadata(deployment, name, owner_uid),
        "spec": {
            "replicas": spec.parallelism.pods if pods is None else pods,
            "serviceName": f"{name}-ranks",
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": selector_labels(name)},
            "template": {
                "metadata": {
                    "labels": labels(name),
                    "annotations": {
                        **spec.pod.annotations,
                        f"{GROUP}/config-hash": config_hash(deployment),
                    },
                },
                "spec": pod_spec,
            },
        },
    }


def disruption_budget(deployment: MoEDeployment, owner_uid: str | None = None) -> Manifest:
    """At most one pod of the group voluntarily evicted at a time (the group then re-forms)."""
    name = deployment.metadata.name
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(deployment, name, owner_uid),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels(name)}},
    }


def network_policy(deployment: MoEDeployment, owner_uid: str | None = None) -> Manifest:
    """Ranks talk to each other freely; only the operator reaches the control port; metrics
    open; the API from the namespace's pods (``spec.apiIngress: namespace``) or from anywhere
    (``any``)."""
    name = deployment.metadata.name
    spec = deployment.spec
    metrics_ports = [
        {"protocol": "TCP", "port": spec.metrics.port + i}
        for i in range(spec.parallelism.gpus_per_pod)
    ]
    api = [{"protocol": "TCP", "port": port} for _, port in api_ports(deployment)]
    api_rules: list[dict[str, Any]] = []
    if api and spec.api_ingress == "namespace":
        api_rules.append({"from": [{"podSelector": {}}], "ports": api})
    elif api:
        api_rules.append({"ports": api})
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(deployment, name, owner_uid),
        "spec": {
            "podSelector": {"matchLabels": selector_labels(name)},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [{"podSelector": {"matchLabels": selector_labels(name)}}]},
                {
                    "from": [
                        {"namespaceSelector": {}, "podSelector": {"matchLabels": OPERATOR_LABELS}}
                    ],
                    "ports": [
                        {"protocol": "TCP", "port": control_port(deployment)},
                        *metrics_ports,
                    ],
                },
                {"ports": metrics_ports},
                *api_rules,
            ],
        },
    }


def pod_monitor(deployment: MoEDeployment, owner_uid: str | None = None) -> Manifest:
    name = deployment.metadata.name
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": _metadata(deployment, name, owner_uid),
        "spec": {
            "selector": {"matchLabels": selector_labels(name)},
            "podMetricsEndpoints": [
                {"port": f"metrics-{i}", "path": "/metrics"}
                for i in range(deployment.spec.parallelism.gpus_per_pod)
            ],
        },
    }


def children(
    deployment: MoEDeployment,
    token: str,
    owner_uid: str | None = None,
    with_pod_monitor: bool = False,
    pods: int | None = None,
) -> list[Manifest]:
    """Every child manifest, in creation order (config and identity before the pods)."""
    out = [
        config_map(deployment, owner_uid),
        control_secret(deployment, token, owner_uid),
        headless_service(deployment, owner_uid),
        metrics_service(deployment, owner_uid),
        *([inference_service(deployment, owner_uid)] if api_ports(deployment) else []),
        disruption_budget(deployment, owner_uid),
        network_policy(deployment, owner_uid),
        stateful_set(deployment, owner_uid, pods),
    ]
    if with_pod_monitor:
        out.append(pod_monitor(deployment, owner_uid))
    return out

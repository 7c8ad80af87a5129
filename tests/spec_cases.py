"""MoEDeployment cases shared by the validation tests: the tiny example as a base, edits of it,
the table of invalid specs (each with the field its error must name), and the CRD schema as
JSON Schema."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
BASE = yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())


def edited(path: str, value: Any) -> dict:
    """BASE with the dotted ``path`` set to ``value`` (``DELETE`` removes it)."""
    document = copy.deepcopy(BASE)
    *parents, last = path.split(".")
    node = document
    for part in parents:
        node = node.setdefault(part, {})
    if value is DELETE:
        node.pop(last, None)
    else:
        node[last] = value
    return document


DELETE = object()

INVALID: list[tuple[str, Any, str]] = [
    # types
    ("spec.parallelism.pods", "two", "spec.parallelism.pods"),
    ("spec.parallelism.gpusPerPod", 1.5, "spec.parallelism.gpusPerPod"),
    ("spec.image", 42, "spec.image"),
    ("spec.eplb.useAsync", "maybe", "spec.eplb.useAsync"),
    ("spec.nodeSelector", ["a"], "spec.nodeSelector"),
    ("spec.tolerations", {"key": "x"}, "spec.tolerations"),
    # ranges
    ("spec.parallelism.pods", 0, "spec.parallelism.pods"),
    ("spec.parallelism.gpusPerPod", 17, "spec.parallelism.gpusPerPod"),
    ("spec.eplb.windowSize", 0, "spec.eplb.windowSize"),
    ("spec.eplb.stepInterval", -5, "spec.eplb.stepInterval"),
    ("spec.eplb.numRedundantExperts", -1, "spec.eplb.numRedundantExperts"),
    ("spec.eplb.rebalanceTimeoutS", 0, "spec.eplb.rebalanceTimeoutS"),
    ("spec.remap.balancednessThreshold", 1.5, "spec.remap.balancednessThreshold"),
    ("spec.remap.balancednessThreshold", 0, "spec.remap.balancednessThreshold"),
    ("spec.metrics.port", 80, "spec.metrics.port"),
    ("spec.model.topK", 0, "spec.model.topK"),
    ("spec.simulator.tokensPerStep", 0, "spec.simulator.tokensPerStep"),
    ("spec.workload.concurrency", 0, "spec.workload.concurrency"),
    ("spec.workload.topics", 65, "spec.workload.topics"),
    ("spec.serving.maxRunningRequests", 0, "spec.serving.maxRunningRequests"),
    ("spec.serving.port", 70000, "spec.serving.port"),
    # enums and patterns
    ("spec.imagePullPolicy", "Sometimes", "spec.imagePullPolicy"),
    ("spec.eplb.policy", "magic", "spec.eplb.policy"),
    ("spec.eplb.communicator", "mpi", "spec.eplb.communicator"),
    ("spec.model.scoring", "relu", "spec.model.scoring"),
    ("spec.model.dtype", "int8", "spec.model.dtype"),
    ("spec.simulator.kind", "bursty", "spec.simulator.kind"),
    ("spec.workload.promptWords.kind", "bimodal", "spec.workload.promptWords.kind"),
    ("spec.resources.memory", "lots", "spec.resources.memory"),
    ("spec.metrics.prometheusUrl", "prometheus:9090", "spec.metrics.prometheusUrl"),
    ("spec.env", [{"name": "1BAD", "value": "x"}], "spec.env[0].name"),
    ("spec.nodeSelector", {"bad key!": "x"}, "spec.nodeSelector"),
    ("metadata.name", "Tiny_Deployment", "metadata.name"),
    ("metadata.name", "1tiny", "metadata.name"),  # a Service name starts with a letter
    ("spec.resources.cpu", "four", "spec.resources.cpu"),
    ("spec.resources.cpu", True, "spec.resources.cpu"),
    ("apiVersion", "moe.eplb.dev/v1", "apiVersion"),
    ("kind", "Deployment", "kind"),
    # cross-field
    ("spec.parallelism.gpusPerPod", 4, "spec.elastic: minExpertParallelSize <= the EP size"),
    ("spec.parallelism.slotsPerRank", 3, "spec.parallelism.slotsPerRank"),
    ("spec.elastic.maxExpertParallelSize", 1, "spec.elastic: minExpertParallelSize <="),
    ("spec.elastic.tokensPerRankLow", 1e9, "spec.elastic.tokensPerRankLow"),
    ("spec.model.topK", 20, "spec.model"),
    ("spec.model.source", "checkpoint", "spec.model"),
    (
        "spec.parallelism.numNodes",
        4,
        "spec.parallelism.pods: must be divisible by parallelism.numNodes",
    ),
    ("spec.affinity", {"nodeSelector": {}}, "spec.affinity"),
    ("spec.control.port", 9400, "spec.control.port: must not be one of the metrics ports"),
    ("spec.model.draft", {"numExperts": 8}, "spec.model.draft: elastic resizes"),
    ("spec.model.draft", {"source": "checkpoint"}, "spec.model.draft"),
    ("spec.model.draft", {"topK": 9, "numExperts": 8}, "spec.model.draft"),
    # unknown and missing fields
    ("spec.replicas", 3, "spec.replicas: unknown field"),
    ("spec.eplb.windowsize", 5, "spec.eplb.windowsize: unknown field"),
    ("spec.parallelism.pods", DELETE, "spec.parallelism.pods: required"),
    ("spec.parallelism.expertParallelSize", 2, "spec.parallelism.expertParallelSize: unknown"),
    ("spec.image", DELETE, "spec.image: required"),
]


def as_jsonschema(node: Any) -> Any:
    """OpenAPI ``nullable`` and boolean exclusive bounds, as JSON Schema understands them."""
    if isinstance(node, list):
        return [as_jsonschema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {k: as_jsonschema(v) for k, v in node.items() if not k.startswith("x-kubernetes")}
    if out.pop("nullable", False):
        out["type"] = [out["type"], "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    if out.get("exclusiveMinimum") is True:
        out["exclusiveMinimum"] = out.pop("minimum")
    if out.get("exclusiveMaximum") is True:
        out["exclusiveMaximum"] = out.pop("maximum")
    return out

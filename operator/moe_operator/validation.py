"""Validation of MoEDeployment documents: one message per problem, each naming the field path.

Three layers share these rules: the CRD (schema + CEL, in the API server), the optional
admission webhook (``admission_problems``: everything here plus what CEL cannot express, such
as fields that may not change once the deployment exists), and the operator itself, which marks
a deployment it cannot act on Degraded instead of failing.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from .api.models import IMMUTABLE_FIELDS, MoEDeployment


# Fields fixed at creation: the model's shape decides every weight tensor and slot.
def _path(location: tuple[Any, ...]) -> str:
    out = ""
    for part in location:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def semantic_problems(deployment: MoEDeployment) -> list[str]:
    """Rules over derived values (which CEL cannot compute): every EP size the elastic policy
    may choose must hold all experts with the deployment's fixed slots per rank."""
    spec = deployment.spec
    if not spec.elastic.enabled:
        return []
    slots = spec.slots_per_rank
    smallest = spec.elastic.min_expert_parallel_size  # a whole number of steps (a CEL rule)
    out = []
    if smallest * slots < spec.model.num_experts:
        out.append(
            f"spec.elastic.minExpertParallelSize: at EP size {smallest} the {slots} slots per "
            f"rank hold {smallest * slots} experts, fewer than model.numExperts = "
            f"{spec.model.num_experts}"
        )
    return out


def problems(document: Any) -> list[str]:
    """Everything wrong with one MoEDeployment document (empty when it is valid)."""
    if not isinstance(document, dict):
        return [f"document: must be a mapping, got {type(document).__name__}"]
    try:
        deployment = MoEDeployment.model_validate(document)
    except ValidationError as exc:
        messages = []
        for error in exc.errors():
            message = error["msg"].removeprefix("Value error, ")
            path = _path(tuple(error["loc"]))
            if error["type"] == "extra_forbidden":
                message = "unknown field"
            elif error["type"] == "missing":
                message = "required field is missing"
            # Cross-field rules name their own field path; others get the location.
            if message.startswith("spec."):
                messages.extend(message.splitlines())
            else:
                messages.append(f"{path}: {message}")
        return messages
    return semantic_problems(deployment)


# The model's shape: a synthetic model's size, and what a checkpoint's placement is sized by.
SHAPE_FIELDS = ("numLayers", "hiddenSize", "numExperts", "topK", "intermediateSize")


def assumptions(document: dict[str, Any]) -> list[str]:
    """What a valid MoEDeployment leaves to defaults that a reader would take for required, and
    what the operator derives differently from what was written; one line each, naming the
    field. (Shown by ``validate`` and ``render``: a default is never silent.)"""
    spec = MoEDeployment.model_validate(document).spec
    model = spec.model.model_dump(by_alias=True)
    given = _lookup(document, ("spec", "model"))
    notes = []
    shape = ", ".join(f"{name} {model[name]}" for name in SHAPE_FIELDS)
    if not isinstance(given, dict):
        notes.append(
            f"spec.model: not given; assumed a synthetic {spec.model.family} model with "
            f"seeded random weights: {shape}"
        )
    else:
        # A checkpoint's own config gives its sizes; the placement is sized by these two.
        fields = SHAPE_FIELDS if spec.model.source == "synthetic" else ("numExperts", "topK")
        absent = [name for name in fields if name not in given]
        if absent:
            notes.append(
                "spec.model: defaults assumed for what is not given: "
                + ", ".join(f"{name} {model[name]}" for name in absent)
            )
    asked = spec.eplb.num_redundant_experts
    physical = spec.slots_per_rank * spec.base_ep_size
    used = physical - spec.model.num_experts
    if spec.parallelism.slots_per_rank is None and used != asked:
        notes.append(
            f"spec.eplb.numRedundantExperts: {asked} asked, {used} used: the EP size "
            f"{spec.base_ep_size} does not divide {spec.model.num_experts} experts + {asked}, so "
            f"each rank gets {spec.slots_per_rank} slots ({physical} in all); give a count "
            "that divides, or parallelism.slotsPerRank"
        )
    return notes


def _lookup(document: Any, path: tuple[str, ...]) -> Any:
    node = document
    for part in path:
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def admission_problems(new: Any, old: Any | None) -> list[str]:
    """What the validating webhook rejects: ``problems(new)`` plus, on update, changes to
    fields that are fixed once the deployment exists. An update that leaves the spec as it was
    (metadata only: a finalizer removed, a label or annotation set) passes whatever the spec
    holds: an object stored before a rule existed must still be deletable."""
    if old is not None and isinstance(new, dict) and isinstance(old, dict):
        if new.get("spec") == old.get("spec"):
            return []
    found = problems(new)
    if old is not None:
        for path in IMMUTABLE_FIELDS:
            before, after = _lookup(old, path), _lookup(new, path)
            if before != after:
                found.append(
                    f"{'.'.join(path)}: is immutable (was {before!r}, now {after!r}); "
                    "create a new MoEDeployment instead"
                )
    return found

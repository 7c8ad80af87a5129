"""The CRD's CEL rules as a real API server runs them: Google's CEL (``cel-expr-python``) on the
spec after structural defaulting (a missing field with a ``default`` gets it, then its own
nested defaults). Every example and a minimal spec pass; every invalid spec of the validation
table is rejected by the OpenAPI schema or by CEL, naming the field, and the pydantic models
agree on every case."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from cel_expr_python import cel

from moe_operator.api.models import IMMUTABLE_FIELDS
from moe_operator.crdgen import openapi_schema
from moe_operator.validation import admission_problems, problems
from spec_cases import INVALID, as_jsonschema, edited

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
MINIMAL = {
    "apiVersion": "moe.eplb.dev/v1alpha1",
    "kind": "MoEDeployment",
    "metadata": {"name": "minimal"},
    "spec": {"image": "ghcr.io/moe-eplb/worker:0.1.0", "parallelism": {"pods": 2}},
}
# Quantities as numbers, as Kubernetes takes them (cpu: 4)
NUMERIC_QUANTITY = {
    **MINIMAL,
    "spec": {**MINIMAL["spec"], "resources": {"cpu": 4, "memory": "8Gi"}},
}
# What the API server cannot reject: unknown fields are pruned, not refused (`moe-eplb
# validate`, the webhook and the operator name them); rules over values the schema does not
# hold, enforced by the models (the webhook) alone.
PRUNED = {"spec.replicas", "spec.eplb.windowsize", "spec.parallelism.expertParallelSize"}
OUTSIDE_SPEC = {"metadata.name", "apiVersion", "kind"}


def structural_default(schema: dict[str, Any], value: Any) -> Any:
    """``value`` with the schema's defaults applied, as the API server applies them."""
    if isinstance(value, dict) and schema.get("type") == "object":
        out = dict(value)
        for name, prop in (schema.get("properties") or {}).items():
            if name not in out and "default" in prop:
                out[name] = copy.deepcopy(prop["default"])
            if name in out:
                out[name] = structural_default(prop, out[name])
        return out
    if isinstance(value, list) and "items" in schema:
        return [structural_default(schema["items"], item) for item in value]
    return value


def spec_schema() -> dict[str, Any]:
    return openapi_schema()["properties"]["spec"]  # type: ignore[no-any-return]


def cel_rejections(spec: dict[str, Any], old: dict[str, Any] | None = None) -> list[str]:
    """The messages of the rules that do not hold for ``spec`` (defaulted first; on an update
    ``old`` is the stored spec and the transition rules run too); a rule that errs (a missing
    key, a type mismatch) rejects too, as the API server's does."""
    schema = spec_schema()
    defaulted = structural_default(schema, spec)
    env = cel.NewEnv(variables={"self": cel.Type.DYN, "oldSelf": cel.Type.DYN})
    data = {"self": defaulted}
    if old is not None:
        data["oldSelf"] = structural_default(schema, old)
    out = []
    for rule in schema["x-kubernetes-validations"]:
        if "oldSelf" in rule["rule"] and old is None:
            continue  # a transition rule: updates only
        result = env.compile(rule["rule"]).eval(data=data).plain_value()
        if result is not True:
            out.append(rule["message"] if result is False else f"{rule['message']} ({result})")
    return out


def schema_rejections(document: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft202012Validator(as_jsonschema(openapi_schema()))
    return [
        ".".join(str(p) for p in error.absolute_path) + ": " + error.message
        for error in validator.iter_errors(document)
    ]


def test_a_rule_that_errs_rejects() -> None:
    """The harness itself: a rule reading a missing key is an error, not a pass."""
    env = cel.NewEnv(variables={"self": cel.Type.DYN})
    result = env.compile("self.elastic.enabled").eval(data={"self": {}}).plain_value()
    assert result is not True and result is not False


@pytest.mark.parametrize(
    "document",
    [*(yaml.safe_load(e.read_text()) for e in EXAMPLES), MINIMAL, NUMERIC_QUANTITY],
    ids=[*(e.name for e in EXAMPLES), "minimal", "numeric-quantity"],
)
def test_valid_specs_pass_the_schema_cel_and_the_models(document: dict[str, Any]) -> None:
    assert schema_rejections(document) == []
    assert cel_rejections(document["spec"]) == []
    assert problems(document) == []


def test_the_minimal_spec_is_defaulted_into_what_the_models_build() -> None:
    from moe_operator.api import MoEDeployment

    defaulted = structural_default(spec_schema(), MINIMAL["spec"])
    built = MoEDeployment.model_validate(MINIMAL).spec.model_dump(by_alias=True, mode="json")
    for section in ("elastic", "remap", "model", "eplb", "serving", "workload", "metrics"):
        # (unset optional values and empty lists are absent in the API server's object)
        expected = {k: v for k, v in built[section].items() if v is not None and v != []}
        assert defaulted[section] == expected, section


@pytest.mark.parametrize(
    ("path", "value", "expected"), INVALID, ids=[f"{p}={v!r}"[:60] for p, v, _ in INVALID]
)
def test_invalid_specs_are_rejected_by_the_api_server_and_the_models(
    path: str, value: Any, expected: str
) -> None:
    document = edited(path, value)
    assert problems(document), "the models accept it"
    if path in PRUNED or path in OUTSIDE_SPEC:
        return
    by_schema = schema_rejections(document)
    by_cel = [] if by_schema else cel_rejections(document["spec"])
    assert by_schema or by_cel, f"the API server would accept {path}={value!r}"
    if by_cel:  # CEL's message names the field as the models' does
        assert any(expected.split(":")[0] in message for message in by_cel), by_cel


@pytest.mark.parametrize(
    "path", [".".join(p) for p in IMMUTABLE_FIELDS], ids=[".".join(p) for p in IMMUTABLE_FIELDS]
)
def test_immutable_fields_are_refused_on_update_by_cel_and_the_webhook(path: str) -> None:
    stored = yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())
    assert cel_rejections(stored["spec"], stored["spec"]) == []  # an unchanged update passes
    changed = copy.deepcopy(stored)
    *parents, last = path.split(".")
    node = changed
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = "checkpoint" if last == "source" else int(node.get(last) or 1) * 2
    by_cel = [m for m in cel_rejections(changed["spec"], stored["spec"]) if "immutable" in m]
    assert by_cel == [f"{path}: is immutable; create a new MoEDeployment instead"], by_cel
    assert any(
        message.startswith(f"{path}: is immutable")
        for message in admission_problems(changed, stored)
    )
    # a field that may change (the EP size, within the elastic range) passes both
    scaled = copy.deepcopy(stored)
    scaled["spec"]["parallelism"]["pods"] = 3
    assert cel_rejections(scaled["spec"], stored["spec"]) == []
    assert admission_problems(scaled, stored) == []


@pytest.mark.parametrize(
    "document",
    [*(yaml.safe_load(e.read_text()) for e in EXAMPLES), MINIMAL],
    ids=[*(e.name for e in EXAMPLES), "minimal"],
)
def test_a_scale_write_is_judged_by_the_api_server_as_the_webhook_would(
    document: dict[str, Any],
) -> None:
    """``/scale`` writes reach no validating webhook registered for the main resource, but the
    API server validates the object they produce (schema and CEL, transition rules included).
    For every pod count an HPA or ``kubectl scale`` may write, its verdict is the webhook's:
    nothing the webhook checks can slip in through ``/scale``."""
    spec = document["spec"]
    most = int((spec.get("elastic") or {}).get("maxExpertParallelSize") or 8)
    accepted = []
    for pods in range(0, most + 3):
        scaled = copy.deepcopy(document)
        scaled["spec"]["parallelism"]["pods"] = pods
        by_api_server = schema_rejections(scaled) or cel_rejections(scaled["spec"], spec)
        by_webhook = admission_problems(scaled, document)
        assert bool(by_api_server) == bool(by_webhook), (pods, by_api_server, by_webhook)
        if not by_webhook:
            accepted.append(pods)
    assert spec["parallelism"]["pods"] in accepted
    if (spec.get("elastic") or {}).get("enabled"):
        gpus = spec["parallelism"].get("gpusPerPod", 1)
        assert {p * gpus for p in accepted} <= set(
            range(spec["elastic"]["minExpertParallelSize"], most + 1)
        )


def test_the_hpa_example_owns_sizes_the_api_server_accepts(tmp_path: Path) -> None:
    """examples/autoscaling: a valid MoEDeployment with an external scaler, and an HPA (valid
    for Kubernetes) on its scale subresource whose every replica count is a pod count the API
    server accepts, its bounds the elastic range."""
    from manifest_checks import kubernetes_validate_strict

    path = ROOT / "examples" / "autoscaling" / "qwen3-30b-a3b-hpa.yaml"
    deployment, hpa = yaml.safe_load_all(path.read_text())
    assert schema_rejections(deployment) == [] and problems(deployment) == []
    assert cel_rejections(deployment["spec"]) == []
    spec = deployment["spec"]
    assert spec["elastic"]["scaler"] == "external"
    only_hpa = tmp_path / "hpa.yaml"
    only_hpa.write_text(yaml.safe_dump(hpa))
    checked = kubernetes_validate_strict(only_hpa)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        deployment["apiVersion"],
        deployment["kind"],
        deployment["metadata"]["name"],
    )
    gpus = spec["parallelism"]["gpusPerPod"]
    low, high = hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]
    assert (low * gpus, high * gpus) == (
        spec["elastic"]["minExpertParallelSize"],
        spec["elastic"]["maxExpertParallelSize"],
    )
    for pods in range(low, high + 1):
        scaled = copy.deepcopy(deployment)
        scaled["spec"]["parallelism"]["pods"] = pods
        assert cel_rejections(scaled["spec"], spec) == [] and problems(scaled) == [], pods


SPECULATIVE = yaml.safe_load((ROOT / "examples" / "speculative.yaml").read_text())


@pytest.mark.parametrize(
    ("draft", "field"),
    [
        ({"source": "checkpoint"}, "spec.model.draft.path"),
        ({"path": "/models/draft"}, "spec.model.draft.path"),
        ({"topK": 9, "numExperts": 8}, "spec.model.draft.topK"),
    ],
)
def test_each_draft_rule_rejects_alone(draft: dict[str, Any], field: str) -> None:
    """On the speculative example (elastic off), each of the draft's own rules rejects by
    itself, in the API server (CEL) and in the models, naming the draft's field."""
    document = copy.deepcopy(SPECULATIVE)
    document["spec"]["model"]["draft"] = draft
    by_cel = cel_rejections(document["spec"])
    assert [m for m in by_cel if m.startswith(field)] == by_cel, by_cel
    assert by_cel, "CEL accepts it"
    assert problems(document), "the models accept it"
    assert all("spec.model.draft" in p for p in problems(document)), problems(document)


def test_a_draft_refuses_elastic_resizes_and_the_simulator() -> None:
    for edit, field in (
        (
            {"elastic": {"enabled": True, "minExpertParallelSize": 2, "maxExpertParallelSize": 4}},
            "spec.model.draft: elastic resizes",
        ),
        ({"simulator": {"tokensPerStep": 8}}, "spec.model.draft: speculative decoding serves"),
    ):
        document = copy.deepcopy(SPECULATIVE)
        document["spec"].update(edit)
        assert any(m.startswith(field) for m in cel_rejections(document["spec"])), field
        assert any(p.startswith(field) for p in problems(document)), problems(document)


def test_replica_shares_need_the_incremental_policy() -> None:
    """Shares are chosen by the incremental policy's moves: with another policy the API server
    (CEL) and the models refuse them, naming the field; with incremental both accept them."""
    for policy, refused in (("balanced", True), ("incremental", False), ("deepseek", True)):
        document = yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())
        document["spec"].setdefault("eplb", {}).update(replicaShares=True, policy=policy)
        by_cel = cel_rejections(document["spec"])
        by_models = problems(document)
        if refused:
            assert [m for m in by_cel if m.startswith("spec.eplb.replicaShares")] == by_cel
            assert by_cel and any("spec.eplb.replicaShares" in p for p in by_models), by_models
        else:
            assert by_cel == [] and by_models == []
    document = yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())
    document["spec"].setdefault("eplb", {}).update(replicaShares=True, policy="incremental")
    document["spec"]["parallelism"].update(pods=2, numNodes=2)
    assert any("numNodes must be 1" in m for m in cel_rejections(document["spec"]))
    assert any("numNodes must be 1" in p for p in problems(document)), problems(document)

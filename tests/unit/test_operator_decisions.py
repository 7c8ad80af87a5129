"""The operator's pure decisions: child drift, status and conditions, admission rules."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

from moe_operator.api import MoEDeployment
from moe_operator.builders import children, stateful_set
from moe_operator.drift import contains, plan_child
from moe_operator.status import Observed, compute_status
from moe_operator.validation import admission_problems

ROOT = Path(__file__).resolve().parents[2]
TINY = yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())


def test_contains_ignores_server_defaults_but_not_changed_values() -> None:
    desired = {"spec": {"ports": [{"port": 80}], "selector": {"a": "b"}}}
    live = {"spec": {"ports": [{"port": 80, "protocol": "TCP"}], "selector": {"a": "b"}, "x": 1}}
    assert contains(live, desired)
    assert not contains({"spec": {"ports": [{"port": 81}], "selector": {"a": "b"}}}, desired)
    assert not contains({"spec": {"ports": [], "selector": {"a": "b"}}}, desired)


def test_plan_child_creates_patches_and_leaves_alone() -> None:
    deployment = MoEDeployment.model_validate(TINY)
    desired = stateful_set(deployment, owner_uid="u1")
    assert plan_child(None, desired).verb == "create"
    live = copy.deepcopy(desired)
    live["metadata"]["uid"] = "x"
    live["spec"]["template"]["spec"]["containers"][0]["terminationMessagePath"] = "/dev/t"
    assert plan_child(live, desired).verb == "none"
    live["spec"]["replicas"] = 7
    action = plan_child(live, desired)
    assert action.verb == "patch" and action.body["spec"]["replicas"] == 2
    assert "metadata" not in action.body


def test_the_control_token_is_never_rewritten() -> None:
    deployment = MoEDeployment.model_validate(TINY)
    first = next(c for c in children(deployment, "token-1") if c["kind"] == "Secret")
    second = next(c for c in children(deployment, "token-2") if c["kind"] == "Secret")
    assert plan_child(first, second).verb == "none"


def observed(**changes: object) -> Observed:
    base = dict(
        generation=3,
        ep_size=4,
        gpus_per_pod=2,
        selector="s",
        pods_wanted=2,
        pods_ready=1,
        pods_updated=2,
        sts_generation=5,
        sts_observed_generation=5,
    )
    base.update(changes)
    return Observed(**base)  # type: ignore[arg-type]


def conditions(status: dict) -> dict[str, dict]:
    return {c["type"]: c for c in status["conditions"]}


def test_status_pending_then_running_keeps_transition_times() -> None:
    pending = compute_status(observed(), None, "2026-01-01T00:00:00Z")
    assert pending["phase"] == "Pending" and pending["readyRanks"] == 2
    assert conditions(pending)["Progressing"]["status"] == "True"
    running = compute_status(observed(pods_ready=2), pending, "2026-01-01T00:01:00Z")
    got = conditions(running)
    assert running["phase"] == "Running" and running["readyRanks"] == 4
    assert got["Ready"]["status"] == "True"
    assert got["Ready"]["lastTransitionTime"] == "2026-01-01T00:01:00Z"
    # Degraded stayed False: its transition time is the first one.
    assert got["Degraded"]["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    assert running["observedGeneration"] == 3


def test_status_not_ready_until_the_statefulset_observed_its_generation() -> None:
    stale = compute_status(observed(pods_ready=2, sts_observed_generation=4), None, "t")
    assert stale["phase"] == "Pending"


def test_status_degraded_names_reason_and_message() -> None:
    status = compute_status(
        observed(problem=("InvalidSpec", "spec.x: bad")), None, "2026-01-01T00:00:00Z"
    )
    got = conditions(status)
    assert status["phase"] == "Degraded"
    assert got["Degraded"]["reason"] == "InvalidSpec"
    assert got["Degraded"]["message"] == "spec.x: bad"
    assert got["Ready"]["status"] == "False"


def test_admission_rejects_changes_to_fixed_fields_only() -> None:
    new = copy.deepcopy(TINY)
    new["spec"]["image"] = "other:1"
    new["spec"]["parallelism"]["pods"] = 4
    assert admission_problems(new, TINY) == []
    new["spec"]["model"]["numLayers"] = 3
    new["spec"]["parallelism"]["gpusPerPod"] = 2
    found = admission_problems(new, TINY)
    assert any(p.startswith("spec.model.numLayers: is immutable") for p in found)
    assert any(p.startswith("spec.parallelism.gpusPerPod: is immutable") for p in found)


def test_every_elastic_size_must_hold_all_experts() -> None:
    """A rule over derived values that CEL cannot express; the operator and webhook apply it."""
    from moe_operator.validation import problems

    document = copy.deepcopy(TINY)
    document["spec"]["parallelism"]["slotsPerRank"] = 4
    document["spec"]["parallelism"]["pods"] = 4
    document["spec"]["elastic"]["minExpertParallelSize"] = 1
    found = problems(document)
    assert found == [
        "spec.elastic.minExpertParallelSize: at EP size 1 the 4 slots per rank hold 4 "
        "experts, fewer than model.numExperts = 16"
    ]
    document["spec"]["parallelism"]["gpusPerPod"] = 4
    document["spec"]["parallelism"]["pods"] = 1
    document["spec"]["elastic"]["maxExpertParallelSize"] = 4
    document["spec"]["elastic"]["minExpertParallelSize"] = 4
    assert problems(document) == []  # the smallest size is 4: 16 slots
    document["spec"]["elastic"]["minExpertParallelSize"] = 1  # not a whole pod
    assert problems(document) == [
        "spec.elastic: minExpertParallelSize and maxExpertParallelSize must be multiples of "
        "parallelism.gpusPerPod x numNodes (whole pods, as many on every node)"
    ]


def test_an_invalid_object_can_still_lose_its_finalizer() -> None:
    """Kopf removes its finalizer with a metadata-only patch: the webhook must pass it even
    when the stored spec breaks a rule (else the object stays Terminating for ever)."""
    invalid = copy.deepcopy(TINY)
    invalid["spec"]["elastic"]["maxExpertParallelSize"] = 1  # below the minimum and the size
    assert admission_problems(invalid, None)  # it would not be created today
    finalized = copy.deepcopy(invalid)
    finalized["metadata"]["finalizers"] = []
    assert admission_problems(finalized, invalid) == []
    changed = copy.deepcopy(invalid)
    changed["spec"]["image"] = "ghcr.io/moe-eplb/worker:0.2.0"
    assert admission_problems(changed, invalid)  # a spec change is checked in full


def test_a_reconcile_round_leaves_the_autopilots_degraded_reason_alone() -> None:
    """MetricsUnavailable is the autopilot's to set and clear: a reconcile round in between
    keeps it (no flip, and no warning Event, every resync), but clears its own reasons."""
    from moe_operator.status import METRICS_UNAVAILABLE, set_condition

    first = compute_status(observed(pods_ready=2), None, "2026-01-01T00:00:00Z")
    flagged = dict(first)
    flagged["conditions"] = set_condition(
        first["conditions"], "Degraded", True, METRICS_UNAVAILABLE, "no series", 3, "t1"
    )
    again = conditions(compute_status(observed(pods_ready=2), flagged, "2026-01-01T00:02:00Z"))
    assert again["Degraded"]["status"] == "True"
    assert again["Degraded"]["reason"] == METRICS_UNAVAILABLE
    invalid = compute_status(observed(problem=("InvalidSpec", "spec.x: bad")), first, "t2")
    fixed = conditions(compute_status(observed(pods_ready=2), invalid, "t3"))
    assert fixed["Degraded"]["status"] == "False" and fixed["Degraded"]["reason"] == "AsExpected"

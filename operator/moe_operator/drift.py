"""Pure: what to do to a child object so it matches its desired manifest.

The API server adds defaults (``protocol: TCP``, ``terminationMessagePath``, ...) that a
manifest never names, so "matches" means the desired manifest is contained in the live object:
every key the operator sets has the value it sets. A child that does not match gets a JSON merge
patch of the sections the operator owns; the control-token Secret keeps its data forever.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

OWNED_META = ("labels", "annotations", "ownerReferences")
# Sections the operator sets on each kind, beyond metadata; other top-level keys are left alone.
OWNED_SECTIONS: dict[str, tuple[str, ...]] = {
    "ConfigMap": ("data",),
    "Secret": (),  # the token is made once and never rewritten
    "StatefulSet": ("spec",),
    "Service": ("spec",),
    "PodDisruptionBudget": ("spec",),
    "NetworkPolicy": ("spec",),
    "PodMonitor": ("spec",),
}


def contains(live: Any, desired: Any) -> bool:
    """Whether every value in ``desired`` is present and equal in ``live`` (dicts recursively,
    lists element by element with the same length)."""
    if isinstance(desired, dict):
        return isinstance(live, dict) and all(
            key in live and contains(live[key], value) for key, value in desired.items()
        )
    if isinstance(desired, list):
        return (
            isinstance(live, list)
            and len(live) == len(desired)
            and all(contains(a, b) for a, b in zip(live, desired, strict=True))
        )
    return bool(live == desired)


@dataclass(frozen=True)
class ChildAction:
    """``create`` the manifest, ``patch`` with ``body``, or nothing (``none``)."""

    verb: Literal["create", "patch", "none"]
    body: dict[str, Any]


def plan_child(live: dict[str, Any] | None, desired: dict[str, Any]) -> ChildAction:
    """The action that brings ``live`` (None: absent) to ``desired``."""
    if live is None:
        return ChildAction("create", desired)
    sections = OWNED_SECTIONS.get(desired["kind"], ("spec",))
    body: dict[str, Any] = {}
    live_meta = live.get("metadata") or {}
    for key in OWNED_META:
        wanted = desired["metadata"].get(key)
        if wanted is not None and not contains(live_meta.get(key), wanted):
            body.setdefault("metadata", {})[key] = wanted
    for section in sections:
        wanted = desired.get(section)
        if wanted is not None and not contains(live.get(section), wanted):
            body[section] = wanted
    return ChildAction("patch", body) if body else ChildAction("none", {})

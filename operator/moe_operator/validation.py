"""Validation of MoEDeployment documents: one message per problem, each naming the field path."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from .api.models import MoEDeployment


def _path(location: tuple[Any, ...]) -> str:
    out = ""
    for part in location:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def problems(document: Any) -> list[str]:
    """Everything wrong with one MoEDeployment document (empty when it is valid)."""
    if not isinstance(document, dict):
        return [f"document: must be a mapping, got {type(document).__name__}"]
    try:
        MoEDeployment.model_validate(document)
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
            if message.startswith("spec.") or message.startswith("path:"):
                prefix = path + "." if message.startswith("path:") else ""
                messages.append(prefix + message)
            else:
                messages.append(f"{path}: {message}")
        return messages
    return []

"""The MoEDeployment API: pydantic models, the single source of truth for the CRD."""

from .models import (
    CROSS_FIELD_RULES,
    GROUP,
    KIND,
    PLURAL,
    SHORT_NAMES,
    SINGULAR,
    VERSION,
    MoEDeployment,
    MoEDeploymentSpec,
    MoEDeploymentStatus,
)

__all__ = [
    "CROSS_FIELD_RULES",
    "GROUP",
    "KIND",
    "PLURAL",
    "SHORT_NAMES",
    "SINGULAR",
    "VERSION",
    "MoEDeployment",
    "MoEDeploymentSpec",
    "MoEDeploymentStatus",
]

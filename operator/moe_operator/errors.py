"""Errors shared by the Kubernetes client and its callers, importable without the client library
(the local runtime shares the actuator with the operator but never talks to an API server)."""

from __future__ import annotations


class KubeError(Exception):
    """An API call failed; ``status`` is the HTTP status (0 when no response)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status

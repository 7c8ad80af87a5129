"""Shared manifest checks for the tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

KUBERNETES_VERSION = "1.33.0"


def kubernetes_validate_strict(path: Path) -> subprocess.CompletedProcess[str]:
    """`kubernetes-validate --strict` on a multi-document YAML file."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "kubernetes_validate",
            "--strict",
            "--quiet",
            "-k",
            KUBERNETES_VERSION,
            str(path),
        ],
        capture_output=True,
        text=True,
    )

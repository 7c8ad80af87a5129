"""Shared test setup: the tests folder is importable (spawned ranks import their functions)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# moe_operator.handlers reads these at import, and any test module may import it first:
# a fast resync, the admission webhook on plain HTTP, the operator's metrics on a free port.
os.environ.setdefault("MOE_OPERATOR_RESYNC_SECONDS", "1")
os.environ.setdefault("MOE_OPERATOR_POLICY_SECONDS", "1")
# The tests' "pods" are local processes, pod k on its own loopback address (local_pods.py).
os.environ.setdefault("MOE_OPERATOR_POD_HOST", "127.0.1.{ordinal}")
os.environ.setdefault("MOE_OPERATOR_WEBHOOK_PORT", str(_free_port()))
os.environ.setdefault("MOE_OPERATOR_METRICS_PORT", str(_free_port()))

"""Boundaries between the parts (DESIGN.md): each is checked in a fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import get_args

ROOT = Path(__file__).resolve().parents[2]


def loaded_modules(*modules: str) -> set[str]:
    """Import ``modules`` in a fresh interpreter; return every module name it then has loaded."""
    code = (
        "import importlib, json, sys\n"
        f"for name in {list(modules)!r}: importlib.import_module(name)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    return set(json.loads(result.stdout))


def test_source_roots_are_not_packages() -> None:
    assert not (ROOT / "operator" / "__init__.py").exists()
    assert not (ROOT / "worker" / "__init__.py").exists()


def test_import_operator_is_the_stdlib_module() -> None:
    code = (
        "import moe_operator, operator, sysconfig\n"
        "assert operator.__file__.startswith(sysconfig.get_paths()['stdlib']), operator.__file__\n"
        "assert operator.attrgetter('real')(3) == 3\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_operator_never_imports_torch() -> None:
    modules = loaded_modules(
        "moe_operator",
        "moe_operator.cli",
        "moe_operator.api",
        "moe_operator.crdgen",
        "moe_operator.validation",
        "moe_operator.handlers",
        "moe_operator.k8s",
        "moe_operator.policy",
        "moe_operator.metrics_source",
        "moe_operator.autopilot",
        "moe_operator.runtime.local",
    )
    assert "torch" not in modules


def test_the_local_runtime_needs_no_kubernetes_client() -> None:
    """`moe-eplb run` shares the operator's actions but talks to no API server (a GPU host
    with the worker extra and aiohttp runs it without kopf or kubernetes_asyncio)."""
    modules = loaded_modules("moe_operator.runtime.local", "moe_operator.actuator")
    assert not {"kubernetes_asyncio", "kopf"} & modules


def test_operator_plan_command_does_not_import_torch(tmp_path: Path) -> None:
    loads = tmp_path / "loads.json"
    loads.write_text(json.dumps([[5, 1, 1, 1], [1, 1, 1, 9]]))
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from moe_operator.cli import app\n"
        f"args = ['plan', '--loads', {str(loads)!r}, '--gpus', '2', '--slots', '6', '--json']\n"
        "r = CliRunner().invoke(app, args)\n"
        "assert r.exit_code == 0, r.output\n"
        "assert 'torch' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_worker_config_is_torch_free() -> None:
    assert "torch" not in loaded_modules("moe_worker.config")


def test_config_policy_names_match_registry() -> None:
    from moe_worker.config import PolicyName
    from moe_worker.eplb.policy import POLICIES

    assert set(get_args(PolicyName)) == set(POLICIES)


def test_family_names_in_config_match_the_registry() -> None:
    from moe_worker.config import FamilyName
    from moe_worker.model.families import FAMILIES

    assert set(get_args(FamilyName)) == {name for name, f in FAMILIES.items() if f.synthetic}


def test_serve_cli_stays_torch_free() -> None:
    """`moe-eplb serve` runs the router in the CLI process: no torch there (its ranks have it)."""
    modules = loaded_modules("moe_operator.runtime.serve", "moe_worker.serving.router")
    assert "torch" not in modules

"""Which pip extras each ``moe-eplb`` subcommand needs, and the one-line hint when one is missing.

The base install (numpy, numba, pydantic, typer...) plans placements, validates and renders
MoEDeployments; serving and the local runtime need the ``worker`` extra (torch, transformers,
the HTTP stack...), the in-cluster operator the ``operator`` one (Kopf, the Kubernetes client).
"""

from __future__ import annotations

import importlib.util

# The modules each extra installs that the code imports (keys: pyproject's extras).
EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "worker": (
        "torch",
        "safetensors",
        "prometheus_client",
        "transformers",
        "tokenizers",
        "jinja2",
        "fastapi",
        "uvicorn",
        "httpx",
        "aiohttp",
    ),
    "operator": ("kopf", "kubernetes_asyncio", "aiohttp", "prometheus_client"),
}

# What each command imports beyond the base install, and the extra that installs it.
COMMAND_NEEDS: dict[str, tuple[tuple[str, ...], str]] = {
    "worker": (EXTRA_MODULES["worker"], "worker"),
    "verify": (EXTRA_MODULES["worker"], "worker"),
    "serve": (EXTRA_MODULES["worker"], "worker"),
    "run": (EXTRA_MODULES["worker"], "worker"),  # the ranks, and the operator's actions
    "bench-serve": (("httpx",), "worker"),  # only a client
}


def install_hint(extra: str) -> str:
    return f"pip install 'moe-eplb[{extra}]'"


def missing_modules(modules: tuple[str, ...]) -> list[str]:
    """The ``modules`` that cannot be imported here, in order."""
    return [m for m in modules if importlib.util.find_spec(m) is None]


def missing_extras_message(command: str) -> str | None:
    """One line naming what ``command`` lacks and the pip command that installs it, or None."""
    modules, extra = COMMAND_NEEDS.get(command, ((), ""))
    missing = missing_modules(modules)
    if not missing:
        return None
    return (
        f"moe-eplb {command} needs the {extra} extra (missing: {', '.join(missing)}): "
        f"{install_hint(extra)}"
    )


def extra_for_module(name: str | None) -> str | None:
    """The extra that installs the top-level module of ``name`` (None: not one of ours)."""
    top = (name or "").partition(".")[0]
    return next((extra for extra, modules in EXTRA_MODULES.items() if top in modules), None)

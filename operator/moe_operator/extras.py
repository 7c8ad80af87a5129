"""Which pip extras each ``moe-eplb`` subcommand needs, and the one-line hint when one is missing.

The base install (numpy, numba, pydantic, typer...) plans placements, validates and renders
MoEDeployments; serving needs the ``worker`` extra (torch, transformers...), the local runtime
the ``operator`` one too (its HTTP client), the in-cluster operator ``operator``.
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
    ),
    "operator": ("kopf", "kubernetes_asyncio", "aiohttp", "prometheus_client"),
}

COMMAND_EXTRAS: dict[str, tuple[str, ...]] = {
    "worker": ("worker",),
    "verify": ("worker",),
    "serve": ("worker",),
    "run": ("worker", "operator"),
    "bench-serve": ("worker",),
}


def install_hint(extras: tuple[str, ...]) -> str:
    return f"pip install 'moe-eplb[{','.join(extras)}]'"


def missing_modules(extras: tuple[str, ...]) -> list[str]:
    """The modules of ``extras`` that cannot be imported here, in order, without duplicates."""
    wanted = dict.fromkeys(m for extra in extras for m in EXTRA_MODULES[extra])
    return [m for m in wanted if importlib.util.find_spec(m) is None]


def missing_extras_message(command: str) -> str | None:
    """One line naming what ``command`` lacks and the pip command that installs it, or None."""
    extras = COMMAND_EXTRAS.get(command, ())
    missing = missing_modules(extras)
    if not missing:
        return None
    names = " and ".join(extras)
    return (
        f"moe-eplb {command} needs the {names} extra{'s' if len(extras) > 1 else ''} "
        f"(missing: {', '.join(missing)}): {install_hint(extras)}"
    )


def extra_for_module(name: str | None) -> str | None:
    """The extra that installs the top-level module of ``name`` (None: not one of ours)."""
    top = (name or "").partition(".")[0]
    return next((extra for extra, modules in EXTRA_MODULES.items() if top in modules), None)

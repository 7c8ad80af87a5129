"""Build the placement kernels ahead of time: ``python -m moe_worker.eplb.policy.aot``.

Compiles every registered row kernel (``jit.ROW_KERNELS``) with numba's ``pycc`` into the
extension module ``_aot_kernels`` beside this file (or into ``--output-dir``), with the digest
of the sources it was built from. ``make setup`` runs it once (about 20 s): afterwards the first
placement of a fresh process starts at once instead of waiting for numba's JIT compiler. It
needs a C compiler and Python's headers; without them the kernels stay JIT-only.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from . import balanced, packing, shares  # noqa: F401 - they register the row kernels
from .jit import AOT_MODULE, ROW_KERNELS, source_digest


def _constant(value: int) -> Callable[[], int]:
    def digest() -> int:
        return value

    return digest


def build(output_dir: Path) -> Path:
    """Compile the AOT module into ``output_dir``; returns the extension's path."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pycc's pending-deprecation notice
        from numba.pycc import CC

        name = AOT_MODULE.rpartition(".")[2]
        with tempfile.TemporaryDirectory() as scratch:
            compiler = CC(name)
            compiler.output_dir = scratch
            compiler.verbose = False
            for kernel in ROW_KERNELS.values():
                compiler.export(kernel.name, kernel.signature)(kernel.python)
            compiler.export("source_digest", "i8()")(_constant(source_digest()))
            compiler.compile()
            (built,) = Path(scratch).glob(f"{name}*")
            output_dir.mkdir(parents=True, exist_ok=True)
            target = output_dir / built.name
            partial = target.with_suffix(".partial")
            shutil.copyfile(built, partial)
            partial.replace(target)  # never a half-written module where Python looks
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--output-dir", type=Path, default=Path(__file__).parent, help="default: the package"
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        path = build(args.output_dir)
    except Exception as exc:  # noqa: BLE001 - any compiler failure leaves the JIT in charge
        print(f"error: AOT build of the placement kernels failed: {exc}", file=sys.stderr)
        return 1
    print(f"built {path} ({len(ROW_KERNELS)} kernels) in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

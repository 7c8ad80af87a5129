"""Run a StatefulSet's pods as local processes: what a kubelet would start, on 127.0.0.1.

Reads the StatefulSet's pod template (command, env), its ConfigMap (worker config) and the
control-token Secret from the emulator, and starts one process per pod with that command and
environment; only what cannot exist here is substituted: files under /etc/moe-eplb become local
files, the device is the CPU, MASTER_ADDR is 127.0.0.1. Marks the StatefulSet ready once every
rank answers /readyz, as the StatefulSet controller would after the readiness probes.
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from kube_emulator import ClusterEmulator

BIN = Path(sys.executable).parent


def _env(template_env: list[dict[str, Any]], pod: str, namespace: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RANK", None)
    for item in template_env:
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            path = item["valueFrom"]["fieldRef"]["fieldPath"]
            env[item["name"]] = {"metadata.name": pod, "metadata.namespace": namespace}[path]
    env["MASTER_ADDR"] = "127.0.0.1"
    # A pod's read-only root filesystem needs NUMBA_CACHE_DIR=/tmp/numba; here numba's default
    # cache (beside the sources, warmed by the tests) is the one to share.
    env.pop("NUMBA_CACHE_DIR", None)
    if "NUMBA_CACHE_DIR" in os.environ:
        env["NUMBA_CACHE_DIR"] = os.environ["NUMBA_CACHE_DIR"]
    return env


class LocalPods:
    def __init__(self, cluster: ClusterEmulator, namespace: str, name: str, root: Path) -> None:
        self.cluster, self.namespace, self.name, self.root = cluster, namespace, name, root
        self.processes: list[subprocess.Popen[bytes]] = []
        self.config: dict[str, Any] = {}

    def start(self) -> None:
        sts = self.cluster.get("apps/v1", "statefulsets", self.namespace, self.name)
        config_map = self.cluster.get("v1", "configmaps", self.namespace, f"{self.name}-config")
        secret = self.cluster.get("v1", "secrets", self.namespace, f"{self.name}-control")
        assert sts and config_map and secret, "the operator has not created the children yet"
        container = sts["spec"]["template"]["spec"]["containers"][0]
        token = self.root / "token"
        token.write_text(base64.b64decode(secret["data"]["token"]).decode())
        config = yaml.safe_load(config_map["data"]["worker.yaml"])
        config["device"] = "cpu"
        config["control"]["tokenFile"] = str(token)
        self.config = config
        path = self.root / "worker.yaml"
        path.write_text(yaml.safe_dump(config))
        command = list(container["command"])
        assert command[:2] == ["moe-eplb", "worker"]
        command[0] = str(BIN / "moe-eplb")
        command[command.index("--config") + 1] = str(path)
        for ordinal in range(sts["spec"]["replicas"]):
            pod = f"{self.name}-{ordinal}"
            env = _env(container["env"], pod, self.namespace)
            self.processes.append(
                subprocess.Popen(
                    command,
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=open(self.root / f"{pod}.log", "wb"),  # noqa: SIM115
                    start_new_session=True,
                )
            )

    def ready(self) -> bool:
        ports = range(
            self.config["metrics"]["port"],
            self.config["metrics"]["port"] + int(self.config["epSize"]),
        )
        for port in ports:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                    if r.status != 200:
                        return False
            except OSError:
                return False
        return True

    def scrape(self, rank: int) -> str:
        port = self.config["metrics"]["port"] + rank
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return r.read().decode()

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes:
            process.wait(timeout=60)
        self.processes = []

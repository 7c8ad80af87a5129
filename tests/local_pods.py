"""Run a StatefulSet's pods as local processes: what its controller and a kubelet would do.

Reads the StatefulSet (replicas, pod template: command, env), its ConfigMap (worker config) and
the control-token Secret from the emulator and keeps one process per pod ordinal below the
replicas, with that command and environment: it starts missing pods, stops pods above the
replicas (highest first), restarts a pod whose process ended (restartPolicy Always), and writes
the StatefulSet's status (readyReplicas from every rank's /readyz). Pod ``k`` listens on its own
loopback address 127.0.1.k (MOE_BIND_HOST), as pods have their own IPs; the operator reaches it
through MOE_OPERATOR_POD_HOST=127.0.1.{ordinal}. Only what cannot exist here is substituted:
files under /etc/moe-eplb become local files, the device is the CPU, MASTER_ADDR is 127.0.0.1
and MASTER_PORT a free port.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from distributed import free_port
from kube_emulator import ClusterEmulator
from moe_operator.k8s import KubeClient

BIN = Path(sys.executable).parent


def pod_address(ordinal: int) -> str:
    return f"127.0.1.{ordinal}"


def _env(template_env: list[dict[str, Any]], pod: str, namespace: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RANK", None)
    for item in template_env:
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            path = item["valueFrom"]["fieldRef"]["fieldPath"]
            # No node here: an empty NODE_NAME, as outside Kubernetes (the spec's numNodes holds)
            env[item["name"]] = {
                "metadata.name": pod,
                "metadata.namespace": namespace,
                "spec.nodeName": "",
            }[path]
    env["MASTER_ADDR"] = "127.0.0.1"
    env["OMP_NUM_THREADS"] = "1"  # several "pods" share this machine's cores
    # A pod's read-only root filesystem needs NUMBA_CACHE_DIR=/tmp/numba; here numba's default
    # cache (beside the sources, warmed by the tests) is the one to share.
    env.pop("NUMBA_CACHE_DIR", None)
    if "NUMBA_CACHE_DIR" in os.environ:
        env["NUMBA_CACHE_DIR"] = os.environ["NUMBA_CACHE_DIR"]
    return env


class LocalPods:
    def __init__(
        self,
        cluster: ClusterEmulator,
        namespace: str,
        name: str,
        root: Path,
        check_outputs: bool = False,
    ) -> None:
        self.cluster, self.namespace, self.name, self.root = cluster, namespace, name, root
        self.check_outputs = check_outputs
        self.pods: dict[int, subprocess.Popen[bytes]] = {}
        self.config: dict[str, Any] = {}
        self.gpus_per_pod = 1
        self.restarts = 0
        self.starts = 0
        self._task: asyncio.Task[None] | None = None
        # The template's rendezvous port is fixed (pods have their own IPs); here it is shared.
        self.master_port = free_port()

    # --- the StatefulSet controller and kubelet ------------------------------------------

    def _start_pod(self, ordinal: int) -> None:
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
        config["checkOutputs"] = self.check_outputs
        self.config = config
        path = self.root / "worker.yaml"
        path.write_text(yaml.safe_dump(config))
        command = list(container["command"])
        assert command[:2] == ["moe-eplb", "worker"]
        command[0] = str(BIN / "moe-eplb")
        command[command.index("--config") + 1] = str(path)
        pod = f"{self.name}-{ordinal}"
        env = _env(container["env"], pod, self.namespace)
        env["MOE_BIND_HOST"] = pod_address(ordinal)
        env["MASTER_PORT"] = str(self.master_port)
        self.gpus_per_pod = int(env.get("LOCAL_WORLD_SIZE", "1"))
        self.starts += 1
        self.pods[ordinal] = subprocess.Popen(
            command,
            env=env,
            stdout=open(self.root / f"{pod}.{self.starts}.out", "wb"),  # noqa: SIM115
            stderr=open(self.root / f"{pod}.{self.starts}.log", "wb"),  # noqa: SIM115
            start_new_session=True,
        )

    @staticmethod
    def _terminate(process: subprocess.Popen[bytes]) -> None:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def sync(self) -> None:
        """One pass of the StatefulSet controller and the kubelet."""
        sts = self.cluster.get("apps/v1", "statefulsets", self.namespace, self.name)
        if not sts:
            return
        replicas = int(sts["spec"]["replicas"])
        for ordinal in sorted((o for o in self.pods if o >= replicas), reverse=True):
            self._terminate(self.pods.pop(ordinal))
        for ordinal in range(replicas):
            process = self.pods.get(ordinal)
            if process is None:
                self._start_pod(ordinal)
            elif process.poll() is not None:
                self.restarts += 1
                self._start_pod(ordinal)

    def _readyz(self, ordinal: int) -> list[str] | None:
        """Each rank's /readyz status word in pod ``ordinal`` (None: a rank is unreachable)."""
        if not self.config or ordinal not in self.pods:
            return None
        states = []
        for local in range(self.gpus_per_pod):
            url = f"http://{pod_address(ordinal)}:{self.config['metrics']['port'] + local}/readyz"
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    states.append(str(json.loads(r.read()).get("status")))
            except urllib.error.HTTPError as error:
                states.append(str(json.loads(error.read()).get("status")))
            except (OSError, ValueError):
                return None
        return states

    def pod_ready(self, ordinal: int) -> bool:
        return self._readyz(ordinal) == ["ready"] * self.gpus_per_pod

    def ready_pods(self) -> int:
        return sum(self.pod_ready(o) for o in sorted(self.pods))

    def pod_standby(self, ordinal: int) -> bool:
        """Every rank of the pod waits on standby to join (alive, registered, not ready)."""
        return self._readyz(ordinal) == ["standby"] * self.gpus_per_pod

    def up(self) -> bool:
        """Every pod of the StatefulSet is ready or on standby (what a scale-up waits for)."""
        sts = self.cluster.get("apps/v1", "statefulsets", self.namespace, self.name)
        if not sts:
            return False
        ordinals = range(int(sts["spec"]["replicas"]))
        return all(self.pod_ready(o) or self.pod_standby(o) for o in ordinals)

    async def _write_status(self, kube: KubeClient) -> None:
        sts = self.cluster.get("apps/v1", "statefulsets", self.namespace, self.name)
        if not sts:
            return
        ready = await asyncio.to_thread(self.ready_pods)
        status = {
            "replicas": len(self.pods),
            "readyReplicas": ready,
            "updatedReplicas": len(self.pods),
            "observedGeneration": sts["metadata"]["generation"],
        }
        if {k: (sts.get("status") or {}).get(k) for k in status} != status:
            await kube.patch(
                "apps/v1", "StatefulSet", self.namespace, self.name, {"status": status}, "status"
            )

    async def _follow(self, kube: KubeClient) -> None:
        while True:
            try:
                await asyncio.to_thread(self.sync)
                await asyncio.wait_for(self._write_status(kube), 10)
            except Exception as exc:  # noqa: BLE001 - a controller keeps going; say what failed
                print(f"local pods: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            await asyncio.sleep(0.5)

    def start(self, kube: KubeClient) -> None:
        """Keep the pods following the StatefulSet (status written through ``kube``)."""
        self._task = asyncio.get_running_loop().create_task(self._follow(kube))

    def kill(self, ordinal: int) -> None:
        """SIGKILL pod ``ordinal``'s process (its ranks die; the kubelet restarts it)."""
        os.killpg(self.pods[ordinal].pid, signal.SIGKILL)

    # --- what tests read -----------------------------------------------------------------

    def ready(self) -> bool:
        sts = self.cluster.get("apps/v1", "statefulsets", self.namespace, self.name)
        return bool(sts) and self.ready_pods() >= int(sts["spec"]["replicas"])

    def scrape(self, rank: int) -> str:
        host = pod_address(rank // self.gpus_per_pod)
        port = self.config["metrics"]["port"] + rank % self.gpus_per_pod
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as r:
            return r.read().decode()

    def try_scrape(self, rank: int) -> str:
        """``scrape``, or "" while the rank's metrics server is not listening (a pod that is
        restarting): for conditions polled with a deadline."""
        try:
            return self.scrape(rank)
        except OSError:  # URLError, connection refused or reset
            return ""

    def summaries(self) -> list[dict[str, Any]]:
        """The JSON line every rank process printed when it exited."""
        import json

        out = []
        for path in sorted(self.root.glob(f"{self.name}-*.out")):
            for line in path.read_text(errors="replace").splitlines():
                if line.startswith("{"):
                    out.append(json.loads(line))
        return out

    async def stop(self) -> None:
        if self._task is not None:
            # Cancel until it ends: Python 3.11's wait_for can swallow a cancellation that
            # lands as its inner call completes, and the loop would go on forever.
            while not self._task.done():
                self._task.cancel()
                await asyncio.wait([self._task], timeout=1.0)
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for ordinal in sorted(self.pods):
            await asyncio.to_thread(self._terminate, self.pods[ordinal])
        self.pods = {}

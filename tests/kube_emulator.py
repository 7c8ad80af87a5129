"""A Kubernetes API for tests: KMock's emulator plus the server behaviour Kopf relies on.

KMock's ``KubernetesEmulator`` stores objects and streams watch events over real HTTP. This
subclass adds what a real API server does and the operator depends on:

- ``metadata.uid``, ``resourceVersion``, ``generation`` and ``creationTimestamp`` stamping;
  ``generation`` moves only when ``spec`` changes;
- the status split for resources with a ``status`` subresource: writes to the main resource
  ignore ``status``, writes to ``/status`` change only ``status``;
- the ``scale`` subresource as ``autoscaling/v1`` Scale: for MoEDeployment through the paths
  the generated CRD declares (``specReplicasPath`` etc.), as an HPA and ``kubectl scale`` see it;
- with ``admission_url`` set, a validating admission webhook on creates and updates of the
  MoEDeployment itself (not its subresources, as the chart registers it): the operator's;
- the namespace taken from the URL on create, and ``generateName``;
- resource discovery (``/apis/<group>/<version>``) for the resources the operator uses;
- garbage collection of objects whose controller owner was deleted (cascading).

It stays a test double: no schema validation, no field managers.
"""

from __future__ import annotations

import copy
import datetime
import itertools
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import aiohttp.web
import attrs
import kmock
import yaml
from kmock._internal import dicts, enums, rendering

from moe_operator.api import GROUP, KIND, PLURAL, VERSION

CORE = [
    ("v1", "configmaps", "ConfigMap", set()),
    ("v1", "secrets", "Secret", set()),
    ("v1", "services", "Service", {"status"}),
    ("v1", "pods", "Pod", {"status"}),
    ("v1", "events", "Event", set()),
    ("apps/v1", "statefulsets", "StatefulSet", {"status", "scale"}),
    ("policy/v1", "poddisruptionbudgets", "PodDisruptionBudget", {"status"}),
    ("networking.k8s.io/v1", "networkpolicies", "NetworkPolicy", set()),
    ("events.k8s.io/v1", "events", "Event", set()),
    ("coordination.k8s.io/v1", "leases", "Lease", set()),
    (f"{GROUP}/{VERSION}", PLURAL, KIND, {"status", "scale"}),
]
CLUSTER_SCOPED = [
    ("v1", "namespaces", "Namespace", {"status"}),
    (
        "apiextensions.k8s.io/v1",
        "customresourcedefinitions",
        "CustomResourceDefinition",
        {"status"},
    ),
]
MONITORING = [
    ("monitoring.coreos.com/v1", "podmonitors", "PodMonitor", set()),
    ("monitoring.coreos.com/v1", "servicemonitors", "ServiceMonitor", set()),
]
VERBS = {"get", "list", "watch", "create", "patch", "update", "delete"}
CRD_FILE = Path(__file__).resolve().parents[1] / "crds" / f"{PLURAL}.{GROUP}.yaml"
STATEFULSET_SCALE = {
    "specReplicasPath": ".spec.replicas",
    "statusReplicasPath": ".status.replicas",
    "labelSelectorPath": ".status.selector",
}


def crd_scale_paths() -> dict[str, str]:
    """The scale subresource's JSON paths as the generated CRD declares them."""
    crd = yaml.safe_load(CRD_FILE.read_text())
    return dict(crd["spec"]["versions"][0]["subresources"]["scale"])


def _at(document: dict[str, Any], path: str) -> Any:
    node: Any = document
    for part in path.lstrip(".").split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _nested(path: str, value: Any) -> dict[str, Any]:
    out: Any = value
    for part in reversed(path.lstrip(".").split(".")):
        out = {part: out}
    return dict(out)


_versions = itertools.count(1)


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _resource(api_version: str, plural: str) -> kmock.resource:
    group, _, version = api_version.rpartition("/")
    return kmock.resource(group, version, plural)


@attrs.define(kw_only=True)
class ClusterEmulator(kmock.KubernetesEmulator):
    """KMock's emulator with uid/resourceVersion/generation, status split and owner GC."""

    with_monitoring: bool = False
    # (HTTP method, plural, namespace, name, subresource) of every resource request served.
    calls: list[tuple[str, str, str | None, str | None, str | None]] = attrs.field(
        factory=list, init=False
    )
    # (RBAC verb, apiGroup, resource[/subresource], User-Agent) of every resource request.
    verbs: list[tuple[str, str, str, str]] = attrs.field(factory=list, init=False)

    # Requests answered since the last trim. KMock matches a request to its reactions by
    # scanning every request it has recorded (quadratic over a run); answered ones are dropped.
    _answered: set[Any] = attrs.field(factory=set, init=False)
    # The validating webhook's URL (an AdmissionReview POST); None: no admission.
    admission_url: str | None = None
    # Admission reviews sent: (operation, allowed).
    admissions: list[tuple[str, bool]] = attrs.field(factory=list, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for api_version, plural, kind, subresources in (
            CORE + CLUSTER_SCOPED + (MONITORING if self.with_monitoring else [])
        ):
            self.resources[_resource(api_version, plural)] = kmock.ResourceInfo(
                kind=kind,
                namespaced=(api_version, plural, kind, subresources) not in CLUSTER_SCOPED,
                singular=kind.lower(),
                verbs=VERBS,
                subresources=subresources,
            )

    # -- helpers for tests -------------------------------------------------------------------

    def get(self, api_version: str, plural: str, namespace: str, name: str) -> dict | None:
        """The stored object, or None when absent or deleted."""
        key = (_resource(api_version, plural), namespace, name)
        if key not in self.objects or self.objects[key].deleted:
            return None
        return copy.deepcopy(self.objects[key].raw)

    def writes(self, plural: str) -> list[tuple[str, str | None, str | None]]:
        """(method, name, subresource) of each POST/PATCH/DELETE on ``plural`` so far."""
        return [
            (method, name, sub)
            for method, kind, _, name, sub in self.calls
            if kind == plural and method in ("POST", "PATCH", "DELETE")
        ]

    def names(self, api_version: str, plural: str, namespace: str) -> set[str]:
        wanted = _resource(api_version, plural)
        return {
            name
            for (resource, ns, name), obj in self.objects.items()
            if resource == wanted and ns == namespace and not obj.deleted
        }

    # -- the server behaviour ----------------------------------------------------------------

    def _has_status_split(self, resource: kmock.resource) -> bool:
        info = self.resources.get(resource) if resource in self.resources else None
        return info is not None and "status" in info.subresources

    def _current(self, request: rendering.Request) -> dict[str, Any] | None:
        key = (request.resource, request.namespace, request.name)
        if key not in self.objects or self.objects[key].deleted:
            return None
        return self.objects[key].raw

    def _scale_paths(self, resource: kmock.resource) -> dict[str, str]:
        return crd_scale_paths() if resource.plural == PLURAL else STATEFULSET_SCALE

    def _scale(self, request: rendering.Request) -> dict[str, Any] | None:
        """The object's ``autoscaling/v1`` Scale, read through the scale paths."""
        current = self._current(request)
        if current is None:
            return None
        paths = self._scale_paths(request.resource)
        return {
            "apiVersion": "autoscaling/v1",
            "kind": "Scale",
            "metadata": {
                k: current["metadata"][k] for k in ("name", "namespace", "uid", "resourceVersion")
            },
            "spec": {"replicas": _at(current, paths["specReplicasPath"])},
            "status": {
                "replicas": _at(current, paths["statusReplicasPath"]) or 0,
                "selector": _at(current, paths.get("labelSelectorPath", ".status.x")) or "",
            },
        }

    async def _admitted(self, request: rendering.Request) -> aiohttp.web.Response | None:
        """Send the webhook the object as it would be stored; its denial as the API server
        answers it (None: allowed, or no webhook for this request)."""
        if (
            self.admission_url is None
            or request.resource is None
            or request.resource.plural != PLURAL
            or request.subresource
            or request.action not in (enums.action.CREATE, enums.action.UPDATE)
        ):
            return None
        current = self._current(request)
        operation = "CREATE" if request.action == enums.action.CREATE else "UPDATE"
        new = copy.deepcopy(request.data)
        if operation == "UPDATE":
            new = dicts.patch_dict(copy.deepcopy(current or {}), new)
        review = {
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": str(uuid.uuid4()),
                "kind": {"group": GROUP, "version": VERSION, "kind": KIND},
                "resource": {"group": GROUP, "version": VERSION, "resource": PLURAL},
                "name": (new.get("metadata") or {}).get("name") or request.name,
                "namespace": request.namespace,
                "operation": operation,
                "object": new,
                "oldObject": current if operation == "UPDATE" else None,
                "userInfo": {"username": "tester"},
                "dryRun": False,
            },
        }
        async with (
            aiohttp.ClientSession() as http,
            http.post(self.admission_url, json=review) as reply,
        ):
            answer = (await reply.json())["response"]
        self.admissions.append((operation, bool(answer["allowed"])))
        if answer["allowed"]:
            return None
        status = answer.get("status") or {}
        code = int(status.get("code") or 400)
        message = f"admission webhook denied the request: {status.get('message', '')}"
        return aiohttp.web.json_response(
            {
                "kind": "Status",
                "apiVersion": "v1",
                "status": "Failure",
                "message": message,
                "reason": "Invalid",
                "code": code,
            },
            status=code,
        )

    def _stamped(self, request: rendering.Request) -> Any:
        data: dict[str, Any] = copy.deepcopy(request.data)
        if request.action == enums.action.CREATE:
            meta = data.setdefault("metadata", {})
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
            if request.namespace and not meta.get("namespace"):
                meta["namespace"] = request.namespace
            meta["uid"] = str(uuid.uuid4())
            meta["resourceVersion"] = str(next(_versions))
            meta["generation"] = 1
            meta["creationTimestamp"] = _now()
            if self._has_status_split(request.resource):
                data.pop("status", None)
            return data
        current = self._current(request)
        if current is None:
            return data
        sub = request.subresource
        if sub == "status":
            data = {"status": data.get("status")}
        elif sub == "scale":
            replicas = (data.get("spec") or {}).get("replicas")
            data = _nested(self._scale_paths(request.resource)["specReplicasPath"], replicas)
        elif self._has_status_split(request.resource):
            data.pop("status", None)
        patched = dicts.patch_dict(copy.deepcopy(current), data)
        meta = data.setdefault("metadata", {})
        meta["resourceVersion"] = str(next(_versions))
        if patched.get("spec") != current.get("spec"):
            meta["generation"] = int(current.get("metadata", {}).get("generation", 1)) + 1
        return data

    async def _handle(self, request: rendering.Request) -> Any:
        # Trim KMock's request log (matching is linear in it) of requests already answered
        # only: a request KMock has logged but not yet handed to this method must stay.
        if self._answered:
            self._requests[:] = [r for r in self._requests if r not in self._answered]
            self._answered.clear()
        try:
            return await self._serve(request)
        finally:
            self._answered.add(request)

    async def _serve(self, request: rendering.Request) -> Any:
        if request.resource is None:
            return await super()._handle(request)
        self.calls.append(
            (
                str(request.method.value if request.method else ""),
                str(request.resource.plural),
                request.namespace,
                request.name,
                request.subresource,
            )
        )
        method = str(request.method.value if request.method else "")
        verb = {
            "GET": "get"
            if request.name
            else ("watch" if request.params.get("watch") in ("true", "1") else "list"),
            "POST": "create",
            "PATCH": "patch",
            "PUT": "update",
            "DELETE": "delete",
        }.get(method, method.lower())
        resource = str(request.resource.plural) + (
            f"/{request.subresource}" if request.subresource else ""
        )
        self.verbs.append(
            (
                verb,
                str(request.resource.group or ""),
                resource,
                request.headers.get("User-Agent", ""),
            )
        )
        if method == "GET" and request.subresource == "scale" and request.name:
            scale = self._scale(request)
            if scale is None:
                return aiohttp.web.json_response({"kind": "Status", "code": 404}, status=404)
            return aiohttp.web.json_response(scale)
        denied = await self._admitted(request)
        if denied is not None:
            return denied
        owner_uid: str | None = None
        if request.action in (enums.action.CREATE, enums.action.UPDATE) and isinstance(
            request.data, dict
        ):
            # Requests are frozen and matched by identity: rewrite the body in place.
            stamped = self._stamped(request)
            request.data.clear()
            request.data.update(stamped)
        elif request.action == enums.action.DELETE and request.name is not None:
            current = self._current(request)
            owner_uid = (current or {}).get("metadata", {}).get("uid")
        response = await super()._handle(request)
        if owner_uid is not None:
            await self._collect_garbage({owner_uid})
        return response

    async def _collect_garbage(self, deleted_uids: set[str]) -> None:
        """Delete every object whose owner is gone, transitively (foreground-free cascade)."""
        while deleted_uids:
            doomed = []
            for key, obj in list(self.objects.items()):
                if obj.deleted:
                    continue
                owners = obj.raw.get("metadata", {}).get("ownerReferences") or []
                if any(ref.get("uid") in deleted_uids for ref in owners):
                    doomed.append(key)
            deleted_uids = set()
            for key in doomed:
                async with self._lock:
                    obj = self.objects[key]
                    raw = obj.raw
                    obj.delete()
                    await self._buses[key[0]].put({"type": "DELETED", "object": raw})
                deleted_uids.add(raw["metadata"]["uid"])


def write_kubeconfig(path: Path, server: str, namespace: str = "default") -> Path:
    """A kubeconfig pointing at the emulator (what Kopf and the operator's client read)."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "kmock", "cluster": {"server": server}}],
        "users": [{"name": "tester", "user": {"token": "test-token"}}],
        "contexts": [
            {
                "name": "kmock",
                "context": {"cluster": "kmock", "user": "tester", "namespace": namespace},
            }
        ],
        "current-context": "kmock",
    }
    path.write_text(yaml.safe_dump(config))
    return path


@asynccontextmanager
async def running_cluster(tmp_path: Path, with_monitoring: bool = False) -> Any:
    """Start the emulator on 127.0.0.1; yield (emulator, kubeconfig path)."""
    async with (
        ClusterEmulator(with_monitoring=with_monitoring) as cluster,
        kmock.Server(cluster) as server,
    ):
        yield cluster, write_kubeconfig(tmp_path / "kubeconfig", str(server.url).rstrip("/"))

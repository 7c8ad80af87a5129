"""The only module that talks to the Kubernetes API (kubernetes_asyncio underneath).

Objects travel as plain dicts (the manifests ``builders`` produces); paths come from each
object's ``apiVersion`` and ``kind``. Every call the operator makes is listed in ``API_CALLS``,
which the Helm chart's RBAC rules are checked against.
"""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass
from typing import Any

from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config.config_exception import ConfigException

from .api.models import GROUP, KIND, PLURAL, VERSION
from .errors import KubeError

PLURALS: dict[str, str] = {
    "ConfigMap": "configmaps",
    "Secret": "secrets",
    "Service": "services",
    "StatefulSet": "statefulsets",
    "PodDisruptionBudget": "poddisruptionbudgets",
    "NetworkPolicy": "networkpolicies",
    "PodMonitor": "podmonitors",
    KIND: PLURAL,
}

# (apiGroup, resource, verbs): every API call this module makes on the operator's behalf.
API_CALLS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("", "configmaps", ("get", "create", "patch")),
    ("", "secrets", ("get", "create", "patch")),
    ("", "services", ("get", "create", "patch")),
    ("apps", "statefulsets", ("get", "create", "patch")),
    ("policy", "poddisruptionbudgets", ("get", "create", "patch")),
    ("networking.k8s.io", "networkpolicies", ("get", "create", "patch")),
    ("monitoring.coreos.com", "podmonitors", ("get", "create", "patch")),
    (GROUP, f"{PLURAL}/status", ("patch",)),
    (GROUP, f"{PLURAL}/scale", ("patch",)),
)
# Not a call, a permission the API server checks: with OwnerReferencesPermissionEnforcement
# (OpenShift's default) creating a child whose ownerReference sets blockOwnerDeletion needs
# update on the owner's finalizers subresource.
OWNER_REFERENCE_GRANTS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    (GROUP, f"{PLURAL}/finalizers", ("update",)),
)


def api_message(reason: str | None, body: Any) -> str:
    """What went wrong, as the API server says it: its Status ``message`` (a webhook's denial,
    a failed rule), else the HTTP reason."""
    try:
        message = json.loads(body).get("message") if body else None
    except (TypeError, ValueError, AttributeError):
        message = None
    return f"{reason}: {message}" if message else str(reason or body)


def resource_path(
    api_version: str, kind: str, namespace: str | None, name: str | None = None
) -> str:
    """The REST path of a kind's collection in a namespace, or of one named object."""
    try:
        plural = PLURALS[kind]
    except KeyError:
        raise KubeError(0, f"unknown kind {kind!r}; known: {', '.join(sorted(PLURALS))}") from None
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    path = f"{base}/namespaces/{namespace}/{plural}" if namespace else f"{base}/{plural}"
    return f"{path}/{name}" if name else path


async def load_configuration() -> client.Configuration:
    """In-cluster service account when running in a pod, else ``$KUBECONFIG`` (read now, not
    at import) or ``~/.kube/config``."""
    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except ConfigException:
        await config.load_kube_config(
            config_file=os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config"),
            client_configuration=configuration,
        )
    return configuration


async def bearer_token(configuration: client.Configuration) -> str | None:
    """The token the configuration authenticates with (refreshed where it can be)."""
    header: Any = configuration.get_api_key_with_prefix("BearerToken")
    if inspect.isawaitable(header):
        header = await header
    if not header:
        return None
    return str(header).split(" ", 1)[-1]


@dataclass
class KubeClient:
    """An async client bound to one event loop; ``close()`` when done."""

    api: client.ApiClient

    @classmethod
    async def connect(cls, user_agent: str = "moe-operator") -> KubeClient:
        api = client.ApiClient(await load_configuration())
        api.user_agent = user_agent
        return cls(api)

    async def close(self) -> None:
        await self.api.close()

    async def _call(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: list[tuple[str, str]] | None = None,
        content_type: str = "application/json",
    ) -> Any:
        try:
            return await self.api.call_api(
                path,
                method,
                query_params=query or [],
                header_params={"Content-Type": content_type, "Accept": "application/json"},
                body=body,
                response_types_map={200: "object", 201: "object"},
                auth_settings=["BearerToken"],
                _return_http_data_only=True,
            )
        except ApiException as exc:
            raise KubeError(exc.status or 0, api_message(exc.reason, exc.body)) from exc

    async def get(
        self, api_version: str, kind: str, namespace: str | None, name: str
    ) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        try:
            return dict(await self._call("GET", resource_path(api_version, kind, namespace, name)))
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    async def list(
        self, api_version: str, kind: str, namespace: str, label_selector: str
    ) -> list[dict[str, Any]]:
        path = resource_path(api_version, kind, namespace)
        result = await self._call("GET", path, query=[("labelSelector", label_selector)])
        return list(result.get("items") or [])

    async def create(self, manifest: dict[str, Any]) -> dict[str, Any]:
        meta = manifest["metadata"]
        path = resource_path(manifest["apiVersion"], manifest["kind"], meta.get("namespace"))
        return dict(await self._call("POST", path, body=manifest))

    async def patch(
        self,
        api_version: str,
        kind: str,
        namespace: str | None,
        name: str,
        patch: dict[str, Any],
        subresource: str | None = None,
    ) -> dict[str, Any]:
        """A JSON merge patch (RFC 7386) of one object, or of its subresource."""
        path = resource_path(api_version, kind, namespace, name)
        if subresource:
            path += f"/{subresource}"
        return dict(
            await self._call("PATCH", path, body=patch, content_type="application/merge-patch+json")
        )

    async def patch_status(
        self, namespace: str, name: str, status: dict[str, Any]
    ) -> dict[str, Any]:
        """Merge ``status`` into a MoEDeployment's status subresource."""
        return await self.patch(
            f"{GROUP}/{VERSION}", KIND, namespace, name, {"status": status}, "status"
        )

    async def has_api(self, api_version: str, plural: str) -> bool:
        """Whether the API server serves ``plural`` in ``api_version`` (CRD discovery)."""
        try:
            result = await self._call("GET", f"/apis/{api_version}")
        except KubeError as exc:
            if exc.status == 404:
                return False
            raise
        return any(r.get("name") == plural for r in result.get("resources") or [])

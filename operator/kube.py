"""The one module that writes to the Kubernetes API.

Every change the operator makes goes through :class:`Writer`: server-side apply of
child objects under the fixed field manager ``modelyard-operator``, merge patches
of the ModelDeployment *status* subresource (never its spec), deletes that treat
NotFound as done, and core/v1 Events. The client is the official ``kubernetes`` package;
its calls block, so :mod:`.reconcile` runs them in worker threads, many at once.

Hence no shared mutable state here but the client's connection pool (urllib3's is
thread-safe): the kinds the operator owns are a fixed table of typed-client calls, so
nothing is discovered at run time. (``kubernetes.dynamic``'s discovery cache is not
thread-safe: concurrent passes failed with ``KeyError: 'resources'`` in it, issue #16.)
Applied objects come back as the API server's JSON, not as client models.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import os
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from . import api, render
from .leader import LeaseRecord

log = logging.getLogger(__name__)

FIELD_MANAGER = "modelyard-operator"
COMPONENT = "modelyard-operator"
APPLY_PATCH = "application/apply-patch+yaml"  # server-side apply (JSON is valid YAML)


class GoneError(RuntimeError):
    """The ModelDeployment or its namespace is being deleted: nothing left to do."""


def load_api_client() -> client.ApiClient:
    """In-cluster credentials inside a pod, else the kubeconfig (``$KUBECONFIG``)."""
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config()
        return client.ApiClient()
    api_client: client.ApiClient = config.new_client_from_config(
        config_file=os.environ.get("KUBECONFIG"))
    return api_client


@dataclass(frozen=True)
class _Kind:
    """The typed-client calls for one kind the operator owns, each taking ``name``,
    ``namespace`` and the call's options as keywords."""

    patch: Callable[..., Any]
    delete: Callable[..., Any]


class Writer:
    def __init__(self, api_client: client.ApiClient):
        self._api = api_client
        self._custom = client.CustomObjectsApi(api_client)
        self._core = client.CoreV1Api(api_client)
        self._apps = client.AppsV1Api(api_client)
        self._coordination = client.CoordinationV1Api(api_client)
        self._discovery = client.DiscoveryV1Api(api_client)
        self._networking = client.NetworkingV1Api(api_client)
        self._batch = client.BatchV1Api(api_client)
        self._route_group, self._route_version = render.HTTPROUTE_API_VERSION.split("/")
        # Every kind render.py produces; a new one must be added here (apply says so).
        self._kinds: dict[tuple[str, str], _Kind] = {
            ("apps/v1", "Deployment"): _Kind(self._apps.patch_namespaced_deployment,
                                             self._apps.delete_namespaced_deployment),
            ("v1", "Service"): _Kind(self._core.patch_namespaced_service,
                                     self._core.delete_namespaced_service),
            ("discovery.k8s.io/v1", "EndpointSlice"): _Kind(
                self._discovery.patch_namespaced_endpoint_slice,
                self._discovery.delete_namespaced_endpoint_slice),
            ("batch/v1", "Job"): _Kind(self._batch.patch_namespaced_job,  # conversion
                                       self._batch.delete_namespaced_job),
            (render.NETWORK_POLICY_API_VERSION, "NetworkPolicy"): _Kind(
                self._networking.patch_namespaced_network_policy,
                self._networking.delete_namespaced_network_policy),
            (render.HTTPROUTE_API_VERSION, "HTTPRoute"): _Kind(
                functools.partial(self._custom.patch_namespaced_custom_object,
                                  group=self._route_group, version=self._route_version,
                                  plural="httproutes"),
                functools.partial(self._custom.delete_namespaced_custom_object,
                                  group=self._route_group, version=self._route_version,
                                  plural="httproutes")),
        }

    def _kind(self, api_version: str, kind: str) -> _Kind:
        try:
            return self._kinds[(api_version, kind)]
        except KeyError:
            raise ValueError(f"the operator does not write {kind} ({api_version})") from None

    def apply(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Server-side apply ``obj`` (taking over conflicting fields); the object as stored."""
        meta = obj["metadata"]
        calls = self._kind(obj["apiVersion"], obj["kind"])
        try:
            response = calls.patch(
                name=meta["name"], namespace=meta["namespace"], body=dict(obj),
                field_manager=FIELD_MANAGER, force=True, _content_type=APPLY_PATCH,
                _preload_content=False)
        except ApiException as exc:
            if exc.status == 403 and "NamespaceTerminating" in str(exc.body):
                raise GoneError(f"namespace {meta['namespace']} is being deleted") from exc
            raise
        return cast(dict[str, Any], json.loads(response.data))

    def claim_node_cache(self, volume: Mapping[str, Any], claim: Mapping[str, Any]) -> None:
        """Server-side apply the node cache's PersistentVolume and its claim (see
        :meth:`.render.NodeCache.claim`). A volume left Released by a claim that is gone (its
        namespace was deleted and made again) forgets that claim's uid, so the new claim
        with the same name binds it."""
        name = volume["metadata"]["name"]
        response: Any = self._core.patch_persistent_volume(  # raw: urllib3's response
            name=name, body=dict(volume), field_manager=FIELD_MANAGER, force=True,
            _content_type=APPLY_PATCH, _preload_content=False)
        stored = json.loads(response.data)
        if (stored.get("status") or {}).get("phase") == "Released":
            self._core.patch_persistent_volume(
                name=name, body={"spec": {"claimRef": {"uid": None, "resourceVersion": None}}},
                _content_type="application/merge-patch+json", _preload_content=False)
        meta = claim["metadata"]
        self._core.patch_namespaced_persistent_volume_claim(
            name=meta["name"], namespace=meta["namespace"], body=dict(claim),
            field_manager=FIELD_MANAGER, force=True, _content_type=APPLY_PATCH,
            _preload_content=False)

    def has_httproute(self) -> bool:
        """Does the cluster serve the Gateway API's HTTPRoute (its CRDs are installed)?
        One discovery request for that group version, asked afresh each time."""
        try:
            found = self._custom.get_api_resources(self._route_group, self._route_version)
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return any(r.kind == "HTTPRoute" for r in found.resources or [])

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        """Delete in the background (dependents by the garbage collector); gone is done."""
        calls = self._kind(api_version, kind)
        try:
            response = calls.delete(name=name, namespace=namespace,
                                    propagation_policy="Background", _preload_content=False)
        except ApiException as exc:
            if exc.status != 404:
                raise
            return
        response.drain_conn()  # the body (a Status, or the object) is of no use
        response.release_conn()

    def endpoint_slices(self, namespace: str, service: str) -> list[dict[str, Any]]:
        """The EndpointSlices of a Service, as the API server serves them (camelCase)."""
        found = self._discovery.list_namespaced_endpoint_slice(
            namespace, label_selector=f"kubernetes.io/service-name={service}")
        return list(self._api.sanitize_for_serialization(found).get("items") or [])

    def scale(self, namespace: str, deployment: str, replicas: int) -> None:
        """Set a Deployment's replicas through its scale subresource (nothing else changes)."""
        try:
            self._apps.patch_namespaced_deployment_scale(
                deployment, namespace, {"spec": {"replicas": replicas}},
                field_manager=FIELD_MANAGER)
        except ApiException as exc:
            if exc.status == 404:
                raise GoneError(f"deployment {namespace}/{deployment} is gone") from exc
            raise

    def patch_status(
        self, namespace: str, name: str, status: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Replace the status whole (only the operator writes it; passes are serialised).

        A JSON Patch ``add /status`` replaces every field; a merge patch would keep any
        field the new status leaves out (a finished canary would never disappear)."""
        body: list[dict[str, Any]] = [{"op": "add", "path": "/status", "value": dict(status)}]
        try:
            result = self._custom.patch_namespaced_custom_object_status(
                api.GROUP, api.VERSION, namespace, api.PLURAL, name, body,
                field_manager=FIELD_MANAGER, _content_type="application/json-patch+json",
            )
        except ApiException as exc:
            if exc.status == 404:
                raise GoneError(f"{namespace}/{name} was deleted") from exc
            raise
        return cast(dict[str, Any], result)

    def event(self, owner: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        meta = owner["metadata"]
        now = dt.datetime.now(dt.UTC)
        body = client.CoreV1Event(
            metadata=client.V1ObjectMeta(
                name=f"{meta['name']}.{uuid.uuid4().hex[:12]}", namespace=meta["namespace"]),
            involved_object=client.V1ObjectReference(
                api_version=api.API_VERSION, kind=api.KIND, name=meta["name"],
                namespace=meta["namespace"], uid=meta.get("uid"),
                resource_version=meta.get("resourceVersion")),
            reason=reason, message=message[:1024], type=type_,
            first_timestamp=now, last_timestamp=now, count=1,
            source=client.V1EventSource(component=COMPONENT),
            reporting_component=COMPONENT, reporting_instance=os.environ.get("HOSTNAME", "local"),
        )
        try:
            self._core.create_namespaced_event(meta["namespace"], body)
        except ApiException as exc:  # an Event is best effort: never fail a pass on it
            log.warning("could not post event %s for %s: %s", reason, meta["name"], exc.reason)

    # -- leader election (see leader.py) ----------------------------------------------

    def read_lease(self, namespace: str, name: str) -> LeaseRecord | None:
        try:
            lease = self._coordination.read_namespaced_lease(name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        spec, meta = lease.spec, lease.metadata
        assert spec is not None
        assert meta is not None
        return LeaseRecord(
            holder=spec.holder_identity or None, duration_s=int(spec.lease_duration_seconds or 1),
            acquired=spec.acquire_time, renewed=spec.renew_time,
            transitions=int(spec.lease_transitions or 0),
            resource_version=meta.resource_version)

    def write_lease(self, namespace: str, name: str, record: LeaseRecord) -> bool:
        """Create the Lease, or replace it at ``record.resource_version``; False on a race."""
        body = client.V1Lease(
            metadata=client.V1ObjectMeta(name=name, namespace=namespace,
                                         resource_version=record.resource_version),
            spec=client.V1LeaseSpec(
                holder_identity=record.holder or "", lease_duration_seconds=record.duration_s,
                acquire_time=_micro(record.acquired), renew_time=_micro(record.renewed),
                lease_transitions=record.transitions))
        try:
            if record.resource_version is None:
                self._coordination.create_namespaced_lease(namespace, body,
                                                           field_manager=FIELD_MANAGER)
            else:
                self._coordination.replace_namespaced_lease(name, namespace, body,
                                                            field_manager=FIELD_MANAGER)
        except ApiException as exc:
            if exc.status in (409, 404):  # someone else wrote (or deleted) it first
                return False
            raise
        return True


def _micro(stamp: dt.datetime | None) -> str | None:
    """A MicroTime, as the Lease API wants it (the client would send seconds only)."""
    if stamp is None:
        return None
    return stamp.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

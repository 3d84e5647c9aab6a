"""Observe: one immutable picture of a ModelDeployment's world, for one reconcile pass.

The first of the controller's four stages (observe → plan → execute → report, see
:mod:`.reconcile`). :func:`build` turns what kopf's indexes hold (the resource and its
Deployments, Pods, Services, EndpointSlices), plus the two cluster-wide facts a pass needs
(is the Gateway API served; where is the activator), into a frozen :class:`World`. The
plan (:mod:`.plan`) reads nothing else.

Also the one home of the small readings every stage shares: a pod's readiness, a
version's Deployment and pods boiled down to a :class:`VersionState`, and the status
timestamp format.

Imports no Kubernetes client.
"""

from __future__ import annotations

import datetime as dt
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import pydantic

from . import api, api_status
from .render import GPU_RESOURCE, VERSION_LABEL, NodeCache, Owner

Key = tuple[str, str]  # (namespace, name)
LiveKey = tuple[str, str]  # (kind, name)

STAMP_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
_POD_FAILURE_REASONS = frozenset({
    "CrashLoopBackOff", "ImagePullBackOff", "ErrImagePull", "InvalidImageName",
    "CreateContainerConfigError", "CreateContainerError", "RunContainerError",
})


def stamp(now: dt.datetime) -> str:
    """A status timestamp (RFC 3339, seconds, UTC)."""
    return now.astimezone(dt.UTC).strftime(STAMP_FORMAT)


def parse_stamp(value: str) -> dt.datetime:
    return dt.datetime.strptime(value, STAMP_FORMAT).replace(tzinfo=dt.UTC)


def pod_ready(pod: Mapping[str, Any]) -> bool:
    """The pod's Ready condition is True (its readiness probe passes)."""
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in pod.get("status", {}).get("conditions", []) or [])


# ------------------------------------------------------------ what the indexes keep
# The indexes keep, per object, only what a pass (this module, plan, scaling) reads of it:
# at 1000 models a whole pod (managedFields, env, volumes, a kubelet's status) is ~3 kB
# of JSON and the projection below ~0.8 kB. A field a pass starts reading is added here,
# and tests/unit/test_index_projections.py fails until it is.
_META = ("name", "namespace", "uid", "generation", "resourceVersion", "labels",
         "deletionTimestamp")
_OURS = "modelyard.dev/"  # the only annotations a pass reads of a ModelDeployment


def _shared(value: Any) -> Any:
    """A deep copy of a JSON value whose strings are interned. The indexes hold thousands of
    children alike but for a few values; each was decoded from its own watch event, so every
    key ("containers", "name", ...) and every common value (image, env, labels) would
    otherwise exist once per object."""
    if isinstance(value, str):
        return sys.intern(value) if len(value) <= 256 else value
    if isinstance(value, Mapping):
        return {sys.intern(k) if isinstance(k, str) else k: _shared(v)
                for k, v in value.items()}
    if isinstance(value, list):
        return [_shared(v) for v in value]
    return value  # numbers, booleans, None


def _meta(meta: Mapping[str, Any], *, annotations: bool) -> dict[str, Any]:
    out = {k: _shared(meta[k]) for k in _META if k in meta}
    if annotations and "annotations" in meta:
        out["annotations"] = _shared(meta["annotations"])
    return out


def project_model(body: Mapping[str, Any]) -> dict[str, Any]:
    """A ModelDeployment as a pass reads it: spec and status whole; of its annotations only
    modelyard's own (``kubectl apply``'s last-applied copy of the spec is dropped)."""
    meta = body.get("metadata", {})
    ours = {k: _shared(v) for k, v in (meta.get("annotations") or {}).items()
            if k.startswith(_OURS)}
    return {"metadata": _meta(meta, annotations=False) | {"annotations": ours},
            "spec": _shared(body.get("spec") or {}),
            "status": _shared(body.get("status") or {})}


def project_child(body: Mapping[str, Any], *, fields: Iterable[str] = ("spec",)
                  ) -> dict[str, Any]:
    """A Deployment, Service or EndpointSlice: what :mod:`.diff` compares (its metadata with
    the hash annotation, and ``fields``) and its status."""
    out = {"metadata": _meta(body.get("metadata", {}), annotations=True),
           "status": _shared(body.get("status") or {})}
    return out | {k: _shared(body[k]) for k in fields if k in body}


def project_pod(pod: Mapping[str, Any]) -> dict[str, Any]:
    """A pod as a pass reads it: its node and GPU limits, phase, address, conditions, and
    each container's readiness, restarts and state."""
    spec, status = pod.get("spec") or {}, pod.get("status") or {}
    out_spec: dict[str, Any] = {"containers": [
        {"name": _shared(c.get("name")), "resources": _shared(c.get("resources") or {})}
        for c in spec.get("containers") or []]}
    if spec.get("nodeName"):
        out_spec["nodeName"] = _shared(spec["nodeName"])
    out_status: dict[str, Any] = {k: _shared(status[k]) for k in ("phase", "podIP")
                                  if k in status}
    out_status["conditions"] = [
        {k: _shared(c[k]) for k in ("type", "status", "reason", "message") if k in c}
        for c in status.get("conditions") or []]
    out_status["containerStatuses"] = [_project_container(c)
                                       for c in status.get("containerStatuses") or []]
    return {"metadata": _meta(pod.get("metadata", {}), annotations=False),
            "spec": out_spec, "status": out_status}


def _project_container(status: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: _shared(status[k]) for k in ("name", "ready", "restartCount", "state")
           if k in status}
    # Why the container last stopped: its termination message is the engine's own reason.
    terminated = (status.get("lastState") or {}).get("terminated") or {}
    if message := terminated.get("message"):
        out["lastState"] = {"terminated": {"exitCode": terminated.get("exitCode"),
                                           "message": str(message)[-1024:]}}
    return out


@dataclass(frozen=True)
class Observed:
    """A ModelDeployment and its children, as the indexes hold them."""

    resource: Mapping[str, Any]
    deployments: list[Mapping[str, Any]]
    pods: list[Mapping[str, Any]]
    services: list[Mapping[str, Any]]
    endpoint_slices: list[Mapping[str, Any]] = field(default_factory=list)
    network_policies: list[Mapping[str, Any]] = field(default_factory=list)
    jobs: list[Mapping[str, Any]] = field(default_factory=list)  # conversion Jobs
    job_pods: list[Mapping[str, Any]] = field(default_factory=list)  # their pods


def fingerprint(observed: Observed) -> tuple[str | None, ...]:
    """The resourceVersions of everything a pass reads from the indexes: equal
    fingerprints, equal inputs (the resync skips a resource whose last pass found nothing
    to do when this has not changed since)."""
    children = (*observed.deployments, *observed.services, *observed.endpoint_slices,
                *observed.network_policies, *observed.jobs, *observed.job_pods,
                *observed.pods)
    return (observed.resource.get("metadata", {}).get("resourceVersion"),
            *sorted(str(c.get("metadata", {}).get("resourceVersion")) for c in children))


@dataclass(frozen=True)
class VersionState:
    """One version's Deployment and pods, as observed."""

    version: str
    deployment: str
    desired: int
    replicas: int = 0
    ready: int = 0
    updated: int = 0
    up_to_date: bool = True  # the Deployment controller has seen its latest spec
    gpus: int = 0
    unschedulable: str | None = None  # the scheduler's message for a pending pod
    pod_failure: tuple[str, str] | None = None  # (reason, message) of a failing container

    @property
    def available(self) -> bool:
        return self.up_to_date and self.desired > 0 and self.ready >= self.desired \
            and self.updated >= self.desired


@dataclass(frozen=True)
class ActivatorEndpoints:
    """Where the activator listens: its ready addresses, proxy port and admin port."""

    addresses: tuple[str, ...]
    port: int  # the proxy
    admin_port: int  # /metrics


@dataclass(frozen=True)
class World:
    """Everything one pass knows. Built by :func:`build`; never changed afterwards."""

    key: Key
    owner: Owner
    generation: int
    resource: Mapping[str, Any]  # for Events' involved object
    annotations: Mapping[str, str]
    deleting: bool
    spec: api.ModelDeploymentSpec | None  # None when the spec is invalid: see spec_error
    spec_error: str | None
    previous: api_status.ModelDeploymentStatus  # the latest status (ours, if the index lags)
    versions: Mapping[str, VersionState]
    live: Mapping[LiveKey, Mapping[str, Any]]  # the children that exist, by (kind, name)
    pods: Sequence[Mapping[str, Any]]
    gateway: bool  # the cluster serves the Gateway API's HTTPRoute
    activator: ActivatorEndpoints | None  # None: no activator, or none ready
    activator_configured: bool = False  # the operator was told of an activator Service
    node_cache: NodeCache | None = None  # the node-local model cache pods mount, if any
    # NetworkPolicy peers admitted to every model (operator, activator, Prometheus: the chart's)
    network_peers: tuple[Mapping[str, Any], ...] = ()
    jobs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # conversion Jobs
    job_pods: Sequence[Mapping[str, Any]] = ()  # the conversion Jobs' pods

    def ready_pod_ips(self, version: str) -> list[str]:
        """Addresses of the version's ready, not terminating pods."""
        return [p["status"]["podIP"] for p in self.pods
                if p["metadata"].get("labels", {}).get(VERSION_LABEL) == version
                and not p["metadata"].get("deletionTimestamp")
                and p.get("status", {}).get("podIP") and pod_ready(p)]


def build(observed: Observed, previous: Mapping[str, Any], *, gateway: bool,
          activator: ActivatorEndpoints | None, activator_configured: bool = False,
          node_cache: NodeCache | None = None,
          network_peers: tuple[Mapping[str, Any], ...] = ()) -> World:
    """The world of one pass. ``previous`` is the latest status: the index's, or what the
    last pass wrote when the index has not caught up with it yet."""
    meta = observed.resource["metadata"]
    spec: api.ModelDeploymentSpec | None = None
    error: str | None = None
    try:
        spec = api.parse_spec(dict(observed.resource.get("spec") or {}))
    except pydantic.ValidationError as exc:
        error = "; ".join(f"spec.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                          for e in exc.errors())[:1000]
    live = {(kind, obj["metadata"]["name"]): {**obj, "kind": kind}
            for kind, objs in (("Deployment", observed.deployments),
                               ("Service", observed.services),
                               ("EndpointSlice", observed.endpoint_slices),
                               ("NetworkPolicy", observed.network_policies),
                               ("Job", observed.jobs))
            for obj in objs}
    return World(
        key=(meta["namespace"], meta["name"]),
        owner=Owner(meta["name"], meta["namespace"], meta["uid"]),
        generation=int(meta.get("generation", 1)),
        resource=observed.resource,
        annotations=MappingProxyType(dict(meta.get("annotations") or {})),
        deleting=bool(meta.get("deletionTimestamp")),
        spec=spec, spec_error=error,
        previous=api_status.parse_status(dict(previous)),
        versions=MappingProxyType(observe_versions(observed.deployments, observed.pods)),
        live=MappingProxyType(live),
        pods=tuple(observed.pods),
        gateway=gateway,
        activator=activator,
        node_cache=node_cache,
        activator_configured=activator_configured,
        network_peers=network_peers,
        jobs=MappingProxyType({j["metadata"]["name"]: j for j in observed.jobs}),
        job_pods=tuple(observed.job_pods),
    )


def observe_versions(
    deployments: Iterable[Mapping[str, Any]], pods: Iterable[Mapping[str, Any]]
) -> dict[str, VersionState]:
    """Group live Deployments and Pods by the version label."""
    pods_by_version: dict[str, list[Mapping[str, Any]]] = {}
    for pod in pods:
        if pod.get("metadata", {}).get("deletionTimestamp"):
            continue
        version = pod.get("metadata", {}).get("labels", {}).get(VERSION_LABEL)
        if version is not None:
            pods_by_version.setdefault(version, []).append(pod)
    states: dict[str, VersionState] = {}
    for dep in deployments:
        meta, spec, st = dep.get("metadata", {}), dep.get("spec", {}), dep.get("status", {})
        version = meta.get("labels", {}).get(VERSION_LABEL)
        if version is None:
            continue
        version_pods = pods_by_version.get(version, [])
        states[version] = VersionState(
            version=version,
            deployment=meta.get("name", ""),
            desired=int(spec.get("replicas", 1)),
            replicas=int(st.get("replicas", 0)),
            ready=int(st.get("readyReplicas", 0)),
            updated=int(st.get("updatedReplicas", 0)),
            up_to_date=int(st.get("observedGeneration", 0)) >= int(meta.get("generation", 0)),
            gpus=sum(_pod_gpus(p) for p in version_pods if p.get("spec", {}).get("nodeName")),
            unschedulable=_unschedulable_message(version_pods),
            pod_failure=_pod_failure(version_pods),
        )
    return states


def _pod_gpus(pod: Mapping[str, Any]) -> int:
    total = 0
    for container in pod.get("spec", {}).get("containers", []):
        limits = container.get("resources", {}).get("limits", {})
        total += int(limits.get(GPU_RESOURCE, 0) or 0)
    return total


def _unschedulable_message(pods: Sequence[Mapping[str, Any]]) -> str | None:
    for pod in pods:
        for cond in pod.get("status", {}).get("conditions", []) or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False" \
                    and cond.get("reason") == "Unschedulable":
                return str(cond.get("message") or "pod cannot be scheduled")
    return None


def _pod_failure(pods: Sequence[Mapping[str, Any]]) -> tuple[str, str] | None:
    for pod in pods:
        for cs in pod.get("status", {}).get("containerStatuses", []) or []:
            waiting = (cs.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in _POD_FAILURE_REASONS:
                terminated = (cs.get("lastState") or {}).get("terminated") or {}
                if reason := str(terminated.get("message") or "").strip():
                    # The container said why it stopped (a launcher's termination log, or
                    # its log's tail): that, not the back-off, is what the user must read.
                    return str(waiting["reason"]), reason
                return str(waiting["reason"]), str(waiting.get("message") or waiting["reason"])
    return None

"""Render the Kubernetes objects a ModelDeployment wants: pure functions of its spec.

Called by :mod:`.reconcile` each pass; the output is plain dicts ready for
server-side apply. Rendering is deterministic (same spec, same bytes), and each
object carries ``modelyard.dev/applied-hash`` of its own content so the writer
can tell "spec changed" from "someone edited it by hand" without a write.

Objects per ModelDeployment ``NAME``:

* one Deployment per live model version, ``NAME-v<version slug>``, of runtime pods
  that request ``nvidia.com/gpu``, select the GPU product by node label, tolerate
  the GPU taint, run non-root on a read-only root filesystem, and are probed on
  the runtime's model-ready endpoint;
* the stable Service ``NAME``, selecting every ready runtime pod of the model.

The environment variables set here are the contract with ``modelyard.runtime``
(see ``runtime/config.py``); a test starts the runtime with exactly this env.

Imports no Kubernetes client.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from modelyard import contract

from . import api

MANAGED_BY = contract.MANAGED_BY_LABEL
MANAGER = contract.MANAGER
MODEL_LABEL = contract.MODEL_LABEL
VERSION_LABEL = contract.VERSION_LABEL
HASH_ANNOTATION = contract.HASH_ANNOTATION
GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
SERVICE_PORT = contract.SERVICE_PORT
CONTAINER_NAME = "runtime"
CACHE_DIR = "/var/cache/modelyard"
PVC_MOUNT_ROOT = "/mnt/models"
RUNTIME_UID = 10001
API_KEYS_DIR = "/etc/modelyard/api-keys"  # spec.auth's Secret, mounted (kubelet-updated)
TLS_DIR = "/etc/modelyard/tls"  # spec.tls's kubernetes.io/tls Secret, mounted


@dataclass(frozen=True)
class NodeCache:
    """The node-local model cache: a directory on every node (the chart's DaemonSet
    prepares it), shared by the node's model pods. A model version is fetched into it once
    per node, verified, and found there by the next pod, restart or rollback.

    Pods reach it through a PersistentVolumeClaim, never a hostPath volume of their own,
    so Pod Security's ``baseline`` and ``restricted`` levels admit them: in each namespace
    with models the operator keeps one claim, pre-bound to a cluster-scoped hostPath
    PersistentVolume of that directory (:meth:`claim`). Only the operator, allowed by the
    chart, creates such volumes, and only of this path."""

    path: str
    max_bytes: int | None = None

    @property
    def claim_name(self) -> str:
        """The claim's name in every namespace; it names the path, which a volume cannot
        change, so a new path gets new volumes."""
        return f"modelyard-node-cache-{hashlib.sha256(self.path.encode()).hexdigest()[:8]}"

    def volume_name(self, namespace: str) -> str:
        return f"{self.claim_name}-{namespace}"

    def claim(self, namespace: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """The PersistentVolume (cluster-scoped) and the claim in ``namespace`` bound to it.

        The volume is a hostPath of the directory (DirectoryOrCreate, as the pods had
        before: on a node the DaemonSet has not prepared, the runtime finds it unwritable
        and keeps its own cache, with a warning). Its capacity is the cache's bound
        (nominal: the runtime enforces it); Retain keeps the files when the claim goes."""
        size = str(self.max_bytes) if self.max_bytes else "1Ti"
        labels = {MANAGED_BY: MANAGER, "app.kubernetes.io/component": "node-cache"}
        volume = {
            "apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": self.volume_name(namespace), "labels": labels},
            "spec": {
                "capacity": {"storage": size},
                "accessModes": ["ReadWriteMany"],
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": "",
                "volumeMode": "Filesystem",
                "hostPath": {"path": self.path, "type": "DirectoryOrCreate"},
                "claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                             "namespace": namespace, "name": self.claim_name},
            },
        }
        claim = {
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": self.claim_name, "namespace": namespace, "labels": labels},
            "spec": {
                "accessModes": ["ReadWriteMany"],
                "storageClassName": "",
                "volumeMode": "Filesystem",
                "volumeName": self.volume_name(namespace),
                "resources": {"requests": {"storage": size}},
            },
        }
        return volume, claim


MODEL_CACHE_DIR = f"{CACHE_DIR}/models"


@dataclass(frozen=True)
class Owner:
    """The identity of the ModelDeployment being rendered."""

    name: str
    namespace: str
    uid: str

    def reference(self) -> dict[str, Any]:
        return {
            "apiVersion": api.API_VERSION,
            "kind": api.KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


def version_slug(version: str) -> str:
    """A DNS-label-safe form of ``version``: ``3`` -> ``3``, ``2024.1_RC`` -> ``2024-1-rc-3f2a1``.

    Lowercased, other characters become ``-``; when that changed anything (or the
    result is long) a short digest of the original keeps distinct versions apart.
    """
    slug = re.sub(r"[^a-z0-9-]+", "-", version.lower()).strip("-")
    if slug == version and len(slug) <= 16:
        return slug
    digest = hashlib.sha256(version.encode()).hexdigest()[:5]
    return f"{slug[:10].strip('-')}-{digest}".strip("-")


def deployment_name(owner_name: str, version: str) -> str:
    return f"{owner_name}-v{version_slug(version)}"


def selector_labels(owner_name: str) -> dict[str, str]:
    return {MODEL_LABEL: owner_name}


def selector_string(owner_name: str) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(selector_labels(owner_name).items()))


def common_labels(owner_name: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "modelyard-runtime",
        "app.kubernetes.io/instance": owner_name,
        "app.kubernetes.io/component": "model-server",
        MANAGED_BY: MANAGER,
        MODEL_LABEL: owner_name,
    }


def served_model_name(owner_name: str, spec: api.ModelDeploymentSpec) -> str:
    return spec.model.name or owner_name


def service_url(owner: Owner) -> str:
    return f"http://{owner.name}.{owner.namespace}.svc.cluster.local"


def replicas_wanted(spec: api.ModelDeploymentSpec) -> int:
    """Replicas of the serving version. Autoscaling, when set, starts at its minimum."""
    if spec.autoscaling is not None:
        return spec.autoscaling.min_replicas
    return spec.replicas


def runtime_env(owner: Owner, spec: api.ModelDeploymentSpec,
                node_cache: NodeCache | None = None) -> list[dict[str, str]]:
    """The runtime's configuration, as environment variables (the operator-runtime contract)."""
    model = spec.model
    values: dict[str, str | None] = {  # RuntimeConfig field -> value (modelyard.contract)
        "model_name": served_model_name(owner.name, spec),
        "model_version": model.version,
        "model_uri": pod_uri(model.uri),
        "model_format": str(model.format),
        "sha256": model.sha256,
        "entry_point": model.entry_point,
        "max_batch_size": str(spec.runtime.batching.max_batch_size),
        "max_delay_ms": _number(spec.runtime.batching.max_delay_ms),
        # the queue's bounds only where they differ from the runtime's own defaults (the
        # spec's): a Deployment rendered before the field existed keeps its digest
        "max_queue_items": _unless_default(spec.runtime.queue.max_items, _QUEUE.max_items),
        "max_queue_wait_ms": _unless_default(spec.runtime.queue.max_wait_ms,
                                             _QUEUE.max_wait_ms),
        "handler": spec.runtime.handler,
        "port": str(spec.runtime.port),
        "grpc_port": None if spec.runtime.grpc_port is None else str(spec.runtime.grpc_port),
        "cache_dir": MODEL_CACHE_DIR if node_cache is not None else CACHE_DIR,
        "cache_max_bytes": str(node_cache.max_bytes) if node_cache and node_cache.max_bytes
        else None,
        "device": "cuda" if _gpu_count(spec) else "cpu",
    }
    explain = spec.runtime.explain
    if explain is not None and explain.enabled:  # unset or off: the env (and digest) as before
        values.update(explain="true", explain_method=explain.method,
                      explain_steps=str(explain.steps),
                      explain_max_batch_size=str(explain.max_batch_size),
                      explain_max_concurrent=str(explain.max_concurrent))
    if spec.auth is not None:
        values["api_keys"] = API_KEYS_DIR
    if spec.tls is not None:
        values["tls_cert_file"] = f"{TLS_DIR}/tls.crt"
        values["tls_key_file"] = f"{TLS_DIR}/tls.key"
    if model.inputs is not None or model.outputs is not None:  # declared signature
        values["metadata"] = json.dumps({
            key: [t.model_dump() for t in tensors or ()]
            for key, tensors in (("inputs", model.inputs), ("outputs", model.outputs))},
            separators=(",", ":"))
    if model.optimize is not None:
        values["dtype"] = model.optimize.dtype
        values["quantize"] = model.optimize.quantize
        values["compile"] = "true" if model.optimize.compile else None
    env = contract.runtime_env(values)
    # User-provided variables may add to, but not silently replace, the contract.
    ours = {e["name"] for e in env}
    env += [{"name": k, "value": v} for k, v in sorted(spec.runtime.env.items())
            if k not in ours]
    return env


def render_deployment(
    owner: Owner, spec: api.ModelDeploymentSpec, replicas: int,
    node_cache: NodeCache | None = None,
) -> dict[str, Any]:
    version = spec.model.version
    labels = {**common_labels(owner.name), VERSION_LABEL: version}
    selector = {MODEL_LABEL: owner.name, VERSION_LABEL: version}
    port = spec.runtime.port
    if spec.runtime.engine == api.Engine.VLLM:
        container = _vllm_container(owner, spec, node_cache)
    else:
        container = _runtime_container(owner, spec, node_cache)
    container["securityContext"] = {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }
    if spec.runtime.image_pull_policy:
        container["imagePullPolicy"] = spec.runtime.image_pull_policy
    if spec.model.credentials_secret:
        container["envFrom"] = [{"secretRef": {"name": spec.model.credentials_secret}}]
    volumes: list[dict[str, Any]] = [
        {"name": "model-cache", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "256Mi"}},
    ]
    container["volumeMounts"] = [
        {"name": "model-cache", "mountPath": CACHE_DIR},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    if node_cache is not None:
        volumes.append({"name": "node-cache",
                        "persistentVolumeClaim": {"claimName": node_cache.claim_name}})
        container["volumeMounts"].append({"name": "node-cache", "mountPath": MODEL_CACHE_DIR})
    if spec.runtime.engine == api.Engine.VLLM:
        # vLLM's workers share tensors through /dev/shm; a container's default is 64 MiB.
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
        container["volumeMounts"].append({"name": "dshm", "mountPath": "/dev/shm"})
    if spec.auth is not None:
        _mount_api_keys(spec, container, volumes)
    pod_annotations = _mount_tls(spec, container, volumes)
    if claim := pvc_claim(spec.model.uri):
        volumes.append({"name": "model-store",
                        "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        container["volumeMounts"].append(
            {"name": "model-store", "mountPath": f"{PVC_MOUNT_ROOT}/{claim}", "readOnly": True})

    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": contract.TERMINATION_GRACE_SECONDS,
        "securityContext": {
            "runAsNonRoot": True, "runAsUser": RUNTIME_UID, "runAsGroup": RUNTIME_UID,
            "fsGroup": RUNTIME_UID, "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    pod_spec |= placement(spec)

    deployment: dict[str, Any] = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": deployment_name(owner.name, version),
            "namespace": owner.namespace,
            "labels": labels,
            "ownerReferences": [owner.reference()],
        },
        "spec": {
            "revisionHistoryLimit": 3,
            "selector": {"matchLabels": selector},
            # A template change within one version (new image, new resources) replaces
            # pods one at a time without ever dropping below the serving count.
            "strategy": {"type": "RollingUpdate",
                         "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {
                    "labels": labels,
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(port),
                        "prometheus.io/path": "/metrics",
                        **pod_annotations,
                    },
                },
                "spec": pod_spec,
            },
        },
    }
    # The digest leaves replicas out: scaling alone (the autoscaler's, through the scale
    # subresource) is not a change of what the Deployment is.
    with_hash(deployment)
    deployment["spec"]["replicas"] = replicas
    return deployment


def placement(spec: api.ModelDeploymentSpec) -> dict[str, Any]:
    """Where the model's pods (and its conversion Job's, :mod:`.conversion`) may run: the
    GPU product's node label, the GPU taint tolerated, and spec.scheduling."""
    out: dict[str, Any] = {}
    node_selector = dict(spec.scheduling.node_selector)
    gpu = spec.resources.gpu
    tolerations = [t.model_dump(by_alias=True, exclude_none=True)
                   for t in spec.scheduling.tolerations]
    if gpu is not None and gpu.count > 0:
        if gpu.product:
            node_selector[GPU_PRODUCT_LABEL] = gpu.product
        tolerations.insert(0, {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"})
    if node_selector:
        out["nodeSelector"] = dict(sorted(node_selector.items()))
    if tolerations:
        out["tolerations"] = tolerations
    if spec.scheduling.affinity:
        out["affinity"] = spec.scheduling.affinity
    if spec.scheduling.priority_class_name:
        out["priorityClassName"] = spec.scheduling.priority_class_name
    if spec.scheduling.runtime_class_name:
        out["runtimeClassName"] = spec.scheduling.runtime_class_name
    return out


def _mount_api_keys(spec: api.ModelDeploymentSpec, container: dict[str, Any],
                    volumes: list[dict[str, Any]]) -> None:
    """spec.auth: the runtime mounts the Secret (the kubelet updates a mounted Secret in
    place, and the runtime re-reads it: a rotation needs no restart); vLLM takes its one key
    from the environment (read at start: a rotation there is a rollout restart)."""
    assert spec.auth is not None
    secret = spec.auth.api_key_secret
    if spec.runtime.engine == api.Engine.VLLM:
        container["env"].insert(0, {"name": "VLLM_API_KEY", "valueFrom": {"secretKeyRef": {
            "name": secret, "key": api.VLLM_API_KEY_ENTRY}}})
        return
    volumes.append({"name": "api-keys", "secret": {"secretName": secret, "defaultMode": 0o440}})
    container["volumeMounts"].append(
        {"name": "api-keys", "mountPath": API_KEYS_DIR, "readOnly": True})


def _mount_tls(spec: api.ModelDeploymentSpec, container: dict[str, Any],
               volumes: list[dict[str, Any]]) -> dict[str, str]:
    """spec.tls: the kubernetes.io/tls Secret mounted (the kubelet updates the files when
    cert-manager renews it; the runtime reloads them), probes over HTTPS; the pod's
    annotations that tell Prometheus, the operator and the activator to use https."""
    if spec.tls is None:
        return {}
    volumes.append({"name": "tls", "secret": {"secretName": spec.tls.secret_name,
                                              "defaultMode": 0o440}})
    container["volumeMounts"].append({"name": "tls", "mountPath": TLS_DIR, "readOnly": True})
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        container[probe]["httpGet"]["scheme"] = "HTTPS"
    return {"prometheus.io/scheme": "https", contract.SCHEME_ANNOTATION: "https"}


def _runtime_container(owner: Owner, spec: api.ModelDeploymentSpec,
                       node_cache: NodeCache | None) -> dict[str, Any]:
    """modelyard's PyTorch runtime: probed on its own model-ready endpoint."""
    model_name = served_model_name(owner.name, spec)
    return {
        "name": CONTAINER_NAME,
        "image": spec.runtime.image_or_default(),
        "env": runtime_env(owner, spec, node_cache),
        "ports": [{"name": "http", "containerPort": spec.runtime.port, "protocol": "TCP"},
                  *([{"name": "grpc", "containerPort": spec.runtime.grpc_port, "protocol": "TCP"}]
                    if spec.runtime.grpc_port is not None else [])],
        "readinessProbe": {
            "httpGet": {"path": f"/v2/models/{model_name}/ready", "port": "http"},
            "periodSeconds": 5, "timeoutSeconds": 2, "failureThreshold": 2,
        },
        "livenessProbe": {
            "httpGet": {"path": "/v2/health/live", "port": "http"},
            "periodSeconds": 10, "timeoutSeconds": 3, "failureThreshold": 6,
        },
        # Loading a model of a few GB can take minutes; do not let liveness kill it meanwhile.
        "startupProbe": {
            "httpGet": {"path": "/v2/health/live", "port": "http"},
            "periodSeconds": 5, "failureThreshold": 120,
        },
        "resources": resources(spec),
    }


LLM_COMMAND = ("python3", "-m", "modelyard.runtime.llm")
LLM_HOME = f"{CACHE_DIR}/home"  # vLLM's and its libraries' caches (the root is read-only)


def vllm_args(spec: api.ModelDeploymentSpec) -> list[str]:
    """vLLM's flags from the spec's first-class fields, then its extraArgs as they are.
    The launcher adds the ones it owns (--model, --served-model-name, --host, --port)."""
    settings = spec.runtime.vllm or api.VllmSettings()
    args = ["--dtype", settings.dtype]
    if settings.max_model_len is not None:
        args += ["--max-model-len", str(settings.max_model_len)]
    if settings.gpu_memory_utilization is not None:
        args += ["--gpu-memory-utilization", _number(settings.gpu_memory_utilization)]
    if (gpus := _gpu_count(spec)) > 1:
        args += ["--tensor-parallel-size", str(gpus)]
    return args + list(settings.extra_args)


def llm_env(owner: Owner, spec: api.ModelDeploymentSpec,
            node_cache: NodeCache | None = None) -> list[dict[str, str]]:
    """The launcher's configuration (modelyard.contract.LLM_SETTINGS), then the user's."""
    model = spec.model
    env = contract.llm_env({
        "model_name": served_model_name(owner.name, spec),
        "model_version": model.version,
        "model_uri": pod_uri(model.uri),
        "sha256": model.sha256,
        "port": str(spec.runtime.port),
        "health_port": str(contract.LLM_HEALTH_PORT),
        "cache_dir": MODEL_CACHE_DIR,
        "cache_max_bytes": str(node_cache.max_bytes) if node_cache and node_cache.max_bytes
        else None,
        "device": "cuda" if _gpu_count(spec) else "cpu",
    })
    env.append({"name": "HOME", "value": LLM_HOME})
    ours = {e["name"] for e in env}
    env += [{"name": k, "value": v} for k, v in sorted(spec.runtime.env.items())
            if k not in ours]
    return env


def _vllm_container(owner: Owner, spec: api.ModelDeploymentSpec,
                    node_cache: NodeCache | None) -> dict[str, Any]:
    """vLLM under modelyard's launcher: the launcher fetches and verifies the model
    directory, runs vLLM on it, and answers the probes on its own port: ready only once a
    real completion has been answered (and while vLLM's engine stays healthy). Clients
    reach vLLM's own port directly, with no hop in between."""
    return {
        "name": CONTAINER_NAME,
        "image": spec.runtime.image_or_default(),
        "command": list(LLM_COMMAND),
        "args": vllm_args(spec),
        "env": llm_env(owner, spec, node_cache),
        "ports": [{"name": "http", "containerPort": spec.runtime.port, "protocol": "TCP"},
                  {"name": "health", "containerPort": contract.LLM_HEALTH_PORT,
                   "protocol": "TCP"}],
        "readinessProbe": {
            "httpGet": {"path": "/ready", "port": "health"},
            "periodSeconds": 5, "timeoutSeconds": 3, "failureThreshold": 2,
        },
        "livenessProbe": {
            "httpGet": {"path": "/live", "port": "health"},
            "periodSeconds": 10, "timeoutSeconds": 3, "failureThreshold": 6,
        },
        # A big model's download and load take many minutes: allow an hour before liveness.
        "startupProbe": {
            "httpGet": {"path": "/live", "port": "health"},
            "periodSeconds": 10, "failureThreshold": 360,
        },
        # The launcher writes why the engine stopped (its own error line) here; a crash
        # loop's reason in status is then the engine's, not only an exit code.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "resources": resources(spec),
    }


def render_service(owner: Owner, active: str | None = None, *,
                   to_activator: bool = False, grpc_port: int | None = None,
                   grpc_tls: bool = False) -> dict[str, Any]:
    """The stable Service: every ready runtime pod of the model, whatever its version (the
    canary split is by replica ratio), or only version ``active`` (blue-green); with
    ``to_activator`` (scaled to zero) no selector, its endpoints being the activator's
    (:func:`render_activator_slice`). With ``grpc_port``, a second port, ``grpc`` (OIP over
    gRPC: HTTP/2 cleartext, or TLS with ``grpc_tls``), on that number."""
    selector = selector_labels(owner.name)
    if active is not None:
        selector[VERSION_LABEL] = active
    service: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": owner.name,
            "namespace": owner.namespace,
            "labels": common_labels(owner.name),
            "ownerReferences": [owner.reference()],
        },
        "spec": {
            "type": "ClusterIP",
            "selector": selector,
            "ports": [{"name": "http", "port": SERVICE_PORT, "targetPort": "http",
                       "protocol": "TCP"}],
        },
    }
    if grpc_port is not None:
        port = {"name": "grpc", "port": grpc_port, "targetPort": "grpc", "protocol": "TCP"}
        if not grpc_tls:
            port["appProtocol"] = "kubernetes.io/h2c"
        service["spec"]["ports"].append(port)
    if to_activator:
        del service["spec"]["selector"]
    return with_hash(service)


ENDPOINTSLICE_MANAGER = contract.ENDPOINTSLICE_MANAGER


def activator_slice_name(owner_name: str) -> str:
    return f"{owner_name}-activator"


def render_activator_slice(owner: Owner, addresses: Sequence[str], port: int
                           ) -> dict[str, Any]:
    """The stable Service's endpoints while the model is at zero: the activator's pods."""
    return with_hash({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": activator_slice_name(owner.name),
            "namespace": owner.namespace,
            "labels": {**common_labels(owner.name), "kubernetes.io/service-name": owner.name,
                       "endpointslice.kubernetes.io/managed-by": ENDPOINTSLICE_MANAGER},
            "ownerReferences": [owner.reference()],
        },
        "addressType": "IPv4",
        "endpoints": [{"addresses": [address], "conditions": {"ready": True}}
                      for address in sorted(addresses)],
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
    })


def version_service_name(owner_name: str, version: str) -> str:
    return deployment_name(owner_name, version)


def render_version_service(owner: Owner, version: str) -> dict[str, Any]:
    """A Service per live version, so each can be reached, scraped and compared alone."""
    return _single_version_service(owner, version, version_service_name(owner.name, version))


def preview_service_name(owner_name: str) -> str:
    return f"{owner_name}-preview"


def render_preview_service(owner: Owner, version: str) -> dict[str, Any]:
    """The blue-green preview Service: the new version alone, before it is promoted."""
    return _single_version_service(owner, version, preview_service_name(owner.name))


def _single_version_service(owner: Owner, version: str, name: str) -> dict[str, Any]:
    service = render_service(owner, version)
    service["metadata"]["name"] = name
    service["metadata"]["labels"] = {**common_labels(owner.name), VERSION_LABEL: version}
    service["metadata"].pop("annotations", None)
    return with_hash(service)


NETWORK_POLICY_API_VERSION = "networking.k8s.io/v1"
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"  # set by the API server on every namespace


def namespace_peer(namespace: str, pod_labels: dict[str, str] | None = None) -> dict[str, Any]:
    """A NetworkPolicy peer: the pods of one namespace (those with ``pod_labels``)."""
    peer: dict[str, Any] = {
        "namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: namespace}}}
    if pod_labels is not None:
        peer["podSelector"] = {"matchLabels": dict(sorted(pod_labels.items()))}
    return peer


def render_network_policy(owner: Owner, spec: api.ModelDeploymentSpec,
                          system_peers: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """The model's NetworkPolicy: ingress to its pods' serving ports (HTTP, and gRPC when
    served) only from its clients (default: its own namespace), the model's Gateway, and
    ``system_peers``: the operator
    (scrapes for analysis and autoscaling), the activator and Prometheus, as the chart
    names them (``MODELYARD_NETWORK_PEERS``). Egress is left alone (the model store, DNS)."""
    clients = spec.network_policy.clients
    if clients is None:
        peers: list[dict[str, Any]] = [{"podSelector": {}}]
    else:
        peers = [client.model_dump(by_alias=True, exclude_none=True) for client in clients]
    if spec.gateway is not None:
        peers.append(namespace_peer(spec.gateway.namespace or owner.namespace))
    peers += [dict(peer) for peer in system_peers]
    unique: list[dict[str, Any]] = []
    for peer in peers:
        if peer not in unique:
            unique.append(peer)
    return with_hash({
        "apiVersion": NETWORK_POLICY_API_VERSION,
        "kind": "NetworkPolicy",
        "metadata": {
            "name": owner.name,
            "namespace": owner.namespace,
            "labels": common_labels(owner.name),
            "ownerReferences": [owner.reference()],
        },
        "spec": {
            "podSelector": {"matchLabels": selector_labels(owner.name)},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": unique,
                         "ports": [{"protocol": "TCP", "port": port}
                                   for port in (spec.runtime.port, spec.runtime.grpc_port)
                                   if port is not None]}],
        },
    })


HTTPROUTE_API_VERSION = "gateway.networking.k8s.io/v1"


def render_httproute(owner: Owner, spec: api.ModelDeploymentSpec,
                     weights: dict[str, int]) -> dict[str, Any]:
    """The model's HTTPRoute: one backend per live version (its own Service), weighted."""
    route: dict[str, Any] = {
        "apiVersion": HTTPROUTE_API_VERSION,
        "kind": "HTTPRoute",
        "metadata": {
            "name": owner.name,
            "namespace": owner.namespace,
            "labels": common_labels(owner.name),
            "ownerReferences": [owner.reference()],
        },
        "spec": {"rules": [{"backendRefs": [
            {"name": version_service_name(owner.name, version), "port": SERVICE_PORT,
             "weight": weight}
            for version, weight in sorted(weights.items())]}]},
    }
    if spec.gateway is not None:
        parent: dict[str, str] = {"name": spec.gateway.name}
        if spec.gateway.namespace:
            parent["namespace"] = spec.gateway.namespace
        if spec.gateway.section_name:
            parent["sectionName"] = spec.gateway.section_name
        route["spec"]["parentRefs"] = [parent]
    return with_hash(route)


def with_hash(obj: dict[str, Any]) -> dict[str, Any]:
    """Stamp ``obj`` with a digest of its own content (annotations excluded from it)."""
    digest = hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]
    annotations = obj["metadata"].setdefault("annotations", {})
    annotations[HASH_ANNOTATION] = digest
    return obj


def resources(spec: api.ModelDeploymentSpec) -> dict[str, Any]:
    amounts: dict[str, str] = {}
    if spec.resources.cpu is not None:
        amounts["cpu"] = str(spec.resources.cpu)
    if spec.resources.memory is not None:
        amounts["memory"] = str(spec.resources.memory)
    if count := _gpu_count(spec):
        amounts[GPU_RESOURCE] = str(count)
    if not amounts:
        return {}
    # Requests equal limits: predictable latency (Guaranteed QoS when cpu and memory are set).
    return {"requests": dict(amounts), "limits": dict(amounts)}


def _gpu_count(spec: api.ModelDeploymentSpec) -> int:
    return spec.resources.gpu.count if spec.resources.gpu is not None else 0


def pvc_claim(uri: str) -> str | None:
    if not uri.startswith("pvc://"):
        return None
    return uri.removeprefix("pvc://").split("/", 1)[0]


def pod_uri(uri: str) -> str:
    """pvc://CLAIM/PATH is mounted into the pod; the runtime reads it as a file."""
    if claim := pvc_claim(uri):
        path = uri.removeprefix(f"pvc://{claim}/")
        return f"file://{PVC_MOUNT_ROOT}/{claim}/{path}"
    return uri


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


_QUEUE = api.QueueBounds()


def _unless_default(value: float, default: float) -> str | None:
    return None if value == default else _number(value)

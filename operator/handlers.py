"""The kopf layer: settings, indexes and the triggers that run a reconcile pass.

Run it as ``kopf run -m modelyard.operator.handlers --all-namespaces`` (or with
``--namespace=NS`` repeated to limit it), or through ``modelyard operator``.
Kept thin on purpose: every decision lives in :mod:`.reconcile` and the pure
modules it calls.

* Indexes keep the ModelDeployments and their Deployments, Services, Pods and
  conversion Jobs (with their pods) in memory, so a pass reads nothing from the API;
  each keeps only what a pass reads of an object (:func:`.world.project_pod` and its
  siblings), not the whole object.
* A pass runs on every event of a ModelDeployment (its initial listing included);
  when one of its children changes (a hand edit is reverted, a pod becomes ready,
  the scheduler gives up on a pod); and on one operator-wide resync loop, a safety
  net that needs no per-resource timer (so no finalizer blocks deletion). A quiet
  cluster causes no writes at all.
* Only event handlers, so kopf keeps no state on the objects: no progress or diff-base
  annotations and no finalizer, and the operator needs no ``patch`` on ModelDeployments
  (only on their status). kopf's logging-to-Events is off (we post our own Events).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import kopf
from kubernetes.utils import parse_quantity

from . import api, gate, metrics
from .activation import ActivatorLink
from .conversion import CONVERT_LABEL
from .kube import Writer, load_api_client
from .leader import ElectionConfig, Elector
from .reconcile import Reconciler
from .render import ENDPOINTSLICE_MANAGER, MANAGED_BY, MANAGER, MODEL_LABEL, NodeCache
from .scaling import Autoscaler, nobody_waits
from .world import Observed, project_child, project_model, project_pod

log = logging.getLogger(__name__)

_MANAGED: dict[str, Any] = {MANAGED_BY: MANAGER, MODEL_LABEL: kopf.PRESENT}
# Conversion Jobs and their pods (conversion.py) carry the model's name under their own
# label: the model's Services select MODEL_LABEL, and must never select a Job's pod.
_CONVERTING: dict[str, Any] = {MANAGED_BY: MANAGER, CONVERT_LABEL: kopf.PRESENT}
_RESOURCE = (api.GROUP, api.VERSION, api.PLURAL)
# Full passes for every resource, as a safety net for missed events; they write nothing when
# nothing changed. Read at import: set MODELYARD_RESYNC_SECONDS before the operator starts.
SAFETY_INTERVAL_S = float(os.environ.get("MODELYARD_RESYNC_SECONDS", "300"))
# How often the autoscaler measures and decides (its rate limits are per decision).
AUTOSCALE_TICK_S = float(os.environ.get("MODELYARD_AUTOSCALE_TICK_SECONDS", "2"))


def node_cache_from_env(environ: Mapping[str, str]) -> NodeCache | None:
    """The node-local model cache the chart configures (``nodeCache`` in its values):
    ``MODELYARD_NODE_CACHE_PATH`` on every node, bounded by ``MODELYARD_NODE_CACHE_MAX_BYTES``
    (a quantity: 200Gi). Unset: each pod keeps its own cache in an emptyDir."""
    path = environ.get("MODELYARD_NODE_CACHE_PATH", "").strip()
    if not path:
        return None
    raw = environ.get("MODELYARD_NODE_CACHE_MAX_BYTES", "").strip()
    bound = int(parse_quantity(raw)) if raw else None  # type: ignore[no-untyped-call]
    return NodeCache(path, bound)


def network_peers_from_env(environ: Mapping[str, str]) -> tuple[dict[str, Any], ...]:
    """The NetworkPolicy peers every model admits (the operator, the activator, the
    Prometheus the chart is told about): ``MODELYARD_NETWORK_PEERS``, a JSON list of
    NetworkPolicyPeer objects the chart renders. Unset: none beyond each model's own."""
    raw = environ.get("MODELYARD_NETWORK_PEERS", "").strip()
    if not raw:
        return ()
    peers = json.loads(raw)
    if not isinstance(peers, list) or not all(isinstance(p, dict) for p in peers):
        raise ValueError("MODELYARD_NETWORK_PEERS must be a JSON list of NetworkPolicyPeer "
                         f"objects, got {raw[:200]!r}")
    return tuple(peers)


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.posting.enabled = False
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.execution.max_workers = 8
    writer = Writer(load_api_client())
    loop = asyncio.get_running_loop()
    election: ElectionConfig | None = memo.get("election") or ElectionConfig.from_env()
    elector = None

    def take_over() -> None:  # act at once on what the previous leader left
        memo["takeover"] = loop.create_task(reconciler.resync_once(), name="modelyard-takeover")

    if election is not None:
        elector = Elector(writer, election, on_started=take_over)
        memo["elector"] = elector
        memo["election_task"] = loop.create_task(elector.run(), name="modelyard-election")
    activator = ActivatorLink.from_env(writer)
    reconciler = Reconciler(writer, leading=lambda: elector is None or elector.leading,
                            activator=activator, node_cache=node_cache_from_env(os.environ),
                            network_peers=network_peers_from_env(os.environ))
    memo["reconciler"] = reconciler
    if port := os.environ.get("MODELYARD_METRICS_PORT"):
        memo["metrics_server"] = metrics.start(int(port))
    metrics.set_leader(reconciler.leading)
    metrics.set_models_provider(lambda: _statuses(reconciler, loop))
    memo["resync"] = loop.create_task(reconciler.resync_forever(SAFETY_INTERVAL_S),
                                      name="modelyard-resync")
    autoscaler = Autoscaler(reconciler, waiting=(lambda key: activator.waiting(*key))
                            if activator else nobody_waits)
    memo["autoscaler"] = loop.create_task(autoscaler.run_forever(AUTOSCALE_TICK_S),
                                          name="modelyard-autoscaler")


@kopf.on.cleanup()
async def shutdown(memo: kopf.Memo, **_: Any) -> None:
    for name in ("election_task", "autoscaler", "resync"):
        task: asyncio.Task[None] | None = memo.get(name)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    elector: Elector | None = memo.get("elector")
    if elector is not None:
        await elector.release()
    server = memo.get("metrics_server")
    if server is not None:
        server.stop()
    metrics.set_leader(False)


def _statuses(reconciler: Reconciler, loop: asyncio.AbstractEventLoop
              ) -> list[tuple[str, str, Mapping[str, Any]]]:
    """Every known ModelDeployment's status, for the per-resource metrics. Called on the
    metrics server's thread; the indexes are read on the event loop."""
    return asyncio.run_coroutine_threadsafe(reconciler.statuses(), loop).result(timeout=10)


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """The pod's ServiceAccount in a cluster, else ``$KUBECONFIG`` as it is *now*.

    (kopf's default goes through the kubernetes client, which reads ``$KUBECONFIG``
    once at import time; the dev CLI and tests point it at a cluster later.)
    """
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        return kopf.login_with_service_account(**kwargs)
    return kopf.login_with_kubeconfig(**kwargs)


# --------------------------------------------------------------------- indexes


# Each index keeps a projection of its objects (world.project_*): what a pass reads, not
# whole objects.


@kopf.index(*_RESOURCE)
def model_index(body: kopf.Body, namespace: str | None, name: str, **_: Any) -> Any:
    return {(namespace, name): project_model(body)}


@kopf.index("apps", "v1", "deployments", labels=_MANAGED)
def deployment_index(body: kopf.Body, namespace: str | None, labels: kopf.Labels,
                     **_: Any) -> Any:
    return {(namespace, labels[MODEL_LABEL]): project_child(body)}


@kopf.index("", "v1", "services", labels=_MANAGED)
def service_index(body: kopf.Body, namespace: str | None, labels: kopf.Labels,
                  **_: Any) -> Any:
    return {(namespace, labels[MODEL_LABEL]): project_child(body)}


@kopf.index("discovery.k8s.io", "v1", "endpointslices",
            labels={MANAGED_BY: MANAGER, MODEL_LABEL: kopf.PRESENT,
                    "endpointslice.kubernetes.io/managed-by": ENDPOINTSLICE_MANAGER})
def endpointslice_index(body: kopf.Body, namespace: str | None, labels: kopf.Labels,
                        **_: Any) -> Any:
    return {(namespace, labels[MODEL_LABEL]): project_child(
        body, fields=("endpoints", "ports", "addressType"))}


@kopf.index("networking.k8s.io", "v1", "networkpolicies", labels=_MANAGED)
def networkpolicy_index(body: kopf.Body, namespace: str | None, labels: kopf.Labels,
                        **_: Any) -> Any:
    return {(namespace, labels[MODEL_LABEL]): project_child(body)}


@kopf.index("", "v1", "pods", labels=_MANAGED)
def pod_index(body: kopf.Body, namespace: str | None, labels: kopf.Labels, **_: Any) -> Any:
    return {(namespace, labels[MODEL_LABEL]): project_pod(body)}


@kopf.index("batch", "v1", "jobs", labels=_CONVERTING)
def job_index(body: kopf.Body, namespace: str | None, labels: kopf.Labels, **_: Any) -> Any:
    return {(namespace, labels[CONVERT_LABEL]): project_child(body, fields=())}


@kopf.index("", "v1", "pods", labels=_CONVERTING)
def job_pod_index(body: kopf.Body, namespace: str | None, labels: kopf.Labels,
                  **_: Any) -> Any:
    return {(namespace, labels[CONVERT_LABEL]): project_pod(body)}


async def _reconcile(namespace: str | None, name: str, memo: kopf.Memo, priority: int,
                     **indexes: Any) -> None:
    assert namespace is not None  # ModelDeployments are namespaced
    key = (namespace, name)
    reconciler: Reconciler = memo["reconciler"]

    def snapshot() -> Observed | None:
        found: list[Mapping[str, Any]] = list(indexes["model_index"].get(key, []))
        if not found:
            return None
        return Observed(
            resource=found[0],
            deployments=list(indexes["deployment_index"].get(key, [])),
            pods=list(indexes["pod_index"].get(key, [])),
            services=list(indexes["service_index"].get(key, [])),
            endpoint_slices=list(indexes["endpointslice_index"].get(key, [])),
            network_policies=list(indexes["networkpolicy_index"].get(key, [])),
            jobs=list(indexes["job_index"].get(key, [])),
            job_pods=list(indexes["job_pod_index"].get(key, [])),
        )

    await reconciler.reconcile(key, snapshot, priority=priority)


# ------------------------------------------------------------------- triggers


# Every event of a ModelDeployment (the initial listing included) wakes a pass: the
# controller is level-based, and a pass with nothing to change writes nothing (the event
# of its own status patch costs one pass that finds nothing to do). Event handlers keep no
# state on the object, so there is nothing for a replica killed mid-handling to leave
# behind: with kopf's on.create/update/resume, whose progress and diff-base annotations
# every replica wrote, a new leader once missed a `promote` annotated while the old leader
# was being SIGKILLed (tests/cluster/test_ha.py).
@kopf.on.event(*_RESOURCE)
async def model_changed(namespace: str | None, name: str, logger: kopf.Logger,
                        **kwargs: Any) -> None:
    await _with_retries(lambda: _reconcile(namespace, name, priority=gate.UPDATE, **kwargs),
                        name, logger)


async def _with_retries(run: Callable[[], Awaitable[None]], name: str,
                        logger: kopf.Logger) -> None:
    """kopf never retries event handlers; a pass that hits a transient API error gets a
    few tries of its own (and the resync loop catches anything beyond that)."""
    for attempt, delay in enumerate((1.0, 2.0, 4.0, 0.0), start=1):
        try:
            await run()
            return
        except Exception as exc:
            if not delay:
                logger.error("reconcile after a change to %s failed %d times: %s",
                             name, attempt, exc)
                return
            logger.warning("reconcile after a change to %s failed (%s); retrying", name, exc)
            await asyncio.sleep(delay)


@kopf.on.event("apps", "v1", "deployments", labels=_MANAGED)
@kopf.on.event("", "v1", "services", labels=_MANAGED)
@kopf.on.event("networking.k8s.io", "v1", "networkpolicies", labels=_MANAGED)
@kopf.on.event("", "v1", "pods", labels=_MANAGED)
async def child_changed(namespace: str | None, name: str, labels: kopf.Labels, type: str,
                        logger: kopf.Logger, **kwargs: Any) -> None:
    if not type:
        return  # the initial listing: the ModelDeployments' own listing covers it
    await _with_retries(lambda: _reconcile(namespace, labels[MODEL_LABEL],
                                           priority=gate.REPORT, **kwargs), name, logger)


@kopf.on.event("batch", "v1", "jobs", labels=_CONVERTING)
@kopf.on.event("", "v1", "pods", labels=_CONVERTING)
async def conversion_changed(namespace: str | None, name: str, labels: kopf.Labels, type: str,
                             logger: kopf.Logger, **kwargs: Any) -> None:
    """A conversion Job (or its pod) changed: the model's pass reads its outcome."""
    if not type:
        return  # the initial listing: the ModelDeployments' own listing covers it
    await _with_retries(lambda: _reconcile(namespace, labels[CONVERT_LABEL],
                                           priority=gate.REPORT, **kwargs), name, logger)


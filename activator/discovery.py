"""Where a model's ready replicas are: looked up in the Kubernetes API (:class:`KubePods`,
the activator's only API calls, in a worker thread), cached per model, polled once per
``poll_s`` per model while requests wait, and the waiting itself (:class:`Discovery`).

When a model has no ready replica the lookup also reads its ModelDeployment: whether it
exists (404 otherwise) and which engine serves it, which decides how long its requests
are held (``hold_s``; see :meth:`.settings.Settings.hold_seconds`)."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from modelyard.contract import MODEL_LABEL
from modelyard.operator import api

from .metrics import Metrics
from .routing import Endpoint, ModelRef, ready_endpoints
from .settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Lookup:
    """What the API said about a model at one moment."""

    ready: list[Endpoint]
    exists: bool = True
    engine: str | None = None  # spec.runtime.engine; read only when none is ready


class PodSource(Protocol):
    async def lookup(self, ref: ModelRef) -> Lookup: ...


def load_api_client() -> Any:
    """The official client, logged in with the pod's ServiceAccount inside a pod, else with
    the kubeconfig (``$KUBECONFIG`` or ``~/.kube/config``)."""
    from kubernetes import client, config

    configuration = client.Configuration()
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config(client_configuration=configuration)
    else:
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG"),
                                client_configuration=configuration)
    return client.ApiClient(configuration)


class KubePods:
    """Lists a model's pods (and, when none is ready, checks its ModelDeployment exists)
    with the official client, in a worker thread."""

    def __init__(self, api_client: Any, check_model_deployment: bool = True,
                 request_timeout_s: float = 5.0) -> None:
        from kubernetes import client

        self._core = client.CoreV1Api(api_client)
        self._custom = client.CustomObjectsApi(api_client)
        self._check = check_model_deployment
        self._timeout = request_timeout_s

    async def lookup(self, ref: ModelRef) -> Lookup:
        return await asyncio.to_thread(self._lookup, ref)

    def _lookup(self, ref: ModelRef) -> Lookup:
        from kubernetes.client.exceptions import ApiException

        response: Any = self._core.list_namespaced_pod(  # raw: urllib3's response
            ref.namespace, label_selector=f"{MODEL_LABEL}={ref.name}",
            _preload_content=False, _request_timeout=self._timeout)
        ready = ready_endpoints(json.loads(response.data)["items"])
        if ready or not self._check:
            return Lookup(ready)
        try:
            body = self._custom.get_namespaced_custom_object(
                api.GROUP, api.VERSION, ref.namespace, api.PLURAL, ref.name,
                _request_timeout=self._timeout)
        except ApiException as error:
            if error.status == 404:
                return Lookup([], exists=False)
            raise
        return Lookup([], engine=engine_of(body))


def engine_of(model_deployment: Any) -> str:
    """``spec.runtime.engine`` of a ModelDeployment's JSON, with the API's default."""
    spec = model_deployment.get("spec") if isinstance(model_deployment, dict) else None
    runtime = (spec or {}).get("runtime") or {}
    return str(runtime.get("engine") or api.Engine.MODELYARD.value)


class NoReadyReplica(Exception):
    """The hold deadline passed with no ready replica."""

    def __init__(self, ref: str, hold_s: float) -> None:
        super().__init__(ref)
        self.hold_s = hold_s


class ModelNotFound(Exception):
    """No ModelDeployment of that name exists."""


class ShuttingDown(Exception):
    """The activator is stopping: held requests are let go (503) rather than cut off."""


@dataclass(eq=False)
class _Model:
    ready: list[Endpoint] = field(default_factory=list)
    exists: bool = True
    fetched: float = -math.inf  # monotonic time of the last successful lookup
    engine: str | None = None  # spec.runtime.engine, once a lookup read it
    waiters: int = 0
    turn: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    poller: asyncio.Task[None] | None = None


class Discovery:
    """The ready endpoints of each model, looked up at most once per ``poll_s`` per model
    and only while someone asks: one poller task per model serves all its requests.

    ``hold_s`` gives the longest wait for a model of an engine (None: not known yet)."""

    MAX_MODELS = 1024

    STALE_FACTOR = 3.0

    def __init__(self, source: PodSource, metrics: Metrics, *, poll_s: float = 0.5,
                 cache_s: float = 1.0,
                 hold_s: Callable[[str | None], float] | None = None) -> None:
        self._source = source
        self._metrics = metrics
        self._poll_s = poll_s
        self._cache_s = cache_s
        # A list older than cache_s still serves while a lookup refreshes it behind the
        # request, up to this age; older, the request waits for the lookup.
        self._stale_s = cache_s * self.STALE_FACTOR
        self._hold_s = hold_s or Settings().hold_seconds
        self._models: dict[ModelRef, _Model] = {}
        self.closing = False

    def fresh(self, ref: ModelRef) -> list[Endpoint] | None:
        """The ready endpoints of ``ref`` when a recent lookup found some: the answer
        :meth:`endpoints` would give at once, without waiting.

        Past ``cache_s`` the list is refreshed in the background (one lookup, shared), and
        this request goes on with it: a busy model's requests never wait on the API. Past
        ``3 x cache_s`` (nobody asked meanwhile) it is not trusted, and None is returned."""
        model = self._models.get(ref)
        if model is None or not model.ready:
            return None
        age = time.monotonic() - model.fetched
        if age > self._stale_s:
            return None
        if age > self._cache_s:
            self._poll(ref, model)
        return model.ready

    async def endpoints(self, ref: ModelRef, since: float) -> tuple[list[Endpoint], bool]:
        """Ready endpoints of ``ref`` (non-empty) and whether the request had to be held.

        Raises :class:`NoReadyReplica` once the request has waited, from ``since``
        (monotonic), the hold its model's engine gets, and :class:`ModelNotFound` when the
        ModelDeployment does not exist."""
        model = self._model(ref)
        if time.monotonic() - model.fetched > self._cache_s:
            # Stale: look again first (shared with every request of this model). A pod
            # gone meanwhile may still be draining and answer, but no longer counts.
            await self._next_lookup(ref, model, since)
        if model.ready:
            return model.ready, False
        if not model.exists:
            raise ModelNotFound(str(ref))
        if model.waiters == 0:
            log.info("holding requests for %s (engine %s) up to %g s for a ready replica",
                     ref, model.engine or "unknown", self._hold_s(model.engine))
        model.waiters += 1
        gauge = self._metrics.waiting.labels(ref.namespace, ref.name)
        gauge.inc()
        try:
            while not model.ready:
                if not model.exists:
                    raise ModelNotFound(str(ref))
                if self.closing:
                    raise ShuttingDown(str(ref))
                await self._next_lookup(ref, model, since)
            return model.ready, True
        finally:
            model.waiters -= 1
            gauge.dec()

    def turn(self, ref: ModelRef) -> int:
        model = self._model(ref)
        model.turn += 1
        return model.turn

    def forget(self, ref: ModelRef, gone: Endpoint) -> None:
        """``gone`` refused a connection: stop sending there until a lookup lists it again."""
        model = self._model(ref)
        model.ready = [e for e in model.ready if e != gone]

    def shut(self) -> None:
        """Stop holding: every held request wakes and gives up."""
        self.closing = True
        for model in self._models.values():
            model.changed.set()
            model.changed = asyncio.Event()

    async def close(self) -> None:
        tasks = [m.poller for m in self._models.values() if m.poller is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _model(self, ref: ModelRef) -> _Model:
        model = self._models.get(ref)
        if model is None:
            if len(self._models) >= self.MAX_MODELS:
                self._prune()
            model = self._models[ref] = _Model()
        return model

    def _prune(self) -> None:
        """Forget idle models (no waiter, no poll running), oldest lookup first."""
        idle = sorted((m.fetched, ref) for ref, m in self._models.items()
                      if m.waiters == 0 and (m.poller is None or m.poller.done()))
        for _, ref in idle[: max(1, len(idle) // 2)]:
            del self._models[ref]

    async def _next_lookup(self, ref: ModelRef, model: _Model, since: float) -> None:
        """Wait for the model's next lookup, or until its hold (from ``since``) is over;
        the hold is read again each time, as a lookup may have learnt the engine."""
        changed = model.changed
        self._poll(ref, model)
        hold_s = self._hold_s(model.engine)
        remaining = since + hold_s - time.monotonic()
        if remaining <= 0:
            raise NoReadyReplica(str(ref), hold_s)
        try:
            await asyncio.wait_for(changed.wait(), remaining)
        except TimeoutError:
            raise NoReadyReplica(str(ref), hold_s) from None

    def _poll(self, ref: ModelRef, model: _Model) -> None:
        if model.poller is None or model.poller.done():
            model.poller = asyncio.create_task(self._poll_loop(ref, model),
                                               name=f"activator-poll-{ref}")

    async def _poll_loop(self, ref: ModelRef, model: _Model) -> None:
        """Look up now, then every ``poll_s`` while requests wait (the sleep comes after
        each lookup, so lookups of one model are never closer than ``poll_s``)."""
        while True:
            try:
                found = await self._source.lookup(ref)
            except Exception as error:  # the API is down or refuses: keep trying
                log.warning("looking up the pods of %s failed: %s", ref, error)
                self._metrics.lookup_errors.inc()
            else:
                model.ready, model.exists = found.ready, found.exists
                model.engine = found.engine or model.engine
                model.fetched = time.monotonic()
                model.changed.set()
                model.changed = asyncio.Event()
            await asyncio.sleep(self._poll_s)
            if model.waiters == 0:
                return

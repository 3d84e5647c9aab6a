"""The operator's own Prometheus metrics, served on ``GET /metrics`` of their own port.

The kopf layer (:mod:`.handlers`) starts the server (:func:`start`) when
``MODELYARD_METRICS_PORT`` is set and hands over a provider of the ModelDeployments'
statuses (:func:`set_models_provider`); the reconciler reports each pass
(:func:`observe_pass`) and each finished rollout (:func:`rollout_finished`); and
:func:`set_leader` gets the function that says whether this replica leads (asked at every
scrape, like the provider).

Two kinds of series:

* the operator's own: ``modelyard_operator_reconcile_total{result}``,
  ``modelyard_operator_reconcile_seconds``, ``modelyard_operator_leader``, plus the
  process (memory, CPU, open files) and Python (GC) collectors;
* one set per ModelDeployment, read from the resources' status at scrape time by
  :class:`ModelsCollector` (never stale, nothing to forget when a resource goes):
  ``modelyard_modeldeployment_{ready,degraded,replicas,ready_replicas,gpus,
  rollout_in_progress}``, ``modelyard_autoscaler_desired_replicas`` and
  ``modelyard_rollouts_total{outcome}``. Only the leading replica exports them, so a sum
  over them counts every resource once however many replicas run.

The per-resource gauges are named ``modelyard_modeldeployment_*`` rather than
``modelyard_model_*`` because the runtime already exports ``modelyard_model_ready{model,
version}``: one name for two meanings would mix in every query and alert.

Everything lives on one :class:`OperatorMetrics` (its own registry, so tests make as many
as they like); the module-level functions act on the process's instance, :data:`METRICS`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Metric,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

__all__ = [
    "METRICS",
    "ModelStatus",
    "ModelsCollector",
    "ModelsProvider",
    "OperatorMetrics",
    "Outcome",
    "Server",
    "observe_pass",
    "rollout_finished",
    "set_leader",
    "set_models_provider",
    "start",
]

log = logging.getLogger(__name__)

# no *_created series: they double the scrape for nothing
disable_created_metrics()  # type: ignore[no-untyped-call]

Outcome = Literal["promoted", "rolled_back"]
OUTCOMES: tuple[Outcome, ...] = ("promoted", "rolled_back")
ModelStatus = tuple[str, str, Mapping[str, Any]]  # (namespace, name, status as stored)
ModelsProvider = Callable[[], Iterable[ModelStatus]]

# A pass is an in-memory diff and, at most, a few API writes: milliseconds to seconds.
_PASS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                 10.0, 30.0)
_KEY_LABELS = ["namespace", "name"]


def _no_models() -> Iterable[ModelStatus]:
    return ()


@dataclass
class _Shared:
    """What the collector reads and the reconciler writes, from different threads."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    leading: Callable[[], bool] = lambda: False
    provider: ModelsProvider = _no_models
    rollouts: dict[tuple[str, str, Outcome], int] = field(default_factory=dict)


class ModelsCollector(Collector):
    """The per-ModelDeployment series, derived from each resource's status when scraped."""

    def __init__(self, shared: _Shared) -> None:
        self._shared = shared

    def collect(self) -> Iterator[Metric]:
        with self._shared.lock:
            is_leading, provider = self._shared.leading, self._shared.provider
        leading = _safely(is_leading)
        ready = GaugeMetricFamily(
            "modelyard_modeldeployment_ready",
            "1 when the ModelDeployment's Ready condition is True; reason is the condition's "
            "(ScaledToZero: not ready on purpose)", labels=[*_KEY_LABELS, "reason"])
        degraded = GaugeMetricFamily(
            "modelyard_modeldeployment_degraded",
            "1 when the ModelDeployment's Degraded condition is True; reason says why",
            labels=[*_KEY_LABELS, "reason"])
        replicas = GaugeMetricFamily(
            "modelyard_modeldeployment_replicas", "Runtime pods that exist (status.replicas)",
            labels=_KEY_LABELS)
        ready_replicas = GaugeMetricFamily(
            "modelyard_modeldeployment_ready_replicas",
            "Runtime pods ready to serve (status.readyReplicas)", labels=_KEY_LABELS)
        gpus = GaugeMetricFamily(
            "modelyard_modeldeployment_gpus",
            "GPUs requested by the model's scheduled pods (status.gpus)", labels=_KEY_LABELS)
        rolling = GaugeMetricFamily(
            "modelyard_modeldeployment_rollout_in_progress",
            "1 while a new version is being rolled out (Canary, BlueGreen or RollingUpdate)",
            labels=[*_KEY_LABELS, "strategy"])
        desired = GaugeMetricFamily(
            "modelyard_autoscaler_desired_replicas",
            "Total replicas the autoscaler wants now (status.autoscaler.desiredReplicas)",
            labels=_KEY_LABELS)
        rollouts = CounterMetricFamily(
            "modelyard_rollouts_total",
            "Rollouts finished by this operator replica since it started, by outcome",
            labels=[*_KEY_LABELS, "outcome"])
        families = [ready, degraded, replicas, ready_replicas, gpus, rolling, desired, rollouts]
        if not leading:
            yield from families  # a stand-by's view would only duplicate the leader's
            return
        try:
            models = list(provider())
        except Exception:  # a scrape must answer; the operator's own series still help
            log.exception("reading the ModelDeployments for /metrics failed")
            yield from families
            return
        with self._shared.lock:
            # Forget the counts of resources that are gone.
            seen = {(ns, name) for ns, name, _ in models}
            for gone in [k for k in self._shared.rollouts if k[:2] not in seen]:
                del self._shared.rollouts[gone]
            counts = dict(self._shared.rollouts)
        for namespace, name, status in sorted(models, key=lambda m: m[:2]):
            key = [namespace, name]
            is_ready, ready_reason = _condition(status, "Ready")
            is_degraded, degraded_reason = _condition(status, "Degraded")
            ready.add_metric([*key, ready_reason], float(is_ready))
            degraded.add_metric([*key, degraded_reason], float(is_degraded))
            replicas.add_metric(key, _number(status.get("replicas")))
            ready_replicas.add_metric(key, _number(status.get("readyReplicas")))
            gpus.add_metric(key, _number(status.get("gpus")))
            in_progress, strategy = _rollout(status)
            rolling.add_metric([*key, strategy], float(in_progress))
            autoscaler = status.get("autoscaler")
            if isinstance(autoscaler, Mapping) and "desiredReplicas" in autoscaler:
                desired.add_metric(key, _number(autoscaler["desiredReplicas"]))
            # Every outcome from the start, at 0: increase() sees the first rollback too.
            for outcome in OUTCOMES:
                rollouts.add_metric([*key, outcome], counts.get((namespace, name, outcome), 0))
        yield from families


class OperatorMetrics:
    """Every metric of one operator process, on a registry of its own."""

    def __init__(self, *, process: bool = True) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._shared = _Shared()
        self.reconcile_total = Counter(
            "modelyard_operator_reconcile", "Reconcile passes, by result (ok or error)",
            ["result"], registry=self.registry)
        for result in ("ok", "error"):
            self.reconcile_total.labels(result)  # both series exist from the start
        self.reconcile_seconds = Histogram(
            "modelyard_operator_reconcile_seconds", "Time one reconcile pass took",
            buckets=_PASS_BUCKETS, registry=self.registry)
        self.leader = Gauge(
            "modelyard_operator_leader", "1 when this operator replica leads (and acts)",
            registry=self.registry)
        self.leader.set_function(lambda: float(_safely(self._shared.leading)))
        self.registry.register(ModelsCollector(self._shared))
        if process:
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
            GCCollector(registry=self.registry)

    def observe_pass(self, seconds: float, ok: bool) -> None:
        """One reconcile pass ended (``ok``: without raising) after ``seconds``."""
        self.reconcile_total.labels("ok" if ok else "error").inc()
        self.reconcile_seconds.observe(seconds)

    def rollout_finished(self, namespace: str, name: str, outcome: Outcome) -> None:
        """A rollout ended: its version became Stable (promoted) or was rolled back."""
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}, not {outcome!r}")
        with self._shared.lock:
            key = (namespace, name, outcome)
            self._shared.rollouts[key] = self._shared.rollouts.get(key, 0) + 1

    def set_leader(self, leading: bool | Callable[[], bool]) -> None:
        """This replica now leads (True) or stands by (False); or, better, a function that
        says so, asked at every scrape (``Reconciler.leading``): nothing to keep in step."""
        probe = leading if callable(leading) else (lambda: leading)
        with self._shared.lock:
            self._shared.leading = probe

    def set_models_provider(self, provider: ModelsProvider) -> None:
        """``provider()`` yields ``(namespace, name, status)`` for every ModelDeployment; it
        is called on each scrape, from the HTTP server's thread."""
        with self._shared.lock:
            self._shared.provider = provider

    def start(self, port: int, host: str = "0.0.0.0") -> Server:
        """Serve ``/metrics`` on ``host:port`` (port 0: any free port) from a daemon thread."""
        httpd, thread = start_http_server(port, host, registry=self.registry)
        return Server(httpd, thread)


@dataclass
class Server:
    """A running metrics endpoint."""

    httpd: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


def _condition(status: Mapping[str, Any], kind: str) -> tuple[bool, str]:
    """(is it True, its reason) for the condition ``kind``; (False, "Unknown") before the
    operator has written one."""
    for cond in status.get("conditions") or []:
        if isinstance(cond, Mapping) and cond.get("type") == kind:
            return cond.get("status") == "True", str(cond.get("reason") or "Unknown")
    return False, "Unknown"


def _rollout(status: Mapping[str, Any]) -> tuple[bool, str]:
    """(a rollout is in progress, its strategy). A canary or blue-green preview says so in
    ``status.canary``; otherwise a new version rolls out as a RollingUpdate while Progressing
    is True and a stable version other than the target still serves. The very first
    version of a resource (no stable version yet) is no rollout."""
    canary = status.get("canary")
    if isinstance(canary, Mapping) and canary:
        return True, str(canary.get("strategy") or "Canary")
    progressing, _ = _condition(status, "Progressing")
    stable, target = status.get("stableVersion"), status.get("targetVersion")
    if progressing and stable and target and stable != target:
        return True, "RollingUpdate"
    return False, ""


def _safely(probe: Callable[[], bool]) -> bool:
    try:
        return bool(probe())
    except Exception:
        log.exception("asking whether this replica leads failed")
        return False


def _number(value: Any) -> float:
    try:
        return float(value or 0)
    except (TypeError, ValueError):
        return 0.0


# ---------------------------------------------------------- the process's metrics

METRICS = OperatorMetrics()


def observe_pass(seconds: float, ok: bool) -> None:
    METRICS.observe_pass(seconds, ok)


def rollout_finished(namespace: str, name: str, outcome: Outcome) -> None:
    METRICS.rollout_finished(namespace, name, outcome)


def set_leader(leading: bool | Callable[[], bool]) -> None:
    METRICS.set_leader(leading)


def set_models_provider(provider: ModelsProvider) -> None:
    METRICS.set_models_provider(provider)


def start(port: int, host: str = "0.0.0.0") -> Server:
    return METRICS.start(port, host)

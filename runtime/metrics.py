"""Prometheus metrics of one runtime process, labelled by model and version.

Created by ``server.py`` (one :class:`RuntimeMetrics` per app, on its own
registry, so tests can run several apps in one process) and exposed on
``GET /metrics``. The operator's autoscaler reads ``modelyard_inflight_requests``
and ``modelyard_queue_depth``; rollout analysis reads the request counter and
the latency histogram. ``modelyard_rejected_requests_total{reason}`` counts the
requests shed before the model ran (a full queue, a passed deadline, a client gone).
Explanations (``explain.py``) have their own counter by outcome and their own latency
histogram, so they never weigh on the inference latency that analysis and scaling read.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from modelyard import contract

__all__ = ["CONTENT_TYPE", "EXPLAIN_OUTCOMES", "RuntimeMetrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# no *_created series: they double the scrape for nothing
disable_created_metrics()  # type: ignore[no-untyped-call]

_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_EXPLAIN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
#: how an explain request ended: answered, a bad request (4xx), explanations off for the
#: model (404), refused at the bound or before the model is ready (503), failed (5xx)
EXPLAIN_OUTCOMES = ("ok", "invalid", "off", "overloaded", "failed")


class _GpuCollector(Collector):
    """GPU memory and utilisation, read at scrape time (only registered with CUDA)."""

    def __init__(self, labels: dict[str, str]) -> None:
        self._labels = labels

    def collect(self) -> Iterator[GaugeMetricFamily]:
        import torch

        names = list(self._labels)
        values = list(self._labels.values())
        memory = GaugeMetricFamily(
            contract.GPU_MEMORY, "GPU memory allocated by this process",
            labels=[*names, "device"],
        )
        reserved = GaugeMetricFamily(
            contract.GPU_MEMORY_RESERVED, "GPU memory reserved by the allocator",
            labels=[*names, "device"],
        )
        utilisation = GaugeMetricFamily(
            contract.GPU_UTILIZATION, "GPU utilisation over the last sample period",
            labels=[*names, "device"],
        )
        for index in range(torch.cuda.device_count()):
            device = str(index)
            memory.add_metric([*values, device], float(torch.cuda.memory_allocated(index)))
            reserved.add_metric([*values, device], float(torch.cuda.memory_reserved(index)))
            with contextlib.suppress(Exception):  # no NVML in the image: leave it out
                utilisation.add_metric([*values, device], torch.cuda.utilization(index) / 100.0)
        yield memory
        yield reserved
        yield utilisation


class RuntimeMetrics:
    """The runtime's metrics on a private registry."""

    def __init__(self, model: str, version: str, *, gpu: bool = False) -> None:
        self.registry = CollectorRegistry()
        self.labels = {"model": model, "version": version}
        names = ["model", "version"]
        self.requests = Counter(
            contract.REQUESTS, "Inference requests answered, by protocol and HTTP code",
            [*names, "protocol", "code"], registry=self.registry,
        )
        self.latency = Histogram(
            contract.REQUEST_DURATION, "Inference request latency, body read to reply",
            [*names, "protocol"], buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.inflight = Gauge(
            contract.INFLIGHT, "Inference requests being handled",
            names, registry=self.registry,
        ).labels(model, version)
        self.queue_depth = Gauge(
            contract.QUEUE_DEPTH, "Items waiting for a batch",
            names, registry=self.registry,
        ).labels(model, version)
        rejected = Counter(
            contract.REJECTED, "Inference requests shed before the model ran, by reason "
            "(queue_full, queue_wait, deadline, disconnected)",
            [*names, "reason"], registry=self.registry,
        )
        self._rejected = {reason: rejected.labels(model, version, reason)
                          for reason in ("queue_full", "queue_wait", "deadline", "disconnected")}
        self.batch_size = Histogram(
            contract.BATCH_SIZE, "Items per forward pass",
            names, buckets=_BATCH_BUCKETS, registry=self.registry,
        ).labels(model, version)
        self.inference = Histogram(
            contract.INFERENCE_DURATION, "Forward pass time per batch",
            names, buckets=_LATENCY_BUCKETS, registry=self.registry,
        ).labels(model, version)
        self.load_seconds = Gauge(
            contract.MODEL_LOAD, "Time to fetch, load and warm up the model",
            names, registry=self.registry,
        ).labels(model, version)
        self.ready = Gauge(
            contract.MODEL_READY, "1 when the model answers inferences",
            names, registry=self.registry,
        ).labels(model, version)
        explanations = Counter(
            contract.EXPLANATIONS, "Explain requests answered, by outcome "
            "(" + ", ".join(EXPLAIN_OUTCOMES) + ")", [*names, "outcome"], registry=self.registry,
        )
        self._explanations = {outcome: explanations.labels(model, version, outcome)
                              for outcome in EXPLAIN_OUTCOMES}
        self.explain_duration = Histogram(
            contract.EXPLAIN_DURATION, "Time to compute one explanation answered (200)",
            names, buckets=_EXPLAIN_BUCKETS, registry=self.registry,
        ).labels(model, version)
        self._per_outcome: dict[tuple[str, int], tuple[Counter, Histogram]] = {}
        if gpu:
            self.registry.register(_GpuCollector(self.labels))

    def track_queue(self, depth: Callable[[], float]) -> None:
        self.queue_depth.set_function(depth)

    def observe_batch(self, items: int, seconds: float) -> None:
        self.batch_size.observe(items)
        self.inference.observe(seconds)

    def observe_shed(self, reason: str) -> None:
        self._rejected[reason].inc()

    def observe_explain(self, outcome: str) -> None:
        """One explain request answered (its computing time: ``explain_duration``)."""
        self._explanations[outcome].inc()

    def observe_request(self, protocol: str, code: int, seconds: float) -> None:
        children = self._per_outcome.get((protocol, code))
        if children is None:  # labels() takes a lock and builds a key: once per outcome
            model, version = self.labels["model"], self.labels["version"]
            children = (self.requests.labels(model, version, protocol, str(code)),
                        self.latency.labels(model, version, protocol))
            self._per_outcome[(protocol, code)] = children
        children[0].inc()
        children[1].observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)

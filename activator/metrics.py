"""The activator's own Prometheus metrics, in their own registry, served on the admin
port's ``/metrics``. ``modelyard_activator_waiting_requests`` is the operator's wake signal
(:mod:`modelyard.operator.activation` reads it)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

from modelyard import contract

WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                120.0, 300.0, 600.0)


class Metrics:
    """The activator's own Prometheus metrics, in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ("namespace", "model_deployment")
        self.waiting = Gauge(
            contract.ACTIVATOR_WAITING,
            "Requests held right now because the model has no ready replica.",
            labels, registry=self.registry)
        self.requests = Counter(
            "modelyard_activator_requests",
            "Requests for a known model by outcome: forwarded (an answer came back, whatever "
            "its status), timeout (503 after the wait), shutdown (503: held when the "
            "activator stopped), error (502: the pod failed it), abandoned (the client "
            "left before the pod's answer began).",
            (*labels, "outcome"), registry=self.registry)
        self.held = Counter(
            "modelyard_activator_held_requests",
            "Requests that found no ready replica and were held (cold starts).",
            labels, registry=self.registry)
        self.wait = Histogram(
            "modelyard_activator_wait_seconds",
            "Time from arrival (body read) until forwarded or timed out; 0-ish when a "
            "replica was ready.", labels, buckets=WAIT_BUCKETS, registry=self.registry)
        self.lookup_errors = Counter(
            "modelyard_activator_lookup_errors",
            "Failed lookups of a model's pods in the Kubernetes API.", registry=self.registry)
        self.rejected = Counter(
            "modelyard_activator_rejected_requests",
            "Requests answered without forwarding: Host names no Service (unknown_host), "
            "no such ModelDeployment (not_found), body too large (too_large).",
            ("reason",), registry=self.registry)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

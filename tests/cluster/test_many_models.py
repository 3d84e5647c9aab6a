"""Many ModelDeployments at once (issue #16): the operator's passes run their API calls in
many threads at the same time, and none of them may fail for it.

The operator's client calls block, so every pass runs them through ``asyncio.to_thread``;
a first reconcile of hundreds of resources puts a handful of threads in the same client
at once. Its shared state must take that: the dynamic client's discovery cache did not
(``KeyError: 'resources'``), and each such failure cost a kopf retry 60 s later.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import yaml
from support import Kube, wait_for

MODELS = 150  # first reconciles at once; ~1 min on two shared cores
THREADS = 16
ROUNDS = 5
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


class Failures(logging.Handler):
    """The operator's log, as a user reads it: kopf's handler failures ("Handler ...
    failed with an exception and will try again in 60 seconds") and anything else logged
    as an error, and our own warnings that something could not be checked.

    Left out: kopf's own API client retrying a request it will repeat by itself (its
    first watch of a just-installed CRD may meet "storage is (re)initializing")."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.name.startswith("kopf._cogs.clients") and "will retry" in message:
            return
        if record.levelno >= logging.ERROR or "could not" in message:
            self.records.append(record)

    def lines(self) -> list[str]:
        return [f"{r.name} {r.levelname} {r.getMessage()} {r.exc_info[1] if r.exc_info else ''!r}"
                for r in self.records]


@pytest.fixture
def failures() -> Iterator[Failures]:
    handler = Failures()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)


def models(count: int) -> str:
    """One-replica CPU models that may also land on the GPU nodes (one node holds only
    110 pods)."""
    return yaml.safe_dump_all({
        "apiVersion": "modelyard.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": f"m{i:04d}"},
        "spec": {
            "model": {"version": "1", "uri": f"file:///models/m{i:04d}/1/model.pt"},
            "resources": {"gpu": {"count": 0}},
            "scheduling": {"tolerations": [GPU_TOLERATION]},
            "replicas": 1,
        },
    } for i in range(count))


def not_ready(kube: Kube) -> list[str]:
    """Names of the ModelDeployments not (yet) Ready at their current generation."""
    waiting = []
    for md in kube.get("md") or []:
        status = md.get("status") or {}
        ready = any(c["type"] == "Ready" and c["status"] == "True"
                    for c in status.get("conditions") or [])
        if not ready or status.get("observedGeneration") != md["metadata"]["generation"]:
            waiting.append(md["metadata"]["name"])
    return waiting


def test_many_first_reconciles_at_once_all_ready_without_a_handler_failure(
        kube: Kube, operator_identity: str, failures: Failures) -> None:
    from modelyard.operator.runner import OperatorThread

    with OperatorThread():
        # One apply of them all, as a user would; it may take a while on a busy machine.
        kube.cluster.kubectl("-n", kube.namespace, "apply", "-f", "-", input=models(MODELS),
                             timeout=600)
        assert len(kube.get("md")) == MODELS
        wait_for(lambda: not not_ready(kube), timeout=600, interval=2,
                 what=f"all {MODELS} Ready")
    assert failures.lines() == []
    assert len(kube.get("deployments")) == MODELS


def service(namespace: str, name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": namespace,
                     "labels": {"app.kubernetes.io/managed-by": "modelyard-test"}},
        "spec": {"selector": {"app": name}, "ports": [{"port": 8080, "name": "http"}]},
    }


def test_one_writer_serves_many_threads_at_once(kube: Kube, operator_identity: str) -> None:
    """The Writer of one operator, hit by many threads at once the moment it is created
    (when a client's caches are cold): every apply, check and delete succeeds."""
    from modelyard.operator.kube import Writer, load_api_client

    errors: list[BaseException] = []
    for attempt in range(ROUNDS):
        writer = Writer(load_api_client())
        start = threading.Barrier(THREADS)

        def one(i: int, attempt: int = attempt, writer: Writer = writer,
                start: threading.Barrier = start) -> None:
            name = f"s{attempt}-{i}"
            start.wait()
            assert writer.has_httproute() is False  # this cluster has no Gateway API
            applied = writer.apply(service(kube.namespace, name))
            assert applied["metadata"]["name"] == name
            assert applied["spec"]["selector"] == {"app": name}
            writer.delete("v1", "Service", kube.namespace, name)
            writer.delete("v1", "Service", kube.namespace, name)  # gone already: done

        with ThreadPoolExecutor(THREADS) as pool:
            futures = [pool.submit(one, i) for i in range(THREADS)]
        errors += [e for e in (f.exception() for f in futures) if e is not None]
    assert errors == []
    assert kube.get("services", selector="app.kubernetes.io/managed-by=modelyard-test") == []

"""Benchmark helpers on the local cluster: kubectl as a user types it, watches that stamp
every change the API server reports, and a paced load to a model's ready endpoints.

Called by ``bench/autoscale.py``. The approach is that of ``tests/support.py`` and
``tests/cluster/test_autoscaling.py`` (the cluster chores themselves are
``LocalCluster`` methods shared by both), kept here because the benchmarks never import the
tests. Timings come from watches (``kubectl get -w``), not from polling, so a
change is stamped within milliseconds of the API server storing it.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np

from modelyard.operator.devcluster import LocalCluster
from modelyard.runtime.client import encode_request

T = TypeVar("T")
Fields = Callable[[dict[str, Any]], tuple[str, ...]]
ROOT = Path(__file__).resolve().parent.parent
CRD_PATH = ROOT / "crds" / "modeldeployments.modelyard.dev.yaml"


def install_crd(cluster: LocalCluster) -> None:
    cluster.install_crd(CRD_PATH.read_text())


def fresh_namespace(cluster: LocalCluster, prefix: str) -> contextlib.AbstractContextManager[str]:
    return cluster.fresh_namespace(prefix)


def as_operator(cluster: LocalCluster) -> contextlib.AbstractContextManager[str]:
    """In-process operators started inside this block use the operator's own user."""
    return cluster.as_operator()


def wait_for(check: Callable[[], T], timeout: float, what: str, interval: float = 0.1) -> T:
    """Poll ``check`` until it returns something truthy (a deadline, not a measurement)."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise TimeoutError(f"no {what} after {timeout:.0f} s (last: {last!r})")


@dataclass
class Kube:
    cluster: LocalCluster
    namespace: str

    def run(self, *args: str, input: str | None = None) -> str:
        return self.cluster.kubectl("-n", self.namespace, *args, input=input).stdout

    def apply(self, manifest: str) -> None:
        self.run("apply", "-f", "-", input=manifest)

    def watch(self, kind: str, fields: Fields, *, name: str | None = None,
              selector: str | None = None) -> Watch:
        """A started :class:`Watch` of ``kind`` that keeps ``fields(object)`` of each
        version of each object."""
        args = [str(self.cluster.binaries.path("kubectl")),
                f"--kubeconfig={self.cluster.kubeconfig}", "-n", self.namespace, "get", kind]
        if name:  # a field selector, not a name: the object may not exist yet
            args.append(f"--field-selector=metadata.name={name}")
        if selector:
            args += ["-l", selector]
        args += ["--watch", "--output-watch-events", "-o", "json"]
        watch = Watch(args, fields)
        watch.start()
        return watch


@dataclass(frozen=True)
class Event:
    time: float  # time.monotonic() when the line arrived
    kind: str  # ADDED | MODIFIED | DELETED
    name: str
    fields: tuple[str, ...]


class Watch(threading.Thread):
    """``kubectl get --watch``: every change of every object, stamped on arrival.

    :meth:`first` replays the events and says when a condition on the objects (name ->
    fields, deleted ones left out) first held after a given time."""

    def __init__(self, argv: list[str], fields: Fields):
        super().__init__(daemon=True)
        self.fields = fields
        self.events: list[Event] = []
        self._lock = threading.Lock()
        self.stderr = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed by stop()
        self._process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self.stderr,
                                         text=True, bufsize=1)

    def run(self) -> None:
        assert self._process.stdout is not None
        decoder = json.JSONDecoder()
        buffer = ""
        for line in self._process.stdout:  # JSON events, pretty or not
            buffer += line
            try:
                event, end = decoder.raw_decode(buffer.lstrip())
            except json.JSONDecodeError:
                continue
            stamp = time.monotonic()
            buffer = buffer.lstrip()[end:]
            obj = event.get("object") or {}
            name = (obj.get("metadata") or {}).get("name", "")
            with self._lock:
                self.events.append(Event(stamp, event.get("type", ""), name, self.fields(obj)))

    def stop(self) -> None:
        self._process.terminate()
        self._process.wait(10)
        self.join(10)
        self.stderr.close()

    def errors(self) -> str:
        """What kubectl said on stderr (a watch that stopped early says why here)."""
        self.stderr.seek(0)
        return str(self.stderr.read())[-500:]

    def state(self, at: float | None = None) -> dict[str, tuple[str, ...]]:
        """The objects as last reported at ``at`` (now by default)."""
        objects: dict[str, tuple[str, ...]] = {}
        for event in self._snapshot():
            if at is not None and event.time > at:
                break
            _apply(objects, event)
        return objects

    def first(self, after: float,
              holds: Callable[[dict[str, tuple[str, ...]]], bool]) -> float | None:
        """When ``holds(objects)`` first became true at or after ``after``."""
        objects: dict[str, tuple[str, ...]] = {}
        for event in self._snapshot():
            _apply(objects, event)
            if event.time >= after and holds(objects):
                return event.time
        return None

    def _snapshot(self) -> list[Event]:
        with self._lock:
            return list(self.events)


def _apply(objects: dict[str, tuple[str, ...]], event: Event) -> None:
    if event.kind == "DELETED":
        objects.pop(event.name, None)
    else:
        objects[event.name] = event.fields


def pod_fields(pod: dict[str, Any]) -> tuple[str, ...]:
    """(node, phase, Ready status, deletionTimestamp) of a pod."""
    status = pod.get("status") or {}
    ready = next((c.get("status", "") for c in status.get("conditions") or []
                  if c.get("type") == "Ready"), "")
    return ((pod.get("spec") or {}).get("nodeName", ""), status.get("phase", ""), ready,
            (pod.get("metadata") or {}).get("deletionTimestamp", ""))


def slice_fields(piece: dict[str, Any]) -> tuple[str, ...]:
    """(port, "ip=true,ip=false,...") of an EndpointSlice."""
    ports = piece.get("ports") or [{}]
    endpoints = ",".join(
        f"{address}={str((e.get('conditions') or {}).get('ready')).lower()}"
        for e in piece.get("endpoints") or [] for address in e.get("addresses") or [])
    return str(ports[0].get("port") or ""), endpoints


def path_fields(*path: str) -> Fields:
    """The value at ``path`` (e.g. "status", "autoscaler", "desiredReplicas"), "" if absent."""
    def read(obj: dict[str, Any]) -> tuple[str, ...]:
        value: Any = obj
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        return ("" if value is None else str(value),)
    return read


def ready_pods(pods: dict[str, tuple[str, ...]]) -> set[str]:
    """Names of the pods (watched with :func:`pod_fields`) Ready and not terminating."""
    return {name for name, (_, _, ready, deleting) in pods.items()
            if ready == "True" and not deleting}


def serving(slices: dict[str, tuple[str, ...]]) -> list[str]:
    """``ip:port`` of the ready endpoints (EndpointSlices watched with
    :func:`slice_fields`): where kube-proxy would send the Service's traffic."""
    out: set[str] = set()
    for port, endpoints in slices.values():
        for entry in filter(None, endpoints.split(",")):
            address, _, ready = entry.partition("=")
            if ready == "true":
                out.add(f"{address}:{port or 8080}")
    return sorted(out)


def inference_body(size: int) -> tuple[bytes, dict[str, str]]:
    """One binary-tensor request for the benchmark model (1x3xSIZExSIZE)."""
    return encode_request({"input": np.zeros((1, 3, size, size), dtype=np.float32)})


class PacedLoad(threading.Thread):
    """Open loop: ``rate`` requests a second (changeable while it runs), round robin over
    the ready endpoints that ``targets()`` returns, as kube-proxy would spread them."""

    def __init__(self, targets: Callable[[], list[str]], model: str, size: int):
        super().__init__(daemon=True)
        self.targets, self.model = targets, model
        self.body, self.headers = inference_body(size)
        self.rate = 0.0
        self.ok = self.failed = 0
        self.stop = threading.Event()
        self._count = threading.Lock()

    def run(self) -> None:
        turn = itertools.count()
        targets: list[str] = []
        refreshed = 0.0
        with httpx.Client(timeout=30) as http, ThreadPoolExecutor(32) as pool:
            next_at = time.monotonic()
            while not self.stop.is_set():
                if time.monotonic() - refreshed > 0.2:
                    targets, refreshed = self.targets(), time.monotonic()
                if self.rate > 0 and targets:
                    address = targets[next(turn) % len(targets)]
                    pool.submit(self._one, http, address)
                next_at = max(next_at + (1 / self.rate if self.rate > 0 else 0.1),
                              time.monotonic() - 1.0)  # never a burst to catch up
                self.stop.wait(max(0.0, next_at - time.monotonic()))

    def _one(self, http: httpx.Client, address: str) -> None:
        try:
            response = http.post(f"http://{address}/v2/models/{self.model}/infer",
                                 content=self.body, headers=self.headers)
            ok = response.status_code == 200
        except httpx.HTTPError:
            ok = False
        with self._count:
            if ok:
                self.ok += 1
            else:
                self.failed += 1


def metric_samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Prometheus exposition text as {(name, labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def dump(data: Any) -> str:
    return json.dumps(data, indent=1, default=str)

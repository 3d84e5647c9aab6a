"""A real Prometheus discovers runtime pods through the local API server, and the Prometheus
metrics source (``promql``) reports what the pods themselves say.

Runtime pods are real runtime processes (``real_pods``) of a Deployment rendered by the
operator's own ``render_deployment`` (labels, port and probes exactly as the operator
writes them) without its owner reference, so no operator needs to run. Their model fails
on some inputs with a 500. Traffic is sequential, so each request is its own batch and
the client knows exactly which ones failed.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from support import Kube, fresh_namespace, wait_for

from modelyard.operator import analysis, api, promql, render
from modelyard.operator.devcluster import ClusterConfig, LocalCluster, NodePool
from modelyard.operator.devcluster.pods import PodProcesses
from modelyard.operator.devcluster.prometheus import (
    LocalPrometheus,
    PrometheusConfig,
    StaticTargets,
)
from modelyard.runtime.client import Client, InferenceServerError

NAME = "flaky"
VERSION = "1"


class _Flaky(torch.nn.Module):
    """Doubles its input; fails on inputs summing below zero (warm-up sends zeros)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x.sum() < 0):
            raise RuntimeError("negative input")
        return x * 2


def _save_flaky(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}],
                "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1, 4]}]}
    torch.jit.save(torch.jit.script(_Flaky()), str(path),
                   _extra_files={"modelyard.json": json.dumps(metadata)})


def _deployment(namespace: str) -> str:
    spec = api.ModelDeploymentSpec.model_validate({
        "model": {"version": VERSION, "uri": f"file:///models/{NAME}/{VERSION}/model.pt"},
        "resources": {"gpu": {"count": 1}}, "replicas": 2,
    })
    deployment = render.render_deployment(render.Owner(NAME, namespace, "unused"), spec, 2)
    del deployment["metadata"]["ownerReferences"]  # no ModelDeployment: the GC would delete it
    # JSON: PyYAML leaves a spec hash like 1234e56789012345 unquoted, a number to kubectl
    return json.dumps(deployment)


_BYSTANDER = """\
apiVersion: v1
kind: Pod
metadata: {name: bystander, labels: {app: other}}
spec:
  tolerations: [{operator: Exists}]
  containers:
  - {name: web, image: nginx, ports: [{name: http, containerPort: 8080}]}
"""


@dataclass
class Source:
    """A Prometheus and the version to ask it about."""

    url: str
    ref: promql.VersionRef

    def client(self) -> promql.Prometheus:
        return promql.Prometheus(self.url)


@dataclass
class Setup:
    kube: Kube
    prometheus: LocalPrometheus
    pods: dict[str, str]  # pod name -> IP

    @property
    def source(self) -> Source:
        return Source(self.prometheus.url, promql.VersionRef(self.kube.namespace, NAME, VERSION))


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    pools = (NodePool("gpu-h100", count=1, gpus=8, gpu_product="NVIDIA-H100-80GB-HBM3"),)
    state = tmp_path_factory.mktemp("prom")
    models = state / "models"
    _save_flaky(models / NAME / VERSION / "model.pt")
    with LocalCluster(ClusterConfig(topology=pools, real_pods=True)) as cluster:
        pods = PodProcesses(cluster, models_dir=models, log_dir=state / "pods", max_backoff_s=2)
        pods.start()
        try:
            with fresh_namespace(cluster, "prom") as namespace, \
                    LocalPrometheus(cluster, config=PrometheusConfig(scrape_interval_s=1)) as prom:
                kube = Kube(cluster, namespace)
                kube.apply(_deployment(namespace))
                kube.apply(_BYSTANDER)
                ready = wait_for(lambda: _ready_pods(kube), timeout=180, what="2 ready pods")
                yield Setup(kube, prom, ready)
        finally:
            pods.stop()


def _ready_pods(kube: Kube) -> dict[str, str] | None:
    found = kube.get("pods", selector=f"{render.MODEL_LABEL}={NAME}") or []
    ready = {p["metadata"]["name"]: p["status"]["podIP"] for p in found
             if any(c["type"] == "Ready" and c["status"] == "True"
                    for c in p["status"].get("conditions", []))}
    return ready if len(ready) == 2 else None


def _infer(ip: str, value: float) -> bool:
    """One request; True when answered, False on the model's 500."""
    with Client(f"http://{ip}:8080", NAME, timeout=30) as client:
        try:
            client.infer({"input": np.full((1, 4), value, dtype=np.float32)})
        except InferenceServerError as error:
            if error.status != 500:
                raise
            return False
    return True


def _drive(ips: list[str], requests: int) -> tuple[int, int]:
    """Sequential requests over ``ips``; every fourth one fails. Returns (ok, failed)."""
    ok = failed = 0
    for i in range(requests):
        if _infer(ips[i % len(ips)], -1.0 if i % 4 == 3 else 1.0):
            ok += 1
        else:
            failed += 1
    return ok, failed


def _direct(ips: list[str]) -> analysis.Counts:
    """What the pods' own /metrics say, added up (the ``pods`` source)."""
    texts = []
    for ip in ips:
        with urllib.request.urlopen(f"http://{ip}:8080/metrics", timeout=10) as reply:
            texts.append(reply.read().decode())
    return analysis.total(analysis.parse_metrics(t) for t in texts)


def _query(source: Source, expr: str) -> dict[str, Any]:
    async def run() -> dict[str, Any]:
        async with source.client() as prom:
            return await prom.query(expr, time.time())
    return asyncio.run(run())


def _scraped_after(source: Source, moment: float) -> float:
    """Wait until Prometheus scraped every runtime pod after ``moment``; the last scrape time."""
    sel = f'{{namespace="{source.ref.namespace}",model_deployment="{source.ref.name}"}}'

    def stamps() -> list[float] | None:
        result = _query(source, f"timestamp(up{sel})")["result"]
        found = [float(r["value"][1]) for r in result]
        return found if len(found) == 2 and min(found) > moment else None

    found: list[float] = wait_for(stamps, timeout=60, what=f"a scrape of both pods after {moment}")
    return max(found)


def _load(source: Source, **kwargs: Any) -> promql.Load:
    async def run() -> promql.Load:
        async with source.client() as prom:
            return await prom.load(source.ref, **kwargs)
    return asyncio.run(run())


def test_prometheus_discovers_the_runtime_pods_with_their_labels(setup: Setup) -> None:
    def runtime_targets() -> list[dict[str, Any]] | None:
        found = [t for t in setup.prometheus.targets()
                 if t["labels"].get("namespace") == setup.kube.namespace
                 and t["health"] == "up"]
        return found if len(found) == 2 else None

    targets = wait_for(runtime_targets, timeout=60, what="2 healthy targets")
    by_pod = {t["labels"]["pod"]: t for t in targets}
    assert set(by_pod) == set(setup.pods)
    for pod, target in by_pod.items():
        labels = target["labels"]
        assert labels["model_deployment"] == NAME
        assert labels["version"] == VERSION
        assert target["scrapeUrl"] == f"http://{setup.pods[pod]}:8080/metrics"
    # The bystander runs with a port named http too, but is no runtime pod: discovered, dropped.
    with urllib.request.urlopen(f"{setup.prometheus.url}/api/v1/targets?state=dropped",
                                timeout=5) as reply:
        dropped = json.load(reply)["data"]["droppedTargets"]
    assert any(t["discoveredLabels"].get("__meta_kubernetes_pod_name") == "bystander"
               for t in dropped)
    # The runtime's own version label is not doubled as exported_version.
    series = _query(setup.source, f'modelyard_model_ready{{namespace="{setup.kube.namespace}"}}')
    assert len(series["result"]) == 2
    assert all("exported_version" not in s["metric"] for s in series["result"])


def test_window_counts_equal_the_direct_scrapes(setup: Setup) -> None:
    ips = sorted(setup.pods.values())
    _drive(ips, 12)  # before the window: must not count
    settled = time.time()
    _scraped_after(setup.source, settled)
    start = time.time()
    before = _direct(ips)
    ok, failed = _drive(ips, 40)
    after = _direct(ips)
    end = time.time()
    last_scrape = _scraped_after(setup.source, end)

    async def window() -> analysis.Counts:
        async with setup.source.client() as prom:
            return await prom.window(setup.source.ref, start)

    from_prometheus = asyncio.run(window())
    from_pods = after.since(before)
    assert (ok, failed) == (30, 10)
    assert from_pods.requests == 40
    assert from_pods.errors == 10
    assert from_prometheus == from_pods  # requests, errors and every latency bucket
    thresholds = api.Analysis(max_error_rate=0.05, min_requests=20)
    verdict = analysis.judge(from_prometheus, thresholds)
    assert verdict == analysis.judge(from_pods, thresholds)
    assert verdict.outcome == "fail"
    assert verdict.error_rate == 0.25

    # rate() over a range holding exactly these 40 requests and a quiet scrape before them
    # is at least 40/range (extrapolation only stretches) and at most 40 over the range
    # less the two edge gaps, each under a scrape interval and a poll.
    span = last_scrape - settled
    load = _load(setup.source, at=last_scrape, rate_window_s=span)
    assert load.rps is not None
    assert 40 / span <= load.rps * (1 + 1e-9)
    assert load.rps <= 40 / max(span - 2.5, 0.5)
    assert load.latency_p95_s is not None
    assert 0 < load.latency_p95_s <= 10
    assert load.queue_depth == 0
    assert load.ready_replicas == 2
    assert load.gpu_utilization is None  # no GPU on this machine: no series, no guess


def test_inflight_counts_requests_held_open(setup: Setup) -> None:
    ips = sorted(setup.pods.values())
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32",
                                   "data": [1, 2, 3, 4]}]}).encode()
    held: list[http.client.HTTPConnection] = []
    try:
        for ip in (ips[0], ips[0], ips[1]):  # two on one pod, one on the other
            conn = http.client.HTTPConnection(ip, 8080, timeout=30)
            conn.putrequest("POST", f"/v2/models/{NAME}/infer")
            conn.putheader("Content-Type", "application/json")
            conn.putheader("Content-Length", str(len(body)))
            conn.endheaders()
            conn.send(body[:10])  # the rest later: the request stays in flight meanwhile
            held.append(conn)
        load = wait_for(lambda: (x := _load(setup.source)).inflight == 3 and x, timeout=60,
                        what="3 requests in flight")
        assert load.queue_depth == 0  # not yet decoded, so not queued for a batch
        assert load.ready_replicas == 2
        for conn in held:
            conn.send(body[10:])
            reply = conn.getresponse()
            assert reply.status == 200, reply.read()
            reply.read()
    finally:
        for conn in held:
            conn.close()
    wait_for(lambda: _load(setup.source).inflight == 0, timeout=60, what="nothing in flight")


def test_unreachable_prometheus_and_bad_queries_are_metrics_unavailable(setup: Setup) -> None:
    async def window(url: str) -> analysis.Counts:
        async with promql.Prometheus(url, timeout_s=2) as prom:
            return await prom.window(setup.source.ref, time.time() - 60)

    with pytest.raises(promql.PrometheusUnreachable):
        asyncio.run(window("http://127.0.0.1:9"))  # nothing listens on the discard port
    with pytest.raises(promql.MetricsUnavailable):
        asyncio.run(window("http://no-such-host.invalid:9090"))
    with pytest.raises(promql.QueryFailed, match="bad_data"):
        _query(setup.source, "sum(")


def test_static_targets_give_the_same_counts(setup: Setup) -> None:
    """Without discovery (runtime-only tests, benchmarks): fixed targets, labels given here,
    the version from the runtime's own label. Debian's Prometheus 2 when installed, whose
    range selectors include their left edge (3's do not): the counts must not care."""
    ips = sorted(setup.pods.values())
    labels = {"namespace": "static", "model_deployment": NAME}
    with LocalPrometheus(static=[StaticTargets([f"{ip}:8080" for ip in ips], labels)],
                         config=PrometheusConfig(scrape_interval_s=1)) as prom:
        source = Source(prom.url, promql.VersionRef("static", NAME, VERSION))
        _scraped_after(source, time.time())
        start = time.time()
        before = _direct(ips)
        _drive(ips, 20)
        after = _direct(ips)
        _scraped_after(source, time.time())

        async def window() -> analysis.Counts:
            async with source.client() as client:
                return await client.window(source.ref, start)

        assert asyncio.run(window()) == after.since(before)
        assert after.since(before).requests == 20
        assert _load(source).ready_replicas == 2

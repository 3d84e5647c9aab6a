"""The activator holds requests for a model at zero and forwards them once a replica is
ready, against the local control plane and real runtime processes.

The model's runtime Deployment is rendered by the operator's own ``render_deployment``
(labels, port and probes as the operator writes them) without its owner reference, next
to a ModelDeployment object that no operator acts on: the test scales the Deployment
itself, as the operator's autoscaler would on the activator's wake signal. The activator
runs as its own process with the operator's kubeconfig, on this machine, reaching the
pods through the pod network's route; requests reach it on loopback with the Host header
a client of the model's Service would send.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from support import Kube, fresh_namespace, install_crd, wait_for

from modelyard.activator.discovery import Discovery
from modelyard.operator import api, render
from modelyard.operator.devcluster import ClusterConfig, LocalCluster, NodePool
from modelyard.operator.devcluster.pods import PodProcesses
from modelyard.operator.devcluster.ports import reserve_port
from modelyard.runtime.client import decode_response, encode_request

NAME = "doubler"
VERSION = "1"
ANSWER_TIMEOUT = 240  # a deadline on waiting for an answer, not an assertion on time


class _Doubler(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


def _save_model(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}],
                "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1, 4]}]}
    torch.jit.save(torch.jit.script(_Doubler()), str(path),
                   _extra_files={"modelyard.json": json.dumps(metadata)})


def _spec() -> dict[str, Any]:
    return {"model": {"version": VERSION, "uri": f"file:///models/{NAME}/{VERSION}/model.pt"},
            "resources": {"gpu": {"count": 1}}, "replicas": 0}


def _manifests(namespace: str) -> str:
    model_deployment = {"apiVersion": api.API_VERSION, "kind": api.KIND,
                        "metadata": {"name": NAME}, "spec": _spec()}
    spec = api.ModelDeploymentSpec.model_validate(_spec())
    deployment = render.render_deployment(render.Owner(NAME, namespace, "unused"), spec, 0)
    del deployment["metadata"]["ownerReferences"]  # no operator: the GC would delete it
    # JSON: PyYAML leaves a spec hash like 1234e56789012345 unquoted, a number to kubectl
    return json.dumps({"apiVersion": "v1", "kind": "List",
                       "items": [model_deployment, deployment]})


@dataclass
class Activator:
    url: str
    admin_url: str
    process: subprocess.Popen[bytes]

    def samples(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        text = httpx.get(f"{self.admin_url}/metrics", timeout=10).text
        return {(s.name, frozenset(s.labels.items())): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def value(self, name: str, **labels: str) -> float:
        return self.samples().get((name, frozenset(labels.items())), 0.0)


@contextlib.contextmanager
def running_activator(cluster: LocalCluster, logs: Path, timeout_s: float) -> Iterator[Activator]:
    port, admin = reserve_port(), reserve_port()
    env = {**os.environ, "KUBECONFIG": str(cluster.operator_kubeconfig)}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    with (logs / f"activator-{port}.log").open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "modelyard.activator", "--host", "127.0.0.1",
             "--port", str(port), "--admin-port", str(admin),
             "--timeout-seconds", f"{timeout_s:g}", "--log-level", "debug"],
            env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    running = Activator(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin}", process)
    try:
        wait_for(lambda: process.poll() is None and _healthy(running.admin_url), timeout=60,
                 what="the activator's /healthz")
        yield running
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            raise


def _healthy(admin_url: str) -> bool:
    try:
        return httpx.get(f"{admin_url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@dataclass
class Setup:
    kube: Kube
    activator: Activator
    cluster: LocalCluster
    logs: Path

    @property
    def host(self) -> str:
        return f"{NAME}.{self.kube.namespace}.svc"

    @property
    def labels(self) -> dict[str, str]:
        return {"namespace": self.kube.namespace, "model_deployment": NAME}

    def scale(self, replicas: int) -> None:
        self.kube.run("scale", "deployment", render.deployment_name(NAME, VERSION),
                      f"--replicas={replicas}")

    def pods(self) -> list[dict[str, Any]]:
        return list(self.kube.get("pods", selector=f"{render.MODEL_LABEL}={NAME}") or [])

    def ready_pods(self) -> list[dict[str, Any]]:
        return [p for p in self.pods() if any(
            c["type"] == "Ready" and c["status"] == "True"
            for c in (p.get("status") or {}).get("conditions") or [])]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    pools = (NodePool("gpu-h100", count=1, gpus=8, gpu_product="NVIDIA-H100-80GB-HBM3"),)
    state = tmp_path_factory.mktemp("activator")
    models = state / "models"
    _save_model(models / NAME / VERSION / "model.pt")
    with LocalCluster(ClusterConfig(topology=pools, real_pods=True)) as cluster:
        install_crd(cluster)
        pods = PodProcesses(cluster, models_dir=models, log_dir=state / "pods", max_backoff_s=2)
        pods.start()
        try:
            with fresh_namespace(cluster, "act") as namespace, \
                    running_activator(cluster, state, timeout_s=120) as activator:
                kube = Kube(cluster, namespace)
                kube.apply(_manifests(namespace))
                yield Setup(kube, activator, cluster, state)
        finally:
            pods.stop()


@pytest.fixture
def at_zero(setup: Setup) -> Setup:
    """The model holds no pod at all (as after the idle delay)."""
    setup.scale(0)
    wait_for(lambda: not setup.pods(), timeout=120, what="no runtime pod left")
    # The activator goes on with its list of ready pods, refreshing it behind the requests,
    # for 3 x --cache-seconds (1 s): let the list from before the scale-down expire, as a
    # model idle for minutes would have.
    time.sleep(Discovery.STALE_FACTOR * 1.0 + 0.5)
    return setup


@pytest.fixture
def at_one(setup: Setup) -> Setup:
    """The model has one ready replica."""
    setup.scale(1)
    wait_for(setup.ready_pods, timeout=ANSWER_TIMEOUT, what="a ready runtime pod")
    return setup


def _infer(url: str, host: str, values: list[float],
           timeout: float = ANSWER_TIMEOUT) -> httpx.Response:
    body, headers = encode_request({"input": np.array([values], dtype=np.float32)})
    return httpx.post(f"{url}/v2/models/{NAME}/infer", content=body,
                      headers={**headers, "Host": host}, timeout=timeout)


def _doubled(response: httpx.Response) -> list[float]:
    assert response.status_code == 200, response.text
    return [float(x) for x in decode_response(response.content, response.headers)["output"][0]]


class _Held(threading.Thread):
    """One request sent through the activator, answered whenever it is answered."""

    def __init__(self, url: str, host: str, values: list[float]) -> None:
        super().__init__(daemon=True)
        self.url, self.host, self.values = url, host, values
        self.response: httpx.Response | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.response = _infer(self.url, self.host, self.values)
        except BaseException as error:
            self.error = error

    def answer(self) -> httpx.Response:
        self.join(ANSWER_TIMEOUT)
        assert not self.is_alive(), "no answer"
        assert self.error is None, self.error
        assert self.response is not None
        return self.response


def test_a_request_is_held_until_a_replica_is_ready(at_zero: Setup) -> None:
    setup, activator = at_zero, at_zero.activator
    waits_before = activator.value("modelyard_activator_wait_seconds_count", **setup.labels)
    held_before = activator.value("modelyard_activator_held_requests_total", **setup.labels)

    request = _Held(activator.url, setup.host, [1, 2, 3, 4])
    request.start()
    wait_for(lambda: activator.value("modelyard_activator_waiting_requests",
                                     **setup.labels) == 1, what="the request held")
    assert request.is_alive()  # held: neither answered nor refused
    assert setup.pods() == []  # and the activator asked for nothing itself

    setup.scale(1)  # what the operator does when it sees the waiting request
    assert _doubled(request.answer()) == [2, 4, 6, 8]
    assert activator.value("modelyard_activator_waiting_requests", **setup.labels) == 0
    assert activator.value("modelyard_activator_wait_seconds_count",
                           **setup.labels) == waits_before + 1
    assert activator.value("modelyard_activator_held_requests_total",
                           **setup.labels) == held_before + 1
    # The whole wait is in the histogram: it outlasted the pod's start, so not in the
    # first bucket.
    assert activator.value("modelyard_activator_wait_seconds_bucket", le="0.005",
                           **setup.labels) <= waits_before


def test_a_request_that_waits_too_long_gets_a_clear_503(at_zero: Setup) -> None:
    setup = at_zero
    with running_activator(setup.cluster, setup.logs, timeout_s=3) as activator:
        response = _infer(activator.url, setup.host, [1, 1, 1, 1])
        assert response.status_code == 503
        assert response.json() == {
            "error": f"model {setup.kube.namespace}/{NAME} has no ready replica after 3 s"}
        assert int(response.headers["Retry-After"]) > 0
        assert activator.value("modelyard_activator_requests_total", outcome="timeout",
                               **setup.labels) == 1
        assert activator.value("modelyard_activator_waiting_requests", **setup.labels) == 0

        # The same activator keeps serving: once a replica is ready, requests go through.
        setup.scale(1)
        wait_for(setup.ready_pods, timeout=ANSWER_TIMEOUT, what="a ready runtime pod")
        assert _doubled(_infer(activator.url, setup.host, [0.5, 1, 1.5, 2])) == [1, 2, 3, 4]
        assert activator.value("modelyard_activator_requests_total", outcome="forwarded",
                               **setup.labels) == 1


def test_hosts_that_name_no_model_get_404(setup: Setup) -> None:
    url, namespace = setup.activator.url, setup.kube.namespace
    for host in ("localhost", "127.0.0.1:8080", f"{NAME}.{namespace}.svc.example.com"):
        response = _infer(url, host, [1, 2, 3, 4])
        assert response.status_code == 404, host
        assert "names no model Service" in response.json()["error"]
    for missing in (f"nosuch.{namespace}", f"{NAME}.no-such-namespace.svc.cluster.local"):
        response = _infer(url, missing, [1, 2, 3, 4])
        assert response.status_code == 404, missing
        assert response.json()["error"].startswith("no ModelDeployment ")
    # Nothing was held for them, and no series was made up for them.
    assert not [key for key in setup.activator.samples()
                if ("model_deployment", "nosuch") in key[1]
                or ("namespace", "no-such-namespace") in key[1]]


def test_a_ready_model_is_forwarded_at_once_and_its_answers_pass_unchanged(
        at_one: Setup) -> None:
    setup, activator = at_one, at_one.activator
    held_before = activator.value("modelyard_activator_held_requests_total", **setup.labels)
    forwarded_before = activator.value("modelyard_activator_requests_total",
                                       outcome="forwarded", **setup.labels)

    assert _doubled(_infer(activator.url, setup.host, [1, 0, -1, 2])) == [2, 0, -2, 4]
    ready = httpx.get(f"{activator.url}/v2/models/{NAME}/ready?probe=1",
                      headers={"Host": f"{setup.host}.cluster.local:80"}, timeout=30)
    assert ready.status_code == 200
    # The runtime's own errors come back as the runtime sent them.
    wrong_model = httpx.post(f"{activator.url}/v2/models/nosuch/infer", content=b"{}",
                             headers={"Host": setup.host}, timeout=30)
    [pod] = setup.ready_pods()
    direct = httpx.post(f"http://{pod['status']['podIP']}:8080/v2/models/nosuch/infer",
                        content=b"{}", timeout=30)
    assert wrong_model.status_code == direct.status_code == 404
    assert wrong_model.json() == direct.json()
    bad_input = httpx.post(f"{activator.url}/v2/models/{NAME}/infer", content=b"not json",
                           headers={"Host": setup.host, "Content-Type": "application/json"},
                           timeout=30)
    assert bad_input.status_code == 400
    assert "error" in bad_input.json()

    assert activator.value("modelyard_activator_held_requests_total",
                           **setup.labels) == held_before  # none of them was held
    assert activator.value("modelyard_activator_requests_total", outcome="forwarded",
                           **setup.labels) == forwarded_before + 4


def test_a_body_above_the_limit_is_refused(setup: Setup) -> None:
    response = httpx.post(f"{setup.activator.url}/v2/models/{NAME}/infer",
                          content=b"x" * (64 * 1024 * 1024 + 1),
                          headers={"Host": setup.host}, timeout=60)
    assert response.status_code == 413
    assert "request body above" in response.json()["error"]


def test_concurrent_held_requests_all_complete(at_zero: Setup) -> None:
    setup, activator = at_zero, at_zero.activator
    requests = [_Held(activator.url, setup.host, [i, i, i, i]) for i in range(6)]
    for request in requests:
        request.start()

    def held() -> bool:
        early = [(r.response.status_code if r.response is not None else None, r.error)
                 for r in requests if not r.is_alive()]
        assert not early, f"requests answered while the model had no pod: {early}"
        return activator.value("modelyard_activator_waiting_requests", **setup.labels) == 6

    wait_for(held, timeout=120, what="6 requests held")

    setup.scale(1)
    assert [_doubled(request.answer()) for request in requests] == [
        [2 * i] * 4 for i in range(6)]
    assert activator.value("modelyard_activator_waiting_requests", **setup.labels) == 0


def test_stopping_lets_held_requests_go_with_a_503(at_zero: Setup) -> None:
    setup = at_zero
    with running_activator(setup.cluster, setup.logs, timeout_s=120) as activator:
        request = _Held(activator.url, setup.host, [1, 2, 3, 4])
        request.start()
        wait_for(lambda: activator.value("modelyard_activator_waiting_requests",
                                         **setup.labels) == 1, what="the request held")
        activator.process.terminate()  # as Kubernetes stops an activator pod
        response = request.answer()
        assert response.status_code == 503
        assert "is stopping" in response.json()["error"]
        assert "Retry-After" in response.headers
        assert activator.process.wait(60) == 0


_GHOST = f"""\
apiVersion: v1
kind: Pod
metadata: {{name: ghost, labels: {{{render.MODEL_LABEL}: {NAME}}}}}
spec:
  tolerations: [{{operator: Exists}}]
  containers:
  - {{name: runtime, image: modelyard-runtime, ports: [{{name: http, containerPort: 8080}}]}}
"""


def test_a_listed_pod_that_refuses_connections_is_skipped(at_one: Setup) -> None:
    """A pod the API still calls Ready whose process is gone (nothing listens on its
    address): requests sent its way go to the live one instead, none fails."""
    setup = at_one
    setup.kube.apply(_GHOST)
    try:
        wait_for(lambda: ((setup.kube.get("pods", "ghost") or {}).get("status") or {})
                 .get("podIP"), what="the ghost pod's address")
        ready = {"status": {"conditions": [{"type": "Ready", "status": "True"},
                                           {"type": "ContainersReady", "status": "True"}]}}
        setup.kube.run("patch", "pod", "ghost", "--subresource=status", "--type=strategic",
                       "-p", json.dumps(ready))
        listed = wait_for(lambda: len(setup.ready_pods()) == 2 and setup.ready_pods(),
                          what="two pods listed Ready")
        assert "ghost" in {p["metadata"]["name"] for p in listed}
        answers = [_doubled(_infer(setup.activator.url, setup.host, [i, 0, 0, 1]))
                   for i in range(6)]
        assert answers == [[2 * i, 0, 0, 2] for i in range(6)]
    finally:
        setup.kube.run("delete", "pod", "ghost", "--grace-period=0", "--force", check=False)

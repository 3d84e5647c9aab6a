"""Scale to zero and back through the activator, with the real operator: at zero the model
holds no pods and no GPUs and its Service points at the activator; the first request wakes
it and succeeds; idle again, it goes back to zero."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from support import (
    Kube,
    activator_service,
    as_operator,
    fresh_namespace,
    ready_endpoint_pods,
    wait_for,
)
from test_real_pods import real_cluster  # noqa: F401 - the module's own real cluster

from modelyard.operator.devcluster.ports import reserve_port
from modelyard.runtime.client import decode_response, encode_request


@pytest.fixture
def activated(real_cluster: Any, tmp_path: Any,  # noqa: F811
              monkeypatch: pytest.MonkeyPatch) -> Iterator[Kube]:
    """The activator as its pods would run it (on this machine, at the pod network's host
    address), behind a Service, and the operator told where it is."""
    from modelyard.operator.runner import OperatorThread

    host = real_cluster.pod_network.host_address
    port, admin = reserve_port(), reserve_port()
    with fresh_namespace(real_cluster, "z") as namespace, as_operator(real_cluster):
        kube = Kube(real_cluster, namespace)
        log = (tmp_path / "activator.log").open("wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "modelyard.activator", "--host", host,
             "--port", str(port), "--admin-port", str(admin), "--timeout-seconds", "180"],
            env={**os.environ, "KUBECONFIG": str(real_cluster.operator_kubeconfig)},
            stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: _up(f"http://{host}:{admin}/healthz"), timeout=60,
                     what="the activator")
            activator_service(kube, host, port, admin)
            monkeypatch.setenv("MODELYARD_ACTIVATOR_SERVICE", f"{namespace}/activator")
            with OperatorThread():
                yield kube
        finally:
            process.terminate()
            process.wait(30)


def _up(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def manifest() -> str:
    return yaml.safe_dump({
        "apiVersion": "modelyard.dev/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": "sleepy"},
        "spec": {"model": {"version": "1", "uri": "file:///models/demo/1/model.pt"},
                 "resources": {"gpu": {"count": 1}},
                 "autoscaling": {"minReplicas": 0, "maxReplicas": 2, "metric": "concurrency",
                                 "target": 1, "stableWindowSeconds": 6,
                                 "scaleDownDelaySeconds": 2, "scaleToZeroDelaySeconds": 6}},
    })


def at_zero(kube: Kube) -> bool:
    deployment = kube.get("deployment", "sleepy-v1") or {}
    service = kube.get("service", "sleepy") or {}
    return deployment.get("spec", {}).get("replicas") == 0 \
        and "selector" not in service.get("spec", {}) \
        and bool(kube.get("endpointslice", "sleepy-activator"))


def test_the_first_request_after_zero_wakes_the_model_and_succeeds(activated: Kube) -> None:
    kube = activated
    kube.apply(manifest())
    wait_for(lambda: at_zero(kube), timeout=60, what="the model at zero, behind the activator")
    status = kube.get("md", "sleepy")["status"]
    assert status["gpus"] == 0
    assert not kube.get("pods", selector="modelyard.dev/model-deployment=sleepy")
    [(address, _)] = ready_endpoint_pods(kube, "sleepy").items()
    assert address == kube.cluster.pod_network.host_address  # the Service leads there
    slice_ = kube.get("endpointslice", "sleepy-activator")
    port = slice_["ports"][0]["port"]

    body, headers = encode_request({"input": np.ones((1, 3, 32, 32), dtype=np.float32)})
    started = time.monotonic()
    answer = httpx.post(f"http://{address}:{port}/v2/models/sleepy/infer", content=body,
                        headers={**headers, "Host": f"sleepy.{kube.namespace}.svc"},
                        timeout=240)
    cold_start_s = time.monotonic() - started
    print(f"cold start through the activator: {cold_start_s:.1f} s")
    assert answer.status_code == 200, answer.text
    [output] = decode_response(answer.content, answer.headers).values()
    assert output.shape == (1, 10)

    # Awake: the Service selects the model's pods again, its activator slice is gone.
    wait_for(lambda: (kube.get("service", "sleepy") or {}).get("spec", {}).get("selector")
             and kube.get("endpointslice", "sleepy-activator") is None, timeout=60,
             what="the Service back on the model's pods")
    assert kube.get("md", "sleepy")["status"]["autoscaler"]["desiredReplicas"] >= 1
    assert any(e["reason"] == "Scaled" for e in kube.events("sleepy"))
    # Idle again: back to zero, and the activator in front once more.
    wait_for(lambda: at_zero(kube), timeout=120, what="back to zero after the idle delay")
    assert kube.get("md", "sleepy")["status"]["gpus"] == 0

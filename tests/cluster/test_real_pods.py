"""Runtime pods backed by real runtime processes on their own loopback IPs: Ready means the
model answers, and a model that cannot load crash-loops and degrades instead of going Ready."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import Kube, as_operator, install_crd, wait_for

from modelyard.operator.devcluster import ClusterConfig, LocalCluster, NodePool
from modelyard.operator.devcluster.pods import PodProcesses
from modelyard.runtime.client import Client
from modelyard.runtime.demo import build


@pytest.fixture(scope="module")
def real_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    pools = (NodePool("gpu-h100", count=1, gpus=8, gpu_product="NVIDIA-H100-80GB-HBM3"),)
    state = tmp_path_factory.mktemp("real")
    models = state / "models"
    build(models / "demo" / "1" / "model.pt", size=32, classes=10)
    with LocalCluster(ClusterConfig(topology=pools, real_pods=True)) as local:
        install_crd(local)
        pods = PodProcesses(local, models_dir=models, log_dir=state / "pods", max_backoff_s=2)
        pods.start()
        local.models_dir = models  # type: ignore[attr-defined]
        local.pods = pods  # type: ignore[attr-defined]
        try:
            yield local
        finally:
            pods.stop()


@pytest.fixture
def real(real_cluster: Any) -> Iterator[Kube]:
    import uuid

    from modelyard.operator.runner import OperatorThread

    namespace = f"r-{uuid.uuid4().hex[:6]}"
    real_cluster.kubectl("create", "namespace", namespace)
    real_cluster.kubectl("wait", "--for=create", "serviceaccount/default", "-n", namespace,
                         "--timeout=30s")
    try:
        with as_operator(real_cluster), OperatorThread():
            yield Kube(real_cluster, namespace)
    finally:
        real_cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def _manifest(name: str, sha256: str | None = None) -> str:
    model: dict[str, Any] = {"version": "1", "uri": "file:///models/demo/1/model.pt"}
    if sha256:
        model["sha256"] = sha256
    return yaml.safe_dump({
        "apiVersion": "modelyard.dev/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": name},
        "spec": {"model": model, "resources": {"gpu": {"count": 1}}, "replicas": 1},
    })


def test_ready_means_the_model_answers(real: Kube, real_cluster: Any) -> None:
    import numpy as np

    real.apply(_manifest("demo"))
    cond = wait_for(lambda: (c := real.condition("demo", "Ready")) and c["status"] == "True"
                    and c, timeout=120, what="Ready")
    assert cond["reason"] == "Serving"
    [pod] = real.get("pods", selector="modelyard.dev/model-deployment=demo")
    ip = pod["status"]["podIP"]
    assert ip.startswith("127.1.")
    # Ready was reported by the stand-in kubelet only after the runtime's own probe passed.
    with Client(f"http://{ip}:8080", "demo") as client:
        assert client.ready()
        out = client.infer({"input": np.zeros((2, 3, 32, 32), dtype=np.float32)})
    assert next(iter(out.values())).shape == (2, 10)


def test_a_model_that_cannot_load_crash_loops_and_degrades(real: Kube,
                                                             real_cluster: Any) -> None:
    model = real_cluster.models_dir / "demo" / "1" / "model.pt"
    wrong = hashlib.sha256(Path(model).read_bytes() + b"x").hexdigest()
    real.apply(_manifest("broken", sha256=wrong))

    def degraded() -> dict[str, Any] | None:
        cond = real.condition("broken", "Degraded")
        return cond if cond and cond["status"] == "True" else None

    cond = wait_for(degraded, timeout=120, what="Degraded")
    assert cond["reason"] == "CrashLoopBackOff"
    assert real.condition("broken", "Ready")["status"] == "False"  # type: ignore[index]
    [pod] = real.get("pods", selector="modelyard.dev/model-deployment=broken")
    [status] = pod["status"]["containerStatuses"]
    assert status["restartCount"] >= 1
    assert status["ready"] is False
    logs = "\n".join(p.read_text() for p in (real_cluster.pods.log_dir).glob("*broken*"))
    assert "sha256" in logs.lower()  # the runtime said why it refused the model

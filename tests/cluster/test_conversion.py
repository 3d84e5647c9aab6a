"""Conversion in the rollout, for real (spec.model.convert): the operator's Job runs
``modelyard.runtime.convertjob`` as a real process (the stand-in kubelet runs a Job's pod
to its end and reports its termination message), the package is written next to the
source, the canary serves it and is promoted; a conversion that fails stops the next
rollout with its reason while the stable version keeps answering.

One compile in all (an MLP: tens of seconds on 2 cores); the failing conversion fails
before compiling (an exported program whose batch is fixed cannot be given a dynamic one).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from support import Kube, as_operator, fresh_namespace, real_pod_cluster, wait_for
from torch import nn

from modelyard.runtime.client import Client

MAX_BATCH = 8


class Mlp(nn.Module):
    def __init__(self, fixed_batch: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
        self.fixed_batch = fixed_batch

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # the served input's name
        if self.fixed_batch is not None:
            input = input.reshape(self.fixed_batch, 16)
        out: torch.Tensor = self.net(input)
        return out


def export(path: Path, *, fixed_batch: int | None = None) -> Path:
    """The MLP as a torch.export program: batch dynamic (1..MAX_BATCH), or fixed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    model = Mlp(fixed_batch).eval()
    dynamic = None if fixed_batch else ({0: torch.export.Dim("batch", min=1, max=MAX_BATCH)},)
    torch.export.save(torch.export.export(model, (torch.zeros(2, 16),),
                                          dynamic_shapes=dynamic), str(path))
    return path


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with real_pod_cluster(tmp_path_factory.mktemp("convert")) as local:
        export(local.models_dir / "mlp" / "1" / "model.pt2")
        export(local.models_dir / "mlp" / "2" / "model.pt2")
        export(local.models_dir / "mlp" / "3" / "model.pt2", fixed_batch=2)
        yield local


@pytest.fixture
def kube(cluster: Any) -> Iterator[Kube]:
    from modelyard.operator.runner import OperatorThread

    with fresh_namespace(cluster, "cv") as namespace, as_operator(cluster), OperatorThread():
        yield Kube(cluster, namespace)


def manifest(version: str, *, convert: dict[str, Any] | None = None) -> str:
    model: dict[str, Any] = {"version": version, "format": "export",
                             "uri": f"file:///models/mlp/{version}/model.pt2"}
    if convert is not None:
        model["convert"] = convert
    return yaml.safe_dump({
        "apiVersion": "modelyard.dev/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": "mlp"},
        "spec": {"model": model, "replicas": 1, "resources": {"gpu": {"count": 1}},
                 "runtime": {"batching": {"maxBatchSize": MAX_BATCH}},
                 "rollout": {"strategy": "Canary",
                             "steps": [{"weight": 50, "pauseSeconds": 2}]}},
    })


def status(kube: Kube) -> dict[str, Any]:
    return dict((kube.get("md", "mlp") or {}).get("status") or {})


def answer(kube: Kube, version: str) -> np.ndarray:
    """The version's ready pod answers an inference (through its own IP)."""
    pods = [p for p in kube.get("pods", selector=f"modelyard.dev/version={version}")
            if any(c["type"] == "Ready" and c["status"] == "True"
                   for c in p["status"].get("conditions", []))]
    assert pods, f"no ready pod of version {version}"
    x = np.linspace(-1, 1, 3 * 16, dtype=np.float32).reshape(3, 16)
    with Client(f"http://{pods[0]['status']['podIP']}:8080", "mlp") as client:
        out = client.infer({"input": x})
    return np.asarray(next(iter(out.values())))


def expected() -> np.ndarray:
    x = torch.linspace(-1, 1, 3 * 16).reshape(3, 16)
    with torch.no_grad():
        return Mlp().eval()(x).numpy()  # type: ignore[no-any-return]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_version_is_converted_by_a_job_served_by_its_canary_and_a_failure_stops_the_next(
        kube: Kube, cluster: Any) -> None:
    kube.apply(manifest("1"))
    wait_for(lambda: status(kube).get("stableVersion") == "1"
             and status(kube).get("readyReplicas") == 1, timeout=120, what="v1 serving")

    kube.apply(manifest("2", convert={"tolerance": 1e-4}))
    jobs = wait_for(lambda: kube.get("jobs"), timeout=30, what="the conversion Job")
    assert not kube.get("deployment", "mlp-v2"), "no canary before the package exists"
    assert kube.condition("mlp", "Converted")["reason"] == "Converting"  # type: ignore[index]

    def converted() -> dict[str, Any] | None:
        cond = kube.condition("mlp", "Converted")
        assert cond is None or cond["reason"] != "ConversionFailed", cond
        return cond if cond and cond["status"] == "True" else None

    wait_for(converted, timeout=400, interval=1, what="v2 converted")
    promoted = wait_for(lambda: (s := status(kube)).get("stableVersion") == "2" and s,
                        timeout=120, what="v2 promoted")
    record = promoted["versions"][0]
    conversion = record["conversion"]
    package = cluster.models_dir / "mlp" / "2" / "aoti" / f"{conversion['artifactSha256']}.pt2"
    assert package.is_file(), "written next to the source, named by its digest"
    assert sha256(package) == conversion["artifactSha256"]
    assert conversion["sourceSha256"] == sha256(cluster.models_dir / "mlp" / "2" / "model.pt2")
    assert conversion["artifactUri"] == f"file:///models/mlp/2/aoti/{sha256(package)}.pt2"
    assert conversion["accuracyDelta"] <= 1e-4
    assert conversion["speedup"] > 0
    assert conversion["job"] == jobs[0]["metadata"]["name"]
    assert (record["version"], record["phase"]) == ("2", "Stable")
    [pod] = kube.get("pods", selector="modelyard.dev/version=2")
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert env["MODELYARD_MODEL_FORMAT"] == "aoti"
    assert env["MODELYARD_MODEL_SHA256"] == sha256(package)
    np.testing.assert_allclose(answer(kube, "2"), expected(), rtol=1e-4, atol=1e-5)
    reasons = [e["reason"] for e in kube.events("mlp")]
    assert "Converted" in reasons

    kube.apply(manifest("3", convert={"tolerance": 1e-4}))

    def failed() -> dict[str, Any] | None:
        cond = kube.condition("mlp", "Converted")
        return cond if cond and cond["reason"] == "ConversionFailed" else None

    cond = wait_for(failed, timeout=180, interval=1, what="v3's conversion failed")
    assert "dynamic batch" in cond["message"], cond
    degraded = kube.condition("mlp", "Degraded")
    assert degraded is not None
    assert degraded["reason"] == "ConversionFailed"
    after = status(kube)
    assert after["stableVersion"] == "2"
    assert (after["versions"][0]["version"], after["versions"][0]["phase"]) == ("3", "Failed")
    assert not kube.get("deployment", "mlp-v3")
    assert kube.condition("mlp", "Ready")["status"] == "True"  # type: ignore[index]
    np.testing.assert_allclose(answer(kube, "2"), expected(), rtol=1e-4, atol=1e-5)

"""Runtime pods backed by real runtime processes on their own pod IPs: Ready means the
model answers, and a model that cannot load crash-loops and degrades instead of going Ready;
rollouts under real traffic; and a version converted by a real Job before its canary."""

from __future__ import annotations

import collections
import hashlib
import ipaddress
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from support import (
    Kube,
    as_operator,
    fresh_namespace,
    ready_endpoint_pods,
    real_pod_cluster,
    wait_for,
)
from torch import nn

from modelyard.runtime.client import Client


@pytest.fixture(scope="module")
def real_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with real_pod_cluster(tmp_path_factory.mktemp("real")) as local:
        yield local


@pytest.fixture
def real(real_cluster: Any) -> Iterator[Kube]:
    from modelyard.operator.runner import OperatorThread

    with fresh_namespace(real_cluster, "r") as namespace, as_operator(real_cluster), \
            OperatorThread():
        yield Kube(real_cluster, namespace)


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
    assert ipaddress.ip_address(ip) in real_cluster.pod_network.pod_range
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


class _Faulty(torch.nn.Module):
    """Passes the runtime's warm-up (zeros) and fails on every real input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x.abs().sum() > 0):
            raise RuntimeError("this model is broken")
        return torch.zeros(x.shape[0], 10)


def _current_test() -> str:
    import os

    return os.environ.get("PYTEST_CURRENT_TEST", "").split("::")[-1].split(" ")[0]


def _faulty_model(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 32, 32]}],
                "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1, 10]}]}
    torch.jit.save(torch.jit.script(_Faulty()), str(path),
                   _extra_files={"modelyard.json": json.dumps(metadata)})


class _Traffic(threading.Thread):
    """Plays kube-proxy for the model's stable Service: requests spread over the ready
    endpoints of its EndpointSlices (refreshed twice a second), counted by version."""

    def __init__(self, kube: Kube, name: str, service: str | None = None):
        super().__init__(daemon=True)
        self.kube, self.name, self.service = kube, name, service or name
        self.ok: collections.Counter[str] = collections.Counter()
        self.failed: collections.Counter[str] = collections.Counter()
        self.stop = threading.Event()

    def report(self, what: str) -> None:
        print(f"{what}: ok {dict(self.ok)}, failed {dict(self.failed)}")

    def run(self) -> None:
        import numpy as np

        rng = np.random.default_rng(0)
        targets: list[tuple[str, str]] = []
        refreshed = 0.0
        turn = 0
        while not self.stop.is_set():
            if time.monotonic() - refreshed > 0.5:
                pods = self.kube.get("pods", selector=f"modelyard.dev/model-deployment={self.name}")
                versions = {p["metadata"]["name"]: p["metadata"]["labels"]["modelyard.dev/version"]
                            for p in pods or []}
                targets = [(ip, versions.get(pod, "?")) for ip, pod in
                           ready_endpoint_pods(self.kube, self.service).items()]
                refreshed = time.monotonic()
            if not targets:
                time.sleep(0.1)
                continue
            ip, version = targets[turn % len(targets)]
            turn += 1
            try:
                with Client(f"http://{ip}:8080", self.name, timeout=5) as client:
                    client.infer({"input": rng.random((1, 3, 32, 32), dtype=np.float32)})
                self.ok[version] += 1
            except Exception:
                self.failed[version] += 1


def test_a_failing_canary_is_rolled_back_without_failing_stable_traffic(
        real: Kube, real_cluster: Any) -> None:
    _faulty_model(real_cluster.models_dir / "faulty" / "2" / "model.pt")

    def guarded(version: str, folder: str) -> str:
        return yaml.safe_dump({
            "apiVersion": "modelyard.dev/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": "guarded"},
            "spec": {
                "model": {"version": version, "uri": f"file:///models/{folder}/{version}/model.pt"},
                "resources": {"gpu": {"count": 1}}, "replicas": 2,
                "rollout": {"strategy": "Canary",
                            "steps": [{"weight": 50, "pauseSeconds": 30}],
                            "analysis": {"maxErrorRate": 0.05, "minRequests": 20}},
            },
        })

    real.apply(guarded("1", "demo"))
    wait_for(lambda: (real.get("md", "guarded") or {}).get("status", {}).get("readyReplicas")
             == 2, timeout=120, what="v1 ready")
    traffic = _Traffic(real, "guarded")
    traffic.start()
    real.apply(guarded("2", "faulty"))

    def rolled_back() -> dict[str, Any] | None:
        status = (real.get("md", "guarded") or {}).get("status", {})
        newest = (status.get("versions") or [{}])[0]
        return status if newest.get("phase") == "RolledBack" else None

    status = wait_for(rolled_back, timeout=180, what="the canary rolled back")
    wait_for(lambda: (real.get("deployment", "guarded-v1") or {}).get("status", {})
             .get("readyReplicas") == 2, timeout=60, what="stable back at full size")
    time.sleep(2)
    traffic.stop.set()
    traffic.join()
    traffic.report(_current_test())

    record = status["versions"][0]
    assert record["version"] == "2"
    assert "error rate" in record["reason"]
    assert record["analysis"]["requests"] >= 20
    assert record["analysis"]["errorRate"] > 0.05
    assert status["stableVersion"] == "1"
    assert status["versions"][1]["phase"] == "Stable"
    assert not status.get("canary")
    degraded = real.condition("guarded", "Degraded")
    assert degraded is not None
    assert degraded["reason"] == "RolledBack"
    assert real.condition("guarded", "Ready")["status"] == "True"  # type: ignore[index]
    assert real.get("deployment", "guarded-v2")["spec"]["replicas"] == 0
    assert traffic.failed["2"] > 0  # the broken model was caught answering badly...
    assert traffic.failed["1"] == 0, traffic.failed  # ...while the stable version lost nothing
    assert traffic.ok["1"] > 0
    assert any(e["reason"] == "RolledBack" for e in real.events("guarded"))


def test_a_canary_that_cannot_start_is_rolled_back(real: Kube, real_cluster: Any) -> None:
    model = real_cluster.models_dir / "demo" / "1" / "model.pt"
    wrong = hashlib.sha256(Path(model).read_bytes() + b"!").hexdigest()

    def spec(version: str, sha256: str | None) -> str:
        body: dict[str, Any] = {"version": version, "uri": "file:///models/demo/1/model.pt"}
        if sha256:
            body["sha256"] = sha256
        return yaml.safe_dump({
            "apiVersion": "modelyard.dev/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": "nostart"},
            "spec": {"model": body, "resources": {"gpu": {"count": 1}}, "replicas": 1,
                     "rollout": {"strategy": "Canary",
                                 "steps": [{"weight": 50, "pauseSeconds": 60}]}},
        })

    real.apply(spec("1", None))
    wait_for(lambda: (real.get("md", "nostart") or {}).get("status", {}).get("readyReplicas")
             == 1, timeout=120, what="v1 ready")
    real.apply(spec("2", wrong))

    def rolled_back() -> dict[str, Any] | None:
        status = (real.get("md", "nostart") or {}).get("status", {})
        newest = (status.get("versions") or [{}])[0]
        return newest if newest.get("phase") == "RolledBack" else None

    record = wait_for(rolled_back, timeout=120, what="the canary rolled back")
    assert "CrashLoopBackOff" in record["reason"]
    assert real.condition("nostart", "Ready")["status"] == "True"  # type: ignore[index]
    assert real.get("deployment", "nostart-v2")["spec"]["replicas"] == 0


def test_a_full_canary_under_real_traffic_loses_no_request(real: Kube,
                                                            real_cluster: Any) -> None:
    def smooth(version: str) -> str:
        return yaml.safe_dump({
            "apiVersion": "modelyard.dev/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": "smooth"},
            "spec": {
                "model": {"version": version, "uri": "file:///models/demo/1/model.pt"},
                "resources": {"gpu": {"count": 1}}, "replicas": 2,
                "rollout": {"strategy": "Canary",
                            "steps": [{"weight": 50, "pauseSeconds": 3}],
                            "analysis": {"maxErrorRate": 0.0, "minRequests": 10}},
            },
        })

    real.apply(smooth("1"))
    wait_for(lambda: (real.get("md", "smooth") or {}).get("status", {}).get("readyReplicas")
             == 2, timeout=120, what="v1 ready")
    traffic = _Traffic(real, "smooth")
    traffic.start()
    real.apply(smooth("2"))

    def promoted() -> bool:
        status = (real.get("md", "smooth") or {}).get("status", {})
        return status.get("stableVersion") == "2" and not status.get("canary") \
            and real.get("deployment", "smooth-v1") is None
    wait_for(promoted, timeout=180, what="v2 promoted")
    time.sleep(2)
    traffic.stop.set()
    traffic.join()
    traffic.report(_current_test())

    assert traffic.ok["1"] > 0
    assert traffic.ok["2"] > 10  # the canary really served, and analysis saw it
    assert sum(traffic.failed.values()) == 0, traffic.failed
    ledger = real.get("md", "smooth")["status"]["versions"]
    assert [(v["version"], v["phase"]) for v in ledger] == [("2", "Stable"), ("1", "Superseded")]


def _demo(name: str, version: str, rollout: dict[str, Any]) -> str:
    return yaml.safe_dump({
        "apiVersion": "modelyard.dev/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": name},
        "spec": {"model": {"version": version, "uri": "file:///models/demo/1/model.pt"},
                 "resources": {"gpu": {"count": 1}}, "replicas": 2, "rollout": rollout},
    })


def _cli(kube: Kube, *args: str) -> Any:
    import os
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "modelyard.operator.cli", *args, "-n", kube.namespace],
        env={**os.environ, "KUBECONFIG": str(kube.cluster.kubeconfig)},
        capture_output=True, text=True, timeout=60, check=False)


def test_a_blue_green_switch_under_real_traffic_loses_no_request(
        real: Kube, real_cluster: Any) -> None:
    rollout = {"strategy": "BlueGreen"}
    real.apply(_demo("flip", "1", rollout))
    wait_for(lambda: (real.get("md", "flip") or {}).get("status", {}).get("readyReplicas")
             == 2, timeout=120, what="v1 ready")
    traffic = _Traffic(real, "flip")
    preview = _Traffic(real, "flip", service="flip-preview")
    traffic.start()
    preview.start()
    real.apply(_demo("flip", "2", rollout))
    wait_for(lambda: ((real.get("md", "flip") or {}).get("status", {}).get("canary") or {})
             .get("paused"), timeout=120, what="the preview ready, waiting for promote")
    wait_for(lambda: preview.ok["2"] > 10, what="the preview Service answering from v2")
    assert traffic.ok["2"] == 0  # nothing reached the new version through the stable Service
    assert _cli(real, "promote", "flip").returncode == 0
    wait_for(lambda: traffic.ok["2"] > 10, timeout=120, what="stable traffic on v2")
    wait_for(lambda: real.get("deployment", "flip-v1") is None, what="v1 retired")
    time.sleep(2)
    for t in (traffic, preview):
        t.stop.set()
        t.join()
        t.report(f"{_current_test()} ({t.service})")
    assert traffic.ok["1"] > 0
    assert sum(traffic.failed.values()) == 0, traffic.failed
    assert sum(preview.failed.values()) == 0, preview.failed


def test_an_abort_under_real_traffic_loses_no_request(real: Kube, real_cluster: Any) -> None:
    rollout = {"strategy": "Canary", "steps": [{"weight": 50}]}
    real.apply(_demo("halt", "1", rollout))
    wait_for(lambda: (real.get("md", "halt") or {}).get("status", {}).get("readyReplicas")
             == 2, timeout=120, what="v1 ready")
    traffic = _Traffic(real, "halt")
    traffic.start()
    real.apply(_demo("halt", "2", rollout))
    wait_for(lambda: traffic.ok["2"] > 10, timeout=120, what="the canary serving")
    assert _cli(real, "abort", "halt").returncode == 0
    wait_for(lambda: real.get("md", "halt")["status"]["versions"][0]["phase"] == "RolledBack",
             what="rolled back")
    wait_for(lambda: (real.get("deployment", "halt-v1") or {}).get("status", {})
             .get("readyReplicas") == 2 and not real.get(
                 "pods", selector="modelyard.dev/version=2"), timeout=90,
             what="v1 at full size, the canary's pods gone")
    served = traffic.ok["1"]
    wait_for(lambda: traffic.ok["1"] > served + 10, what="traffic on v1 after the abort")
    traffic.stop.set()
    traffic.join()
    traffic.report(_current_test())
    assert sum(traffic.failed.values()) == 0, traffic.failed


def test_a_canary_judged_by_prometheus_against_stable_is_rolled_back(
        real: Kube, real_cluster: Any) -> None:
    from modelyard.operator.devcluster.prometheus import LocalPrometheus, PrometheusConfig

    _faulty_model(real_cluster.models_dir / "faulty" / "2" / "model.pt")
    analysis = {"source": "prometheus", "maxErrorRate": 1.0, "maxErrorRateIncrease": 0.05,
                "minRequests": 20}

    def judged(version: str, folder: str, url: str) -> str:
        return yaml.safe_dump({
            "apiVersion": "modelyard.dev/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": "promjudged"},
            "spec": {
                "model": {"version": version, "uri": f"file:///models/{folder}/{version}/model.pt"},
                "resources": {"gpu": {"count": 1}}, "replicas": 2,
                "rollout": {"strategy": "Canary", "steps": [{"weight": 50, "pauseSeconds": 20}],
                            "analysis": {**analysis, "prometheusUrl": url}},
            },
        })

    config = PrometheusConfig(scrape_interval_s=1, namespaces=(real.namespace,))
    with LocalPrometheus(real_cluster, config=config) as prometheus:
        real.apply(judged("1", "demo", prometheus.url))
        wait_for(lambda: (real.get("md", "promjudged") or {}).get("status", {})
                 .get("readyReplicas") == 2, timeout=120, what="v1 ready")
        traffic = _Traffic(real, "promjudged")
        traffic.start()
        real.apply(judged("2", "faulty", prometheus.url))
        record = wait_for(lambda: next((v for v in (real.get("md", "promjudged") or {})
                                        .get("status", {}).get("versions", [])
                                        if v["phase"] == "RolledBack"), None),
                          timeout=180, what="rolled back on Prometheus' figures")
        traffic.stop.set()
        traffic.join()
        traffic.report(_current_test())
    assert "above the stable version's 0.0% + 5.0%" in record["reason"]
    assert record["analysis"]["requests"] >= 20
    assert record["analysis"]["errorRate"] == 1.0  # every request to the broken model failed
    assert traffic.failed["1"] == 0, traffic.failed


# ------------------------------------------------- conversion in the rollout (#15)

_MLP_MAX_BATCH = 8


class _Mlp(nn.Module):
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


def _export_mlp(path: Path, *, fixed_batch: int | None = None) -> Path:
    """The MLP as a torch.export program: batch dynamic (1..8), or fixed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    model = _Mlp(fixed_batch).eval()
    batch = torch.export.Dim("batch", min=1, max=_MLP_MAX_BATCH)
    dynamic = None if fixed_batch else ({0: batch},)
    torch.export.save(torch.export.export(model, (torch.zeros(2, 16),),
                                          dynamic_shapes=dynamic), str(path))
    return path


def _mlp_manifest(version: str, *, convert: dict[str, Any] | None = None,
                  name: str = "mlp", folder: str | None = None) -> str:
    model: dict[str, Any] = {"version": version, "format": "export",
                             "uri": f"file:///models/mlp/{folder or version}/model.pt2"}
    if convert is not None:
        model["convert"] = convert
    return yaml.safe_dump({
        "apiVersion": "modelyard.dev/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": name},
        "spec": {"model": model, "replicas": 1, "resources": {"gpu": {"count": 1}},
                 "runtime": {"batching": {"maxBatchSize": _MLP_MAX_BATCH}},
                 "rollout": {"strategy": "Canary",
                             "steps": [{"weight": 50, "pauseSeconds": 2}]}},
    })


def _md_status(kube: Kube, name: str = "mlp") -> dict[str, Any]:
    return dict((kube.get("md", name) or {}).get("status") or {})


def _mlp_answer(kube: Kube, version: str, name: str = "mlp") -> np.ndarray:
    """The version's ready pod answers an inference (through its own IP)."""
    pods = [p for p in kube.get("pods", selector=f"modelyard.dev/model-deployment={name},"
                                                f"modelyard.dev/version={version}")
            if any(c["type"] == "Ready" and c["status"] == "True"
                   for c in p["status"].get("conditions", []))]
    assert pods, f"no ready pod of version {version}"
    x = np.linspace(-1, 1, 3 * 16, dtype=np.float32).reshape(3, 16)
    with Client(f"http://{pods[0]['status']['podIP']}:8080", name) as client:
        out = client.infer({"input": x})
    return np.asarray(next(iter(out.values())))


def _mlp_expected() -> np.ndarray:
    x = torch.linspace(-1, 1, 3 * 16).reshape(3, 16)
    with torch.no_grad():
        return _Mlp().eval()(x).numpy()  # type: ignore[no-any-return]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_version_is_converted_by_a_job_and_served_by_its_canary_and_a_failed_one_stops(
        real: Kube, real_cluster: Any) -> None:
    """Conversion in the rollout (spec.model.convert), for real: the operator's Job runs
    ``modelyard.runtime.convertjob`` as a real process (the stand-in kubelet runs a Job's
    pod to its end and reports its termination message), the package is written next to
    the source, the canary serves it and is promoted; beside it, a conversion that fails
    (an exported program whose batch is fixed cannot be given a dynamic one: it fails before
    compiling) stops that model's rollout while its stable version keeps answering. One
    compile in all (an MLP: tens of seconds on 2 cores)."""
    kube, cluster = real, real_cluster
    mlp = cluster.models_dir / "mlp"
    _export_mlp(mlp / "1" / "model.pt2")
    _export_mlp(mlp / "2" / "model.pt2")
    _export_mlp(mlp / "3" / "model.pt2", fixed_batch=2)
    for name in ("mlp", "broken"):
        kube.apply(_mlp_manifest("1", name=name))
    for name in ("mlp", "broken"):
        wait_for(lambda name=name: _md_status(kube, name).get("stableVersion") == "1"
                 and _md_status(kube, name).get("readyReplicas") == 1, timeout=120,
                 what=f"{name} v1 serving")

    kube.apply(_mlp_manifest("2", convert={"tolerance": 1e-4}))
    # beside it, a version whose conversion fails: its export has a fixed batch
    kube.apply(_mlp_manifest("2", name="broken", folder="3", convert={"tolerance": 1e-4}))
    jobs = wait_for(lambda: kube.get("jobs", selector="modelyard.dev/convert-for=mlp"),
                    timeout=30, what="the conversion Job")
    assert not kube.get("deployment", "mlp-v2"), "no canary before the package exists"
    assert kube.condition("mlp", "Converted")["reason"] == "Converting"  # type: ignore[index]

    def converted() -> dict[str, Any] | None:
        cond = kube.condition("mlp", "Converted")
        assert cond is None or cond["reason"] != "ConversionFailed", cond
        return cond if cond and cond["status"] == "True" else None

    wait_for(converted, timeout=400, interval=1, what="v2 converted")
    promoted = wait_for(lambda: (s := _md_status(kube)).get("stableVersion") == "2" and s,
                        timeout=120, what="v2 promoted")
    record = promoted["versions"][0]
    conversion = record["conversion"]
    package = cluster.models_dir / "mlp" / "2" / "aoti" / f"{conversion['artifactSha256']}.pt2"
    assert package.is_file(), "written next to the source, named by its digest"
    assert _sha256(package) == conversion["artifactSha256"]
    assert conversion["sourceSha256"] == _sha256(cluster.models_dir / "mlp" / "2" / "model.pt2")
    assert conversion["artifactUri"] == f"file:///models/mlp/2/aoti/{_sha256(package)}.pt2"
    assert conversion["accuracyDelta"] <= 1e-4
    assert conversion["speedup"] > 0
    assert conversion["job"] == jobs[0]["metadata"]["name"]
    assert (record["version"], record["phase"]) == ("2", "Stable")
    [pod] = kube.get("pods", selector="modelyard.dev/model-deployment=mlp,modelyard.dev/version=2")
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert env["MODELYARD_MODEL_FORMAT"] == "aoti"
    assert env["MODELYARD_MODEL_SHA256"] == _sha256(package)
    np.testing.assert_allclose(_mlp_answer(kube, "2"), _mlp_expected(), rtol=1e-4, atol=1e-5)
    reasons = [e["reason"] for e in kube.events("mlp")]
    assert "Converted" in reasons

    def failed() -> dict[str, Any] | None:
        cond = kube.condition("broken", "Converted")
        return cond if cond and cond["reason"] == "ConversionFailed" else None

    cond = wait_for(failed, timeout=60, interval=1, what="broken v2's conversion failed")
    assert "dynamic batch" in cond["message"], cond
    degraded = kube.condition("broken", "Degraded")
    assert degraded is not None
    assert degraded["reason"] == "ConversionFailed"
    after = _md_status(kube, "broken")
    assert after["stableVersion"] == "1"
    assert (after["versions"][0]["version"], after["versions"][0]["phase"]) == ("2", "Failed")
    assert "dynamic batch" in after["versions"][0]["reason"]
    assert not kube.get("deployment", "broken-v2")
    assert kube.condition("broken", "Ready")["status"] == "True"  # type: ignore[index]
    np.testing.assert_allclose(_mlp_answer(kube, "1", "broken"), _mlp_expected(), rtol=1e-4,
                               atol=1e-5)

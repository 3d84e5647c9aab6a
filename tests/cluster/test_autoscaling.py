"""The operator's autoscaler against real runtime processes: replicas follow live load
within bounds, go down when it stops, hold steady across an operator restart, and share
the total with a canary instead of fighting it."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import yaml
from support import Kube, as_operator, fresh_namespace, ready_endpoint_pods, wait_for
from test_real_pods import real_cluster  # noqa: F401 - the module's own real cluster

from modelyard.runtime.client import Client

TARGET_RPS = 4.0


class PacedLoad(threading.Thread):
    """``rps`` requests a second to the ready endpoints of the model's stable Service."""

    def __init__(self, kube: Kube, name: str, rps: float):
        super().__init__(daemon=True)
        self.kube, self.name, self.rps = kube, name, rps
        self.ok = self.failed = 0
        self.stop = threading.Event()

    def run(self) -> None:
        import numpy as np

        batch = np.zeros((1, 3, 32, 32), dtype=np.float32)
        targets: list[str] = []
        refreshed = 0.0
        turn = itertools.count()

        def one(ip: str) -> None:
            try:
                with Client(f"http://{ip}:8080", self.name, timeout=10) as client:
                    client.infer({"input": batch})
                self.ok += 1
            except Exception:
                self.failed += 1

        with ThreadPoolExecutor(8) as pool:
            next_at = time.monotonic()
            while not self.stop.is_set():
                if time.monotonic() - refreshed > 0.5:
                    targets = sorted(ready_endpoint_pods(self.kube, self.name))
                    refreshed = time.monotonic()
                if self.rps > 0 and targets:
                    pool.submit(one, targets[next(turn) % len(targets)])
                next_at += 1 / self.rps if self.rps > 0 else 0.1
                self.stop.wait(max(0.0, next_at - time.monotonic()))


class Replicas(threading.Thread):
    """Samples the replicas the model's Deployments ask for."""

    def __init__(self, kube: Kube, name: str):
        super().__init__(daemon=True)
        self.kube, self.name = kube, name
        self.seen: list[int] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            deps = self.kube.get("deployments",
                                 selector=f"modelyard.dev/model-deployment={self.name}") or []
            self.seen.append(sum(d["spec"]["replicas"] for d in deps))
            time.sleep(0.5)

    def direction_changes(self) -> int:
        steps = [b - a for a, b in itertools.pairwise(self.seen) if b != a]
        return sum(1 for a, b in itertools.pairwise(steps) if (a > 0) != (b > 0))


@pytest.fixture
def auto(real_cluster: Any) -> Iterator[Kube]:  # noqa: F811
    from modelyard.operator.runner import OperatorThread

    with fresh_namespace(real_cluster, "a") as namespace, as_operator(real_cluster), \
            OperatorThread():
        yield Kube(real_cluster, namespace)


def manifest(name: str, *, min_replicas: int, max_replicas: int = 4,
             rollout: dict[str, Any] | None = None, version: str = "1",
             scale_down_delay: int = 4) -> str:
    spec: dict[str, Any] = {
        "model": {"version": version, "uri": "file:///models/demo/1/model.pt"},
        "resources": {"gpu": {"count": 1}},
        "autoscaling": {"minReplicas": min_replicas, "maxReplicas": max_replicas,
                        "metric": "rps", "target": TARGET_RPS, "stableWindowSeconds": 10,
                        "scaleDownDelaySeconds": scale_down_delay,
                        "scaleToZeroDelaySeconds": 6},
    }
    if rollout:
        spec["rollout"] = rollout
    return yaml.safe_dump({"apiVersion": "modelyard.dev/v1alpha1", "kind": "ModelDeployment",
                           "metadata": {"name": name}, "spec": spec})


def scaler(kube: Kube, name: str) -> dict[str, Any]:
    return dict(((kube.get("md", name) or {}).get("status") or {}).get("autoscaler") or {})


def deployed(kube: Kube, name: str) -> int:
    deps = kube.get("deployments", selector=f"modelyard.dev/model-deployment={name}") or []
    return sum(d["spec"]["replicas"] for d in deps)


def test_replicas_follow_the_load_up_down_and_to_zero(auto: Kube) -> None:
    auto.apply(manifest("busy", min_replicas=1))
    wait_for(lambda: len(ready_endpoint_pods(auto, "busy")) == 1, timeout=120,
             what="one replica serving")
    sampler = Replicas(auto, "busy")
    sampler.start()
    load = PacedLoad(auto, "busy", rps=3 * TARGET_RPS)  # three replicas' worth
    load.start()
    wait_for(lambda: deployed(auto, "busy") >= 3, timeout=120, what="scaled up to the load")
    wait_for(lambda: len(ready_endpoint_pods(auto, "busy")) >= 3, timeout=120,
             what="the new replicas serving")
    status = scaler(auto, "busy")
    assert status["metric"] == "rps"
    assert status["desiredReplicas"] >= 3
    assert status["metricValue"] > 0
    assert "scaling up" in status["reason"]
    assert status["lastScaleTime"]
    load.stop.set()
    load.join()

    wait_for(lambda: deployed(auto, "busy") == 1, timeout=120, what="back to minReplicas")
    auto.run("patch", "md", "busy", "--type=merge", "-p",
             '{"spec": {"autoscaling": {"minReplicas": 0}}}')
    wait_for(lambda: deployed(auto, "busy") == 0, timeout=120, what="scaled to zero")
    wait_for(lambda: (auto.get("md", "busy")["status"].get("gpus"), auto.condition(
        "busy", "Ready")["reason"]) == (0, "ScaledToZero"), what="zero GPUs, ScaledToZero")
    sampler.stop.set()
    sampler.join()

    print(f"replicas seen: {sampler.seen}")
    assert max(sampler.seen) <= 4  # maxReplicas
    assert sampler.direction_changes() <= 1  # up, then down: no flapping
    assert load.failed == 0
    assert auto.get("md", "busy")["spec"]["autoscaling"]["maxReplicas"] == 4  # spec untouched
    scaled = [e for e in auto.events("busy") if e["reason"] == "Scaled"]
    assert len(scaled) >= 2, scaled


def test_a_restarted_operator_holds_replicas_under_steady_load(
        real_cluster: Any) -> None:  # noqa: F811
    from modelyard.operator.runner import OperatorThread

    with fresh_namespace(real_cluster, "a") as namespace, as_operator(real_cluster):
        kube = Kube(real_cluster, namespace)
        load = PacedLoad(kube, "steady", rps=2 * TARGET_RPS)
        with OperatorThread():
            # A long scale-down delay: a busy machine's dips in the load must not count.
            kube.apply(manifest("steady", min_replicas=1, max_replicas=8, scale_down_delay=120))
            wait_for(lambda: len(ready_endpoint_pods(kube, "steady")) == 1, timeout=120,
                     what="serving")
            load.start()
            wait_for(lambda: len(ready_endpoint_pods(kube, "steady"))
                     == deployed(kube, "steady") >= 2, timeout=120,
                     what="at least two replicas, all serving, for two replicas' worth of load")
            time.sleep(4)
        held = deployed(kube, "steady")
        sampler = Replicas(kube, "steady")
        sampler.start()
        with OperatorThread():
            time.sleep(15)  # longer than the stable window
        sampler.stop.set()
        sampler.join()
        load.stop.set()
        load.join()
        assert set(sampler.seen) == {held}, sampler.seen  # no jump to min or max
        assert load.failed == 0


def test_a_canary_splits_the_total_the_autoscaler_sets(auto: Kube) -> None:
    rollout = {"strategy": "Canary", "steps": [{"weight": 50}]}
    auto.apply(manifest("split", min_replicas=2, rollout=rollout))
    wait_for(lambda: len(ready_endpoint_pods(auto, "split")) == 2, timeout=120,
             what="two replicas serving")
    auto.apply(manifest("split", min_replicas=2, rollout=rollout, version="2"))
    wait_for(lambda: ((auto.get("md", "split") or {}).get("status", {}).get("canary") or {})
             .get("paused"), timeout=120, what="canary at 50%")
    load = PacedLoad(auto, "split", rps=4 * TARGET_RPS)
    load.start()
    wait_for(lambda: scaler(auto, "split").get("desiredReplicas") == 4, timeout=120,
             what="the autoscaler asking for 4")

    def split() -> dict[str, int]:
        return {d["metadata"]["name"]: d["spec"]["replicas"] for d in auto.get(
            "deployments", selector="modelyard.dev/model-deployment=split")}

    wait_for(lambda: split() == {"split-v1": 2, "split-v2": 2}, timeout=120,
             what="4 replicas split 2/2 at the 50% step")
    canary = auto.get("md", "split")["status"]["canary"]
    assert canary["step"] == 1  # the rollout did not restart
    assert canary["paused"] is True
    load.stop.set()
    load.join()
    assert load.failed == 0


def test_the_prometheus_source_drives_the_same_decisions(
        auto: Kube, real_cluster: Any) -> None:  # noqa: F811
    from modelyard.operator.devcluster.prometheus import LocalPrometheus, PrometheusConfig

    config = PrometheusConfig(scrape_interval_s=1, namespaces=(auto.namespace,))
    with LocalPrometheus(real_cluster, config=config) as prometheus:
        body = yaml.safe_load(manifest("queried", min_replicas=1))
        body["spec"]["autoscaling"] |= {"source": "prometheus",
                                        "prometheusUrl": prometheus.url}
        auto.apply(yaml.safe_dump(body))
        wait_for(lambda: len(ready_endpoint_pods(auto, "queried")) == 1, timeout=120,
                 what="one replica serving")
        load = PacedLoad(auto, "queried", rps=3 * TARGET_RPS)
        load.start()
        wait_for(lambda: deployed(auto, "queried") >= 3, timeout=180,
                 what="scaled up on Prometheus' figures")
        load.stop.set()
        load.join()
    status = scaler(auto, "queried")
    assert status["desiredReplicas"] >= 3
    assert "scaling up" in status["reason"]
    assert load.failed == 0

"""On a cluster with the Gateway API, a canary's traffic is split by HTTPRoute weights."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from support import Kube, as_operator, fresh_namespace, install_crd, wait_for

from modelyard.operator.devcluster import ClusterConfig, LocalCluster, NodePool


@pytest.fixture(scope="module")
def gateway_cluster() -> Iterator[LocalCluster]:
    pools = (NodePool("gpu-h100", count=1, gpus=8, gpu_product="NVIDIA-H100-80GB-HBM3"),)
    with LocalCluster(ClusterConfig(topology=pools, gateway_api=True)) as local:
        install_crd(local)
        yield local


@pytest.fixture
def gw(gateway_cluster: LocalCluster) -> Iterator[Kube]:
    from modelyard.operator.runner import OperatorThread

    with fresh_namespace(gateway_cluster, "gw") as namespace, as_operator(gateway_cluster), \
            OperatorThread():
        yield Kube(gateway_cluster, namespace)


def manifest(version: str) -> str:
    return yaml.safe_dump({
        "apiVersion": "modelyard.dev/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": "routed"},
        "spec": {
            "model": {"version": version, "uri": f"s3://models/routed/{version}/model.pt"},
            "resources": {"gpu": {"count": 1}}, "replicas": 4,
            "gateway": {"name": "inference", "sectionName": "http"},
            "rollout": {"strategy": "Canary",
                        "steps": [{"weight": 25, "pauseSeconds": 2}, {"weight": 50}]},
        },
    })


def weights(kube: Kube) -> dict[str, int]:
    route = kube.get("httproute", "routed") or {}
    refs = (route.get("spec", {}).get("rules") or [{}])[0].get("backendRefs", [])
    return {ref["name"]: ref["weight"] for ref in refs}


def test_canary_weights_move_on_the_httproute(gw: Kube) -> None:
    gw.apply(manifest("1"))
    wait_for(lambda: (gw.get("md", "routed") or {}).get("status", {}).get("readyReplicas") == 4,
             what="v1 ready")
    route = gw.get("httproute", "routed")
    assert route["spec"]["parentRefs"] == [{"group": "gateway.networking.k8s.io",
                                            "kind": "Gateway", "name": "inference",
                                            "sectionName": "http"}]
    assert route["metadata"]["ownerReferences"][0]["kind"] == "ModelDeployment"
    assert weights(gw) == {"routed-v1": 100}
    assert gw.get("md", "routed")["status"]["trafficSplit"] == "gateway"

    seen: list[dict[str, int]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            seen.append(weights(gw))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    gw.apply(manifest("2"))
    wait_for(lambda: ((gw.get("md", "routed") or {}).get("status", {}).get("canary") or {})
             .get("paused"), timeout=60, what="paused at 50%")
    assert weights(gw) == {"routed-v1": 50, "routed-v2": 50}
    gw.run("annotate", "md", "routed", "modelyard.dev/promote=2")
    wait_for(lambda: weights(gw) == {"routed-v2": 100}, timeout=60, what="all on v2")
    stop.set()
    sampler.join()

    canary_weights = [w.get("routed-v2", 0) for w in seen]
    assert 25 in canary_weights  # the first step was held at its weight
    assert canary_weights == sorted(canary_weights)  # never moved back
    assert all(sum(w.values()) == 100 for w in seen if w)
    for backends in seen:  # every backend is a Service that exists... or did, when sampled
        assert set(backends) <= {"routed-v1", "routed-v2"}
    assert gw.get("service", "routed-v2") is not None


def test_without_the_gateway_api_status_says_replica_ratio(kube: Kube, operator: Any) -> None:
    kube.apply(manifest("1").replace("name: routed", "name: plain", 1))
    wait_for(lambda: (kube.get("md", "plain") or {}).get("status", {}).get("trafficSplit")
             == "replicas", what="trafficSplit reported")
    assert kube.run("get", "httproute", check=False).returncode != 0  # no such API here

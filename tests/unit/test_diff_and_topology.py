"""Apply decisions without API calls, and the simulated node topology."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelyard.operator import api, diff, render
from modelyard.operator.devcluster import topology


def _desired() -> dict:  # type: ignore[type-arg]
    s = api.parse_spec({"model": {"version": "1", "uri": "s3://b/k"},
                        "resources": {"cpu": "0.5", "memory": "1Gi"}})
    return render.render_deployment(render.Owner("m", "ns", "u"), s, 2)


def test_missing_or_changed_objects_need_an_apply() -> None:
    desired = _desired()
    assert diff.needs_apply(desired, None)
    other = dict(desired, metadata={"annotations": {render.HASH_ANNOTATION: "old"}})
    assert diff.needs_apply(desired, other)


def test_server_defaults_and_quantity_rewrites_are_not_drift() -> None:
    desired = _desired()
    import copy

    live = copy.deepcopy(desired)
    live["spec"]["progressDeadlineSeconds"] = 600  # a server default we never set
    container = live["spec"]["template"]["spec"]["containers"][0]
    container["resources"]["limits"]["cpu"] = "500m"  # the API server's spelling of 0.5
    container["terminationMessagePath"] = "/dev/termination-log"
    assert not diff.needs_apply(desired, live)
    live["spec"]["replicas"] = 5  # a hand edit
    assert diff.needs_apply(desired, live)


def test_default_topology_matches_the_brief() -> None:
    nodes = topology.node_manifests(topology.DEFAULT_TOPOLOGY, lambda i: f"10.9.{i}.0/24")
    gpu = [n for n in nodes if "nvidia.com/gpu" in n["status"]["capacity"]]
    h100 = [n for n in gpu if n["metadata"]["labels"]["nvidia.com/gpu.product"]
            == "NVIDIA-H100-80GB-HBM3"]
    assert len(h100) == 2
    assert all(n["status"]["capacity"]["nvidia.com/gpu"] == "8" for n in h100)
    assert all(n["spec"]["taints"] == [topology.GPU_TAINT] for n in gpu)
    cpu = [n for n in nodes if n not in gpu]
    assert len(cpu) == 1
    assert cpu[0]["spec"]["taints"] == []
    cidrs = [n["spec"]["podCIDR"] for n in nodes]
    assert len(set(cidrs)) == len(nodes)
    assert cidrs == [f"10.9.{i}.0/24" for i in range(len(nodes))]


def test_topology_file(tmp_path: Path) -> None:
    path = tmp_path / "pools.yaml"
    path.write_text("pools:\n- {name: a100, count: 3, gpus: 4, gpuProduct: NVIDIA-A100}\n")
    [pool] = topology.load_topology(path)
    assert pool.count == 3
    assert pool.gpu_product == "NVIDIA-A100"
    path.write_text("pools:\n- {name: bad, gpus: 2}\n")
    with pytest.raises(ValueError, match="needs gpu_product"):
        topology.load_topology(path)
    path.write_text("pools:\n- {name: bad, colour: red}\n")
    with pytest.raises(ValueError, match="colour"):
        topology.load_topology(path)

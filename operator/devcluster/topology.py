"""The simulated nodes of the local cluster: pure data, no client.

A topology is a list of node pools. Each pool becomes ``count`` Node objects that
kwok manages (annotation ``kwok.x-k8s.io/node=fake``), labelled and tainted the way
GPU Operator / GPU feature discovery label real GPU pools:

* ``nvidia.com/gpu.product``, ``nvidia.com/gpu.count``, ``nvidia.com/gpu.present``
* taint ``nvidia.com/gpu=present:NoSchedule`` on GPU nodes, so only pods that
  tolerate it land there.

Node *i* gets ``spec.podCIDR`` from the caller's ``pod_cidr(i)`` (the cluster passes its
private pod network's /24 for that node, see ``podnet.py``), and kwok hands the node's
pods addresses from it.

Used by :mod:`.cluster`; the pool file format is what ``modelyard dev cluster
--topology FILE`` reads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
GPU_TAINT = {"key": GPU_RESOURCE, "value": "present", "effect": "NoSchedule"}
KWOK_ANNOTATION = ("kwok.x-k8s.io/node", "fake")
POOL_LABEL = "modelyard.dev/pool"
MAX_NODES = 128  # one /24 of the pod network's /16 per node, the upper half spare


@dataclass(frozen=True)
class NodePool:
    """``count`` identical nodes named ``<name>-0``, ``<name>-1``, ..."""

    name: str
    count: int = 1
    gpus: int = 0
    gpu_product: str | None = None
    cpu: str = "32"
    memory: str = "256Gi"
    pods: int = 110
    labels: dict[str, str] = field(default_factory=dict)
    taints: tuple[dict[str, str], ...] | None = None  # None: the GPU taint on GPU pools

    def __post_init__(self) -> None:
        if self.count < 0 or self.gpus < 0:
            raise ValueError(f"node pool {self.name!r}: count and gpus must be >= 0")
        if self.gpus and not self.gpu_product:
            raise ValueError(f"node pool {self.name!r}: a GPU pool needs gpu_product")


DEFAULT_TOPOLOGY: tuple[NodePool, ...] = (
    NodePool("gpu-h100", count=2, gpus=8, gpu_product="NVIDIA-H100-80GB-HBM3",
             cpu="96", memory="1Ti"),
    NodePool("gpu-l4", count=1, gpus=4, gpu_product="NVIDIA-L4", cpu="48", memory="192Gi"),
    NodePool("cpu", count=1, cpu="32", memory="128Gi"),
)


def load_topology(path: Path) -> tuple[NodePool, ...]:
    """Read pools from YAML: ``pools: [{name, count, gpus, gpuProduct, cpu, memory}]``."""
    raw = yaml.safe_load(path.read_text()) or {}
    pools = raw.get("pools") if isinstance(raw, dict) else raw
    if not isinstance(pools, list) or not pools:
        raise ValueError(f"{path}: expected a non-empty list under 'pools'")
    renames = {"gpuProduct": "gpu_product"}
    result = []
    for item in pools:
        if not isinstance(item, dict):
            raise ValueError(f"{path}: each pool must be a mapping, got {item!r}")
        kwargs: dict[str, Any] = {renames.get(str(k), str(k)): v for k, v in item.items()}
        if "taints" in kwargs:
            kwargs["taints"] = tuple(kwargs["taints"])
        try:
            result.append(NodePool(**kwargs))
        except TypeError as exc:
            raise ValueError(f"{path}: pool {item.get('name')!r}: {exc}") from None
    return tuple(result)


def node_manifests(pools: Sequence[NodePool],
                   pod_cidr: Callable[[int], str]) -> list[dict[str, Any]]:
    """The Node objects for ``pools``, in a stable order; node *i* gets ``pod_cidr(i)``."""
    expanded = list(_expand(pools))
    if len(expanded) > MAX_NODES:
        raise ValueError(f"at most {MAX_NODES} nodes are supported, topology has "
                         f"{len(expanded)}")
    return [_node(pool, f"{pool.name}-{i}", pod_cidr(index))
            for index, (pool, i) in enumerate(expanded)]


def _expand(pools: Iterable[NodePool]) -> Iterable[tuple[NodePool, int]]:
    for pool in pools:
        for i in range(pool.count):
            yield pool, i


def _node(pool: NodePool, name: str, pod_cidr: str) -> dict[str, Any]:
    labels = {
        "type": "kwok",
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        POOL_LABEL: pool.name,
        **pool.labels,
    }
    capacity: dict[str, str] = {"cpu": pool.cpu, "memory": pool.memory, "pods": str(pool.pods)}
    taints = list(pool.taints) if pool.taints is not None else []
    if pool.gpus:
        assert pool.gpu_product is not None  # checked in NodePool
        labels |= {
            GPU_PRODUCT_LABEL: pool.gpu_product,
            "nvidia.com/gpu.count": str(pool.gpus),
            "nvidia.com/gpu.present": "true",
        }
        capacity[GPU_RESOURCE] = str(pool.gpus)
        if pool.taints is None:
            taints = [dict(GPU_TAINT)]
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": labels,
            "annotations": {KWOK_ANNOTATION[0]: KWOK_ANNOTATION[1]},
        },
        "spec": {"podCIDR": pod_cidr, "podCIDRs": [pod_cidr], "taints": taints},
        "status": {"capacity": capacity, "allocatable": dict(capacity)},
    }

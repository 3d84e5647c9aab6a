"""A local Kubernetes control plane with simulated GPU nodes, for tests and demos.

``LocalCluster`` runs real upstream etcd, kube-apiserver, kube-controller-manager and
kube-scheduler, plus kwok for the nodes and pod lifecycles, built once from pinned
releases (``binaries``). ``topology`` describes the nodes. ``modelyard dev`` and the
pytest fixtures are the callers.
"""

from .binaries import KUBERNETES_VERSION, KWOK_VERSION, Binaries, BuildError, ensure_binaries
from .cluster import ClusterConfig, ClusterStartError, LocalCluster
from .topology import DEFAULT_TOPOLOGY, GPU_PRODUCT_LABEL, GPU_RESOURCE, NodePool, load_topology

__all__ = [
    "DEFAULT_TOPOLOGY",
    "GPU_PRODUCT_LABEL",
    "GPU_RESOURCE",
    "KUBERNETES_VERSION",
    "KWOK_VERSION",
    "Binaries",
    "BuildError",
    "ClusterConfig",
    "ClusterStartError",
    "LocalCluster",
    "NodePool",
    "ensure_binaries",
    "load_topology",
]

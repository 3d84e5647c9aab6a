"""A local cluster with one real node (containerd + kubelet + kube-proxy) beside the kwok
GPU nodes, for the tests that run our images for real.

Nothing slow is built here: ``modelyard build-node`` (the set-up step of ``make test``)
builds the node's binaries and images, keyed by the source they come from. When they are
missing the fixture fails at once, naming that command.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from nodesupport import JOURNEY_TIMINGS
from support import install_crd


def real_node_topology() -> tuple[Any, ...]:
    """The kwok GPU pools only (tainted): a pod that tolerates nothing lands on the real node."""
    from modelyard.operator.devcluster import DEFAULT_TOPOLOGY

    return tuple(pool for pool in DEFAULT_TOPOLOGY if pool.gpus)


@pytest.fixture(scope="session")
def node_artefacts() -> Any:
    from modelyard.operator.devcluster.nodeartefacts import (
        NodeArtefactsMissing,
        find_node_artefacts,
    )

    try:
        return find_node_artefacts()
    except NodeArtefactsMissing as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def real_cluster(node_artefacts: Any) -> Iterator[Any]:
    from modelyard.operator.devcluster import ClusterConfig, LocalCluster

    config = ClusterConfig(topology=real_node_topology(), real_nodes=1)
    with LocalCluster(config) as local:
        install_crd(local)
        yield local


@pytest.fixture(scope="session")
def real_node(real_cluster: Any) -> Any:
    return real_cluster.real_nodes[0]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[None]:
    """The journey's timings so far ride on each of its reports: under pytest-xdist the
    summary is printed by the controller, which sees reports, not the worker's stash."""
    outcome = yield
    timings = item.config.stash.get(JOURNEY_TIMINGS, None)
    if timings and call.when == "call":
        outcome.get_result().user_properties.append(("journey timings", dict(timings)))

"""The local cluster itself: starts from cached binaries, stops without a trace, and
says which component failed when one does."""

from __future__ import annotations

import os
import socket
import subprocess
from typing import Any

import pytest

from modelyard.operator.devcluster import (
    ClusterConfig,
    ClusterStartError,
    LocalCluster,
    NodePool,
    ensure_binaries,
)


@pytest.fixture(scope="module")
def binaries() -> Any:
    return ensure_binaries()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _port_free(port: int) -> bool:
    """Nothing listens there: a server (which sets SO_REUSEADDR) could take it now."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_custom_topology_then_clean_teardown(binaries: Any) -> None:
    pools = (NodePool("a100", count=1, gpus=4, gpu_product="NVIDIA-A100-SXM4-80GB"),)
    local = LocalCluster(ClusterConfig(topology=pools), binaries=binaries)
    local.start()
    try:
        nodes = local.kubectl("get", "nodes", "-o", "name").stdout.split()
        assert nodes == ["node/a100-0"]
        gpus = local.kubectl("get", "node", "a100-0", "-o",
                             "jsonpath={.status.allocatable.nvidia\\.com/gpu}").stdout
        assert gpus == "4"
        pids = [c.process.pid for c in local._components if c.process]
        assert len(pids) == 5  # etcd, apiserver, controller-manager, scheduler, kwok
        ports = list(local.ports.values())
        assert local.started_in_s is not None
        assert local.pod_network is not None
        netns, link = local.pod_network.namespace, local.pod_network.host_link
        assert local.kubectl("get", "node", "a100-0", "-o", "jsonpath={.spec.podCIDR}").stdout \
            == local.pod_network.node_cidr(0)
        assert netns in _netns()
    finally:
        local.stop()
    assert not any(_alive(pid) for pid in pids)
    assert all(_port_free(p) for p in ports)
    assert not local.data_dir.exists()
    assert netns not in _netns()  # the pod network, its link and route are gone too
    shown = subprocess.run(["ip", "link", "show", link], capture_output=True, check=False)
    assert shown.returncode != 0


def _netns() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                         check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def test_a_component_that_fails_is_named_with_its_log(binaries: Any) -> None:
    local = LocalCluster(ClusterConfig(extra_apiserver_args=["--no-such-flag=1"],
                                       start_timeout_s=20), binaries=binaries)
    with pytest.raises(ClusterStartError) as failure:
        local.start()
    message = str(failure.value)
    assert "kube-apiserver exited" in message
    assert "unknown flag: --no-such-flag" in message  # the component's own log
    assert not local.data_dir.exists()  # etcd was stopped and its data removed


def test_binaries_are_cached_by_version(binaries: Any) -> None:
    assert ensure_binaries() == binaries
    assert binaries.is_complete()
    assert "k8s-v1.37.2" in str(binaries.root)


def test_nodes_keep_renewing_their_leases(cluster: Any) -> None:
    """Without lease renewals the node-lifecycle controller would declare the simulated
    nodes dead after its grace period and mark every pod on them unready."""
    import json

    leases = json.loads(cluster.kubectl("get", "leases", "-n", "kube-node-lease",
                                        "-o", "json").stdout)["items"]
    names = {lease["metadata"]["name"] for lease in leases}
    assert names == {"gpu-h100-0", "gpu-h100-1", "gpu-l4-0", "cpu-0"}
    assert all(lease["spec"]["leaseDurationSeconds"] == 40 for lease in leases)

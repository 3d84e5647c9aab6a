"""Stopping a real node leaves nothing of it on this machine: processes, mounts, network
namespaces, links and routes, CNI bridges and iptables chains, cgroups, files."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import wait_for

from modelyard.operator.devcluster import realnode

pytestmark = [pytest.mark.realnode, pytest.mark.cluster]


def _out(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=False).stdout


def _running_since(pid: str) -> str | None:
    """A live (not zombie) process's start time, which tells it from a later one given the
    same pid; None once it is gone or only waits to be reaped."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def _sysctls() -> dict[str, str]:
    return {k: Path(f"/proc/sys/{k}").read_text().strip() for k in realnode.KUBELET_SYSCTLS}


def test_a_stopped_node_leaves_nothing_behind(real_cluster: Any) -> None:
    before = _sysctls()
    images = real_cluster.real_node_images
    node = real_cluster.add_real_node("real-teardown", images=[images.pause])
    try:
        _run_a_pod_and_stop(real_cluster, node, images, before)
    finally:  # whatever failed, the other tests' pods never land on this node
        node.stop()
        real_cluster.kubectl("delete", "pod", "sleeper", "--force", "--grace-period=0",
                             check=False)
        real_cluster.kubectl("delete", "node", "real-teardown", check=False)


def _run_a_pod_and_stop(real_cluster: Any, node: Any, images: Any,
                        before: dict[str, str]) -> None:
    # It holds only the pause image: the pods other tests schedule onto real nodes by label
    # must not land here. Cordoning leaves `nodeName` pods (below) alone.
    real_cluster.kubectl("cordon", node.name)
    layout = node.layout
    assert layout is not None
    assert _sysctls() == before  # the kubelet saw its values, the machine kept its own

    # A running pod (the pause image, as a container) gives it containers, a sandbox, a
    # pod network namespace, a CNI bridge and veth, masquerade chains, mounts, cgroups.
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "sleeper", "namespace": "default"},
           "spec": {"nodeName": node.name, "terminationGracePeriodSeconds": 0,
                    "containers": [{"name": "c", "image": images.pause.name}]}}
    real_cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(pod))
    wait_for(lambda: json.loads(real_cluster.kubectl("get", "pod", "sleeper", "-o", "json")
                                .stdout)["status"].get("phase") == "Running",
             timeout=60, what="the pod to run on the node")
    ns = f"modelyard-node-{layout.block}"
    inside = _out("ip", "netns", "pids", ns).split()
    assert inside  # containerd, its shims, kubelet, kube-proxy
    assert "cni0" in _out("ip", "-n", ns, "link", "show")
    assert "CNI-" in _out("ip", "netns", "exec", ns, "iptables-save")
    # kube-proxy writes its chains on its first sync, which may come after the pod runs.
    wait_for(lambda: "KUBE-SERVICES" in _out("ip", "netns", "exec", ns, "iptables-save"),
             timeout=60, what="kube-proxy's chains in the node's namespace")
    cgroup = Path("/sys/fs/cgroup/memory") / layout.cgroup_root.strip("/")
    pod_pids = [p for procs in cgroup.rglob("cgroup.procs") for p in procs.read_text().split()]
    assert pod_pids

    started = {pid: _running_since(pid) for pid in [*inside, *pod_pids]}
    node.stop()

    alive = [pid for pid, began in started.items() if _running_since(pid) == began]
    assert not alive, [_out("ps", "-o", "pid,stat,args", "-p", pid) for pid in alive]
    assert ns not in _out("ip", "netns", "list")
    assert f"mynode{layout.block}" not in _out("ip", "link", "show")
    assert layout.pod_cidr not in _out("ip", "route", "show")
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(layout.run) not in mounts
    assert str(layout.data) not in mounts
    assert not layout.run.exists()
    assert not layout.data.exists()
    for hierarchy in Path("/sys/fs/cgroup").iterdir():
        assert not (hierarchy / layout.cgroup_root.strip("/")).exists(), hierarchy
    host_rules = _out("iptables-save")
    assert layout.pod_cidr not in host_rules
    assert "KUBE-" not in host_rules  # kube-proxy's chains were the namespace's own
    assert _sysctls() == before

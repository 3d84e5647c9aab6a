"""Helpers for tests that drive the local cluster the way a user would (kubectl)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[1]
CRD_PATH = ROOT / "crds" / "modeldeployments.modelyard.dev.yaml"


def install_crd(cluster: Any) -> None:
    """The committed CRD file (what a user applies), not the one generated in memory."""
    cluster.install_crd(CRD_PATH.read_text())


@contextlib.contextmanager
def real_pod_cluster(state: Path) -> Iterator[Any]:
    """A local cluster whose model pods are real runtime processes (one 8-GPU H100 node),
    serving the demo model built at ``<state>/models/demo/1/model.pt``
    (``file:///models/demo/1/model.pt`` in a spec), with the CRD installed. It is the
    legacy TorchScript file, the format a spec gets when it names none: the cluster tests'
    manifests leave ``format`` out, and so keep the legacy path tested end to end. The cluster
    carries ``models_dir`` and ``pods`` (the stand-in kubelet, :class:`PodProcesses`)."""
    from modelyard.operator.devcluster import ClusterConfig, LocalCluster, NodePool
    from modelyard.operator.devcluster.pods import PodProcesses
    from modelyard.runtime.demo import build

    pools = (NodePool("gpu-h100", count=1, gpus=8, gpu_product="NVIDIA-H100-80GB-HBM3"),)
    models = state / "models"
    build(models / "demo" / "1" / "model.pt", size=32, classes=10, format="torchscript")
    with LocalCluster(ClusterConfig(topology=pools, real_pods=True)) as local:
        install_crd(local)
        pods = PodProcesses(local, models_dir=models, log_dir=state / "pods", max_backoff_s=2)
        pods.start()
        local.models_dir = models  # type: ignore[attr-defined]
        local.pods = pods  # type: ignore[attr-defined]
        try:
            yield local
        finally:
            pods.stop()


def fresh_namespace(cluster: Any, prefix: str = "t") -> contextlib.AbstractContextManager[str]:
    return cluster.fresh_namespace(prefix)


def as_operator(cluster: Any) -> contextlib.AbstractContextManager[str]:
    return cluster.as_operator()


def wait_for(check: Callable[[], T], timeout: float = 60.0, interval: float = 0.25,
             what: str = "condition") -> T:
    """Poll ``check`` until it returns something truthy; fail with the last value seen."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; last: {last!r}")


def ready_endpoints(kube: Kube, service: str) -> list[str]:
    """The ready addresses behind ``service``, from its EndpointSlices (what kube-proxy
    would route to)."""
    return sorted(ready_endpoint_pods(kube, service))


def ready_endpoint_pods(kube: Kube, service: str) -> dict[str, str]:
    """address -> pod name of the ready endpoints behind ``service``."""
    slices = kube.get("endpointslices", selector=f"kubernetes.io/service-name={service}") or []
    return {address: (e.get("targetRef") or {}).get("name", "")
            for s in slices for e in s.get("endpoints") or []
            if (e.get("conditions") or {}).get("ready") for address in e["addresses"]}


class Kube:
    """kubectl against the test cluster, as a user would type it."""

    def __init__(self, cluster: Any, namespace: str):
        self.cluster = cluster
        self.namespace = namespace

    def run(self, *args: str, input: str | None = None, check: bool = True) -> Any:
        return self.cluster.kubectl("-n", self.namespace, *args, input=input, check=check)

    def apply(self, manifest: str, check: bool = True) -> Any:
        return self.run("apply", "-f", "-", input=manifest, check=check)

    def get(self, kind: str, name: str | None = None, selector: str | None = None) -> Any:
        args = ["get", kind, "-o", "json"]
        if name:
            args.insert(2, name)
        if selector:
            args += ["-l", selector]
        proc = self.run(*args, check=False)
        if proc.returncode != 0:
            if "NotFound" in proc.stderr:
                return None
            raise AssertionError(proc.stderr)
        data = json.loads(proc.stdout)
        return data["items"] if name is None else data

    def condition(self, name: str, kind: str) -> dict[str, Any] | None:
        md = self.get("md", name)
        for cond in (md or {}).get("status", {}).get("conditions", []):
            if cond["type"] == kind:
                return dict(cond)
        return None

    def events(self, name: str) -> list[dict[str, Any]]:
        items = self.get("events") or []
        return [e for e in items if e["involvedObject"].get("name") == name]




def activator_service(kube: Kube, host: str, port: int, admin: int) -> None:
    """A Service ``activator`` in ``kube``'s namespace leading to an activator process at
    ``host`` (proxy ``port``, ``admin`` port), as the chart's Service leads to its pods."""
    kube.apply(yaml.safe_dump_all([
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "activator"},
         "spec": {"ports": [{"name": "http", "port": 80}, {"name": "admin", "port": 9090}]}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": "activator-1", "labels": {
             "kubernetes.io/service-name": "activator",
             "endpointslice.kubernetes.io/managed-by": "test"}},
         "addressType": "IPv4",
         "endpoints": [{"addresses": [host], "conditions": {"ready": True}}],
         "ports": [{"name": "http", "port": port}, {"name": "admin", "port": admin}]},
    ]))


@contextlib.contextmanager
def moto_s3(address: str, log: Path) -> Iterator[str]:
    """moto's standalone S3-compatible server on ``address``, its output in ``log``: its
    endpoint URL (``AWS_ENDPOINT_URL``)."""
    moto = shutil.which("moto_server", path=os.path.dirname(sys.executable))
    if moto is None:  # `make test` installs the dev extra: a missing server is a broken setup
        import pytest

        pytest.fail("moto[server] is not installed: run scripts/bootstrap (dev extra)")
    with socket.socket() as probe:
        probe.bind((address, 0))
        port = probe.getsockname()[1]
    with log.open("wb") as out:
        process = subprocess.Popen([moto, "-H", address, "-p", str(port)], stdout=out,
                                   stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 30
            while True:
                with contextlib.suppress(OSError), socket.create_connection((address, port), 1):
                    break
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"moto_server did not listen: {log.read_text()}")
                time.sleep(0.1)
            yield f"http://{address}:{port}"
        finally:
            process.terminate()
            process.wait(timeout=10)

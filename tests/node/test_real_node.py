"""A real node in the local cluster runs our images, as a user's cluster would.

The node (containerd v2.4.2, the kubelet and kube-proxy of the control plane's release)
registers beside the kwok GPU nodes; the runtime image serves a model in a namespace that
enforces the ``restricted`` Pod Security level and goes Ready by the kubelet's own probe;
the operator image's entrypoints start as the chart runs them.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from nodesupport import NODE_SELECTOR, kube_json, restricted_namespace, serve_file
from support import fresh_namespace, wait_for

from modelyard.operator import api, render
from modelyard.operator.devcluster.binaries import KUBERNETES_VERSION
from modelyard.operator.devcluster.nodebinaries import CONTAINERD_VERSION

pytestmark = [pytest.mark.realnode, pytest.mark.cluster]
CHART = Path(__file__).resolve().parents[2] / "charts" / "modelyard"

def test_real_node_registers_ready_without_gpus(real_cluster: Any, real_node: Any) -> None:
    node = kube_json(real_cluster, "get", "node", real_node.name)
    ready = next(c for c in node["status"]["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True", ready
    assert node["metadata"]["labels"]["modelyard.dev/node"] == "real"
    info = node["status"]["nodeInfo"]
    assert info["kubeletVersion"] == f"v{KUBERNETES_VERSION}"
    assert info["kubeProxyVersion"] in ("", f"v{KUBERNETES_VERSION}")
    assert info["containerRuntimeVersion"] == f"containerd://{CONTAINERD_VERSION}"
    addresses = {a["type"]: a["address"] for a in node["status"]["addresses"]}
    assert addresses["InternalIP"] == real_node.layout.node_ip
    assert not addresses["InternalIP"].startswith("127.")
    assert "nvidia.com/gpu" not in node["status"]["allocatable"]
    assert not node["spec"].get("taints")
    # It sits beside the kwok GPU nodes, which stay simulated.
    kwok = kube_json(real_cluster, "get", "nodes", "-l", "nvidia.com/gpu.present=true")["items"]
    assert kwok
    assert all(n["metadata"]["annotations"].get("kwok.x-k8s.io/node") == "fake"
                        for n in kwok)
    assert real_node.started_in_s is not None


def test_runtime_image_serves_in_arestricted_namespace(real_cluster: Any, real_node: Any,
                                                        tmp_path: Path) -> None:
    import torch

    model = torch.jit.script(torch.nn.Linear(4, 2).eval())
    model_file = tmp_path / "model.pt"
    torch.jit.save(model, str(model_file))
    images = real_cluster.real_node_images
    with (restricted_namespace(real_cluster) as namespace,
          serve_file(model_file, real_node.layout.host_ip) as url):
        spec = api.ModelDeploymentSpec.model_validate({
            "model": {"version": "1", "uri": url, "format": "torchscript"},
            "runtime": {"image": images.runtime.name, "batching": {"maxBatchSize": 4}},
            "resources": {"cpu": "500m", "memory": "2Gi"},
            "scheduling": {"nodeSelector": NODE_SELECTOR},
            "replicas": 1,
        })
        owner = render.Owner("tiny", namespace, str(uuid.uuid4()))
        deployment = render.render_deployment(owner, spec, replicas=1)
        deployment["metadata"].pop("ownerReferences")  # no ModelDeployment object here
        # JSON: PyYAML leaves a spec hash like 1234e56789012345 unquoted, a number to kubectl
        created = real_cluster.kubectl("apply", "-f", "-", input=json.dumps(deployment),
                                       check=False)
        assert created.returncode == 0, created.stderr  # admitted under `restricted`
        assert "Warning" not in created.stderr, created.stderr
        name = deployment["metadata"]["name"]
        _rolled_out(real_cluster, real_node, f"deployment/{name}", namespace)

        pod = kube_json(real_cluster, "get", "pods", "-n", namespace, "-l",
                    render.selector_string("tiny"))["items"][0]
        assert pod["spec"]["nodeName"] == real_node.name
        started = next(c for c in pod["status"]["conditions"] if c["type"] == "Ready")
        assert started["status"] == "True"

        def sh(script: str) -> str:
            return str(real_cluster.kubectl("exec", "-n", namespace, pod["metadata"]["name"],
                                            "--", "sh", "-c", script).stdout.strip())

        assert sh("id -u; id -g") == "10001\n10001"
        assert sh("touch /x 2>&1 || echo read-only").endswith("read-only")
        assert sh("touch /tmp/x && echo writable") == "writable"
        assert "tmpfs" in sh("grep ' /tmp ' /proc/mounts")
        status = dict(line.split(":\t", 1) for line in sh("cat /proc/1/status").splitlines()
                      if ":\t" in line)
        assert int(status["CapEff"], 16) == 0
        assert status["Seccomp"].strip() == "2"  # filtered: RuntimeDefault
        assert status["NoNewPrivs"].strip() == "1"
        assert sh("ulimit -n") == "20000"

        _answers(pod["status"]["podIP"], "tiny", model)


def _chart_daemonset(cache: render.NodeCache, operator_image: str, tmp_path: Path) -> Any:
    """The chart's node-cache DaemonSet with ``nodeCache`` on at ``cache.path``, on the
    real node, in the operator image."""
    from modelyard.operator.devcluster.helm import ensure_helm

    repository, tag = operator_image.rsplit(":", 1)
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({
        "image": {"repository": repository, "tag": tag},
        "nodeCache": {"enabled": True, "path": cache.path, "nodeSelector": NODE_SELECTOR}}))
    rendered = ensure_helm().run("template", "cached", str(CHART), f"--values={values}",
                                 home=tmp_path / "helm-home")
    [daemonset] = [o for o in yaml.safe_load_all(rendered.stdout)
                   if o and o["kind"] == "DaemonSet"]
    return daemonset


def _answers(address: str, name: str, model: Any) -> None:
    """A real inference, from this machine straight to the pod's address."""
    import torch

    body = {"inputs": [{"name": "input", "shape": [4], "datatype": "FP32",
                        "data": [1.0, 2.0, 3.0, 4.0]}]}
    reply = httpx.post(f"http://{address}:8080/v2/models/{name}/infer", json=body, timeout=30)
    assert reply.status_code == 200, reply.text
    expected = model(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))[0].tolist()
    assert reply.json()["outputs"][0]["data"] == pytest.approx(expected, rel=1e-5)


def _rolled_out(cluster: Any, node: Any, what: str, namespace: str) -> None:
    waited = cluster.kubectl("rollout", "status", what, "-n", namespace, "--timeout=240s",
                             check=False, timeout=260)
    assert waited.returncode == 0, (waited.stderr, node.log_tail("kubelet"))


def test_two_pods_on_the_node_share_its_model_cache_in_a_restricted_namespace(
        real_cluster: Any, real_node: Any, tmp_path: Path) -> None:
    """The chart's nodeCache: its DaemonSet (the operator image) prepares the directory on
    the real node; the model's two pods reach it through the claim the operator keeps in
    their namespace (applied here as the operator applies it), admitted under
    ``restricted``; the store sees one download, and the file is in the node's cache."""
    import torch

    model = torch.jit.script(torch.nn.Linear(4, 2).eval())
    model_file = tmp_path / "model.pt"
    torch.jit.save(model, str(model_file))
    images = real_cluster.real_node_images
    cache = render.NodeCache(str(real_node.layout.data / "model-cache"), 2**30)
    daemonset = _chart_daemonset(cache, images.operator.name, tmp_path)
    gets: list[str] = []
    with (fresh_namespace(real_cluster, "cache") as prepares,  # privileged: no PSA label
          restricted_namespace(real_cluster) as namespace,
          serve_file(model_file, real_node.layout.host_ip, gets) as url):
        daemonset["metadata"]["namespace"] = prepares
        real_cluster.kubectl("apply", "-f", "-", input=json.dumps(daemonset))
        _rolled_out(real_cluster, real_node, f"daemonset/{daemonset['metadata']['name']}",
                    prepares)
        volume, claim = cache.claim(namespace)
        real_cluster.kubectl("apply", "-f", "-", input=json.dumps(volume))
        try:
            real_cluster.kubectl("apply", "-f", "-", input=json.dumps(claim))
            spec = api.ModelDeploymentSpec.model_validate({
                "model": {"version": "1", "uri": url, "format": "torchscript"},
                "runtime": {"image": images.runtime.name},
                "resources": {"cpu": "250m", "memory": "1Gi"},
                "scheduling": {"nodeSelector": NODE_SELECTOR},
                "replicas": 2,
            })
            deployment = render.render_deployment(
                render.Owner("shared", namespace, str(uuid.uuid4())), spec, 2, cache)
            deployment["metadata"].pop("ownerReferences")
            created = real_cluster.kubectl("apply", "-f", "-", input=json.dumps(deployment),
                                           check=False)
            assert created.returncode == 0, created.stderr  # admitted under `restricted`
            _rolled_out(real_cluster, real_node, f"deployment/{deployment['metadata']['name']}",
                        namespace)

            pods = kube_json(real_cluster, "get", "pods", "-n", namespace, "-l",
                             render.selector_string("shared"))["items"]
            assert {p["spec"]["nodeName"] for p in pods} == {real_node.name}
            assert len(pods) == 2
            assert gets == ["/model.pt"]  # two pods, one download
            key = hashlib.sha256(url.encode()).hexdigest()
            cached = real_cluster.kubectl(
                "exec", "-n", namespace, pods[1]["metadata"]["name"], "--", "stat", "-c",
                "%u %s", f"{render.MODEL_CACHE_DIR}/{key}/model.pt").stdout.split()
            assert cached == ["10001", str(model_file.stat().st_size)]
            for pod in pods:
                _answers(pod["status"]["podIP"], "shared", model)
        finally:
            real_cluster.kubectl("delete", "pv", volume["metadata"]["name"], "--wait=false",
                                 check=False)


def _run_to_completion(cluster: Any, namespace: str, name: str, image: str,
                       command: list[str]) -> tuple[str, str]:
    """A pod on the real node running ``command``, with the chart's security settings:
    (its phase when done, its log)."""
    pod = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "restartPolicy": "Never", "nodeSelector": NODE_SELECTOR,
            "automountServiceAccountToken": False,
            "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "main", "image": image, "command": command,
                "securityContext": {"allowPrivilegeEscalation": False,
                                    "readOnlyRootFilesystem": True,
                                    "capabilities": {"drop": ["ALL"]}},
                "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
            }],
            "volumes": [{"name": "tmp", "emptyDir": {}}],
        },
    }
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(pod))

    def finished() -> str | None:
        phase = kube_json(cluster, "get", "pod", name, "-n", namespace)["status"].get("phase")
        return phase if phase in ("Succeeded", "Failed") else None

    try:
        phase = wait_for(finished, timeout=120, interval=0.5, what=f"pod {name} to finish")
    except AssertionError as failure:  # say where it stood: its node, its containers' states
        status = kube_json(cluster, "get", "pod", name, "-n", namespace)
        raise AssertionError(f"{failure}; node {status['spec'].get('nodeName')}, "
                             f"status {status['status']}") from None
    log = cluster.kubectl("logs", "-n", namespace, name, check=False).stdout
    return phase, log


def test_operator_image_help(real_cluster: Any) -> None:
    image = real_cluster.real_node_images.operator.name
    with restricted_namespace(real_cluster) as namespace:
        phase, log = _run_to_completion(real_cluster, namespace, "help", image,
                                        ["modelyard", "operator", "--help"])
    assert phase == "Succeeded", log
    assert "usage: modelyard operator" in log


def test_operator_image_runs_the_activator(real_cluster: Any) -> None:
    image = real_cluster.real_node_images.operator.name
    with restricted_namespace(real_cluster) as namespace:
        phase, log = _run_to_completion(real_cluster, namespace, "activator", image,
                                        ["modelyard", "activator", "--help"])
    assert phase == "Succeeded", log
    assert "usage" in log

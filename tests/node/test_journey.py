"""The journey of issue 10 §3, on the real node, with the chart's defaults.

A platform team ``helm install``s the chart (every value at its default but the image
references); an ML engineer applies a ModelDeployment, waits for Ready from the kubelet's
readiness probe, sends real inferences through the model's Service from a pod in the
cluster, rolls a new version out as a canary, aborts another, scales to zero and deletes
it; then a second model is converted by its Job on the node before it serves. A client
pod counts every request from the first Ready to the deletion: none may be lost. The tests
run in file order and share one installation (a module fixture); each prints its timings.
No ``MODELYARD_*`` variable is set for the operator, the activator or the runtime.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import yaml
from nodesupport import (
    JOURNEY_TIMINGS,
    NODE_SELECTOR,
    kube_json,
    restricted_namespace,
    serve_file,
)
from support import ROOT, moto_s3, wait_for

pytestmark = [pytest.mark.realnode, pytest.mark.cluster]

CHART = ROOT / "charts" / "modelyard"
MD = "tiny"
RELEASE_NS = "modelyard-system"

# Bounded in time and count; sequential; prints its running totals once a second.
CLIENT = """\
import json, os, sys, time, urllib.request
url, deadline = sys.argv[1], time.time() + float(sys.argv[2])
body = json.dumps({"inputs": [{"name": "input", "shape": [4], "datatype": "FP32",
                               "data": [1, 2, 3, 4]}]}).encode()
ok = failed = 0; errors = []; shown = 0.0
while time.time() < deadline and ok + failed < 200000 and not os.path.exists("/tmp/stop"):
    try:
        request = urllib.request.Request(url, data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=150) as reply:
            reply.read()
        ok += 1
    except Exception as exc:
        failed += 1; errors = (errors + [time.strftime("%H:%M:%S ") + repr(exc)[:160]])[-5:]
    if time.time() >= shown:
        print(json.dumps({"ok": ok, "failed": failed, "errors": errors}), flush=True)
        shown = time.time() + 1
    time.sleep(0.02)
print(json.dumps({"ok": ok, "failed": failed, "errors": errors, "done": True}), flush=True)
"""


@dataclass
class Journey:
    cluster: Any
    namespace: str
    model_urls: dict[str, str]
    timings: dict[str, float] = field(default_factory=dict)
    began: dict[str, str] = field(default_factory=dict)  # step -> wall clock, to place errors

    def kubectl(self, *args: str, check: bool = True, timeout: float = 120) -> Any:
        return self.cluster.kubectl(*args, check=check, timeout=timeout)

    def md(self) -> dict[str, Any]:
        return dict(kube_json(self.cluster, "get", "md", MD, "-n", self.namespace))

    def condition(self, kind: str) -> str | None:
        conditions = self.md().get("status", {}).get("conditions", [])
        return next((c["status"] for c in conditions if c["type"] == kind), None)

    def apply(self, version: str, **spec: Any) -> None:
        manifest = {
            "apiVersion": "modelyard.dev/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": MD, "namespace": self.namespace},
            "spec": {
                "model": {"version": version, "uri": self.model_urls[version],
                          "format": "torchscript"},
                "runtime": {"image": self.cluster.real_node_images.runtime.name},
                "resources": {"cpu": "200m", "memory": "1Gi"},
                "scheduling": {"nodeSelector": NODE_SELECTOR},
                "rollout": {"strategy": "Canary",
                            "steps": [{"weight": 50, "pauseSeconds": 10}]},
                **spec,
            },
        }
        self.cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest))

    def cli(self, command: str) -> Any:
        """``modelyard COMMAND tiny -n NS``, as a user types it."""
        return subprocess.run(
            [sys.executable, "-m", "modelyard.operator.cli", command, MD, "-n", self.namespace],
            env={**os.environ, "KUBECONFIG": str(self.cluster.kubeconfig)},
            capture_output=True, text=True, timeout=60, check=False)

    def client_totals(self) -> dict[str, Any]:
        log = self.kubectl("logs", "-n", self.namespace, "client", "--tail=1", check=False)
        lines = log.stdout.strip().splitlines()
        return dict(json.loads(lines[-1])) if lines else {"ok": 0, "failed": 0}


@pytest.fixture(scope="module")
def journey(real_cluster: Any, real_node: Any, tmp_path_factory: pytest.TempPathFactory,
            request: pytest.FixtureRequest) -> Iterator[Journey]:
    import torch

    from modelyard.operator.devcluster.helm import ensure_helm

    models = tmp_path_factory.mktemp("models")
    for version in ("1", "2", "3"):
        torch.manual_seed(int(version))
        torch.jit.save(torch.jit.script(torch.nn.Linear(4, 2).eval()),
                       str(models / f"v{version}.pt"))
    helm = ensure_helm()
    home = tmp_path_factory.mktemp("helm-home")
    operator = real_cluster.real_node_images.operator.name
    repository, tag = operator.rsplit(":", 1)
    with (restricted_namespace(real_cluster) as namespace,
          serve_file(models / "v1.pt", real_node.layout.host_ip) as url):
        base = url.rsplit("/", 1)[0]
        urls = {v: f"{base}/v{v}.pt" for v in ("1", "2", "3")}
        started = time.monotonic()
        helm.run("install", "modelyard", str(CHART), f"--namespace={RELEASE_NS}",
                 "--create-namespace", f"--set=image.repository={repository}",
                 f"--set=image.tag={tag}", kubeconfig=real_cluster.kubeconfig, home=home)
        journey = Journey(real_cluster, namespace, urls)
        request.config.stash[JOURNEY_TIMINGS] = journey.timings
        # containerd up, the images imported (once per store), kubelet Ready
        journey.timings["real node Ready after its start (s)"] = real_node.started_in_s
        try:
            # The chart gives the operator 5 min to start (its startupProbe): on 2 cores
            # beside two vLLM starts its imports have taken over 110 s
            rolled = journey.kubectl("rollout", "status", "deployment/modelyard",
                                     f"--namespace={RELEASE_NS}", "--timeout=300s", check=False,
                                     timeout=320)
            assert rolled.returncode == 0, (rolled.stderr, journey.kubectl(
                "get", "pods", "-A", "-o", "wide").stdout)
            journey.timings["operator Ready after helm install (s)"] = (
                time.monotonic() - started)
            yield journey
        finally:
            print("\njourney timings:", json.dumps(journey.timings, indent=1))
            helm.run("uninstall", "modelyard", f"--namespace={RELEASE_NS}", "--wait",
                     kubeconfig=real_cluster.kubeconfig, home=home, check=False)


@pytest.fixture(autouse=True)
def _step_began(journey: Journey, request: pytest.FixtureRequest) -> None:
    journey.began[request.node.name.split("_")[1]] = time.strftime("%H:%M:%S")


def test_1_chart_defaults_run_the_operator_on_the_real_node(journey: Journey) -> None:
    pods = kube_json(journey.cluster, "get", "pods", "-n", RELEASE_NS)["items"]
    operators = [p for p in pods if "activator" not in p["metadata"]["name"]]
    assert len(operators) == 2  # replicaCount's default, with leader election
    assert {p["spec"]["nodeName"] for p in operators} == {"real-0"}
    # Proof that an operator pod talks to the API server (in-cluster login, cluster DNS,
    # RBAC): one of them holds the leader Lease.
    names = {p["metadata"]["name"] for p in operators}

    def holder() -> str | None:
        lease = journey.kubectl("get", "lease", "modelyard-operator", "-n", RELEASE_NS,
                                "-o", "jsonpath={.spec.holderIdentity}", check=False)
        return next((n for n in names if n in lease.stdout), None)

    wait_for(holder, timeout=60, what="an operator pod to hold the leader Lease")


def test_2_apply_and_ready_from_the_kubelets_probe(journey: Journey) -> None:
    started = time.monotonic()
    journey.apply("1")
    wait_for(lambda: journey.condition("Ready") == "True", timeout=180, interval=0.5,
             what="the ModelDeployment to be Ready")
    journey.timings["Ready after apply (s)"] = time.monotonic() - started
    client = _client_pod(journey, "client", seconds=900)
    journey.cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(client))


def _client_pod(journey: Journey, name: str, seconds: int) -> dict[str, Any]:
    # The Service's DNS name, as docs/autoscaling.md tells users to address a model: at zero
    # the activator answers for it and knows the model by that name (Host)
    url = f"http://{MD}.{journey.namespace}.svc.cluster.local/v2/models/{MD}/infer"
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": journey.namespace},
        "spec": {
            "restartPolicy": "Never", "nodeSelector": NODE_SELECTOR,
            "automountServiceAccountToken": False,
            "securityContext": {"runAsNonRoot": True,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "client", "image": journey.cluster.real_node_images.runtime.name,
                "command": ["python", "-c", CLIENT, url, str(seconds)],
                "securityContext": {"allowPrivilegeEscalation": False,
                                    "capabilities": {"drop": ["ALL"]}},
                "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}},
            }],
        },
    }


def test_3_inferences_through_the_service_from_a_pod(journey: Journey) -> None:
    totals = wait_for(lambda: (t := journey.client_totals())["ok"] >= 20 and t, timeout=120,
                      what="20 answered requests")
    assert totals["failed"] == 0, (totals, "steps began:", journey.began)


def test_4_canary_promoted_when_its_pause_says(journey: Journey) -> None:
    started = time.monotonic()
    # The issue's reproduction: two steps of 10 s. Nothing but the pauses' ends happens
    # after the canary's pods are Ready, so only a timer can move it on in time.
    journey.apply("2", rollout={"strategy": "Canary", "steps": [
        {"weight": 25, "pauseSeconds": 10}, {"weight": 50, "pauseSeconds": 10}]})
    wait_for(lambda: journey.md().get("status", {}).get("canary"), timeout=120,
             what="the canary to start")
    canary_at = time.monotonic()
    # Its pods get Ready (about 20 s here), then two pauses of 10 s; 40 s to spare.
    wait_for(lambda: journey.md()["status"].get("stableVersion") == "2", timeout=90,
             interval=0.5, what="version 2 to be promoted")
    journey.timings["canary promoted after its start (s, pauses 2x10)"] = (
        time.monotonic() - canary_at)
    journey.timings["rollout 1->2 in all (s)"] = time.monotonic() - started
    assert (totals := journey.client_totals())["failed"] == 0, (totals, journey.began)


def test_5_abort(journey: Journey) -> None:
    # Wherever the previous step left it, finish the rollout to 2 as a user would.
    if (journey.md()["status"].get("canary") or {}).get("version") == "2":
        assert journey.cli("promote").returncode == 0
    wait_for(lambda: journey.md()["status"].get("stableVersion") == "2"
             and not journey.md()["status"].get("canary"), timeout=120, interval=1,
             what="version 2 to be stable")
    stable = journey.md()["status"]["stableVersion"]
    journey.apply("3", rollout={"strategy": "Canary", "steps": [{"weight": 50}]})
    wait_for(lambda: journey.md()["status"].get("canary"), timeout=120, what="the canary")
    aborted = journey.cli("abort")
    assert aborted.returncode == 0, aborted.stderr
    wait_for(lambda: not journey.md()["status"].get("canary"), timeout=120,
             what="the canary to be gone")
    status = journey.md()["status"]
    assert status["stableVersion"] == stable
    assert (totals := journey.client_totals())["failed"] == 0, (totals, journey.began)


def test_6_scale_to_zero_and_wake_through_the_activator(journey: Journey) -> None:
    rolled = journey.kubectl("rollout", "status", "deployment/modelyard-activator",
                             f"--namespace={RELEASE_NS}", "--timeout=60s", check=False)
    assert rolled.returncode == 0, rolled.stderr
    journey.apply("2", autoscaling={"minReplicas": 0, "maxReplicas": 1, "target": 8,
                                    "scaleToZeroDelaySeconds": 0})
    journey.kubectl("exec", "-n", journey.namespace, "client", "--", "touch", "/tmp/stop",
                    check=False)  # idle, so it can go to zero
    wait_for(lambda: journey.md()["status"].get("replicas") == 0, timeout=300, interval=1,
             what="zero replicas")
    started = time.monotonic()
    waker = _client_pod(journey, "waker", seconds=1)  # one request, held until a replica
    journey.cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(waker))
    wait_for(lambda: kube_json(journey.cluster, "get", "pod", "waker", "-n",
                               journey.namespace)["status"].get("phase") == "Succeeded",
             timeout=200, interval=0.5, what="the held request to be answered")
    journey.timings["wake from zero (s)"] = time.monotonic() - started
    log = journey.kubectl("logs", "-n", journey.namespace, "waker").stdout.splitlines()
    assert json.loads(log[-1])["ok"] == 1, log


def test_7_delete_and_nothing_lost(journey: Journey) -> None:
    journey.kubectl("exec", "-n", journey.namespace, "client", "--", "touch", "/tmp/stop",
                    check=False)
    totals = wait_for(lambda: (t := journey.client_totals()).get("done") and t, timeout=180,
                      what="the client's final count")
    journey.timings["requests answered"] = totals["ok"]
    journey.timings["requests lost"] = totals["failed"]
    journey.kubectl("delete", "md", MD, "-n", journey.namespace, "--wait=true",
                    "--timeout=120s")
    wait_for(lambda: not kube_json(journey.cluster, "get", "deployments,services", "-n",
                               journey.namespace, "-l",
                               f"modelyard.dev/model-deployment={MD}")["items"],
             timeout=120, what="owned objects to be garbage-collected")
    assert totals["failed"] == 0, (totals, "steps began:", journey.began)



def test_8_a_model_converted_by_its_job_on_the_node_then_served(
        journey: Journey, real_node: Any, tmp_path: Any) -> None:
    """spec.model.convert with every default: the Job runs the runtime image (its g++ and
    torchao) in the restricted namespace, reads an exported program from S3, writes the
    verified package beside it and reports through the default /dev/termination-log; the
    model's pod then serves that package."""
    import boto3

    source = tmp_path / "model.pt2"
    model = _exported_mlp(source)
    name, ns = "converted", journey.namespace
    with moto_s3(real_node.layout.host_ip, tmp_path / "moto.log") as endpoint:
        keys = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "modelyard",
                "AWS_SECRET_ACCESS_KEY": "modelyard", "AWS_DEFAULT_REGION": "us-east-1"}
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="modelyard", aws_secret_access_key="modelyard")
        s3.create_bucket(Bucket="models")
        s3.upload_file(str(source), "models", "mlp/1/model.pt2")
        journey.kubectl("create", "secret", "generic", "store", "-n", ns,
                        *(f"--from-literal={k}={v}" for k, v in keys.items()))
        manifest = {
            "apiVersion": "modelyard.dev/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": name, "namespace": ns},
            "spec": {
                "model": {"version": "1", "uri": "s3://models/mlp/1/model.pt2",
                          "format": "export", "credentialsSecret": "store", "convert": {}},
                "runtime": {"image": journey.cluster.real_node_images.runtime.name,
                            "batching": {"maxBatchSize": 8}},
                # the Job gets the model's own resources: a core, room for the compiler
                "resources": {"cpu": "1", "memory": "3Gi"},
                "scheduling": {"nodeSelector": NODE_SELECTOR},
            },
        }
        started = time.monotonic()
        journey.cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest))

        def status() -> dict[str, Any]:
            found = kube_json(journey.cluster, "get", "md", name, "-n", ns)
            return dict(found.get("status") or {})

        def converted() -> bool:
            conditions = {c["type"]: c for c in status().get("conditions", [])}
            cond = conditions.get("Converted") or {}
            if cond.get("reason") == "ConversionFailed":
                logs = journey.kubectl("logs", "-n", ns, "-l",
                                       f"modelyard.dev/convert-for={name}", "--tail=40",
                                       check=False)
                raise AssertionError(f"{cond.get('message')}\n{logs.stdout}{logs.stderr}")
            return cond.get("status") == "True"

        wait_for(converted, timeout=480, interval=1, what="the conversion Job to succeed")
        journey.timings["conversion Job done after apply (s)"] = time.monotonic() - started
        wait_for(lambda: any(c["type"] == "Ready" and c["status"] == "True"
                             for c in status().get("conditions", [])),
                 timeout=240, interval=1, what="the converted model to be Ready")
        journey.timings["converted model Ready after apply (s)"] = time.monotonic() - started

        [job_pod] = kube_json(journey.cluster, "get", "pods", "-n", ns, "-l",
                              f"modelyard.dev/convert-for={name}")["items"]
        [container] = job_pod["spec"]["containers"]
        assert container["image"] == journey.cluster.real_node_images.runtime.name
        assert container["terminationMessagePath"] == "/dev/termination-log"
        assert job_pod["spec"]["nodeName"] == real_node.name
        assert job_pod["status"]["phase"] == "Succeeded"

        record = status()["versions"][0]
        conversion = record["conversion"]
        artifact = conversion["artifactUri"]
        assert artifact.startswith("s3://models/mlp/1/aoti/"), artifact
        package = s3.get_object(Bucket="models", Key=artifact.removeprefix("s3://models/"))
        assert hashlib.sha256(package["Body"].read()).hexdigest() == \
            conversion["artifactSha256"]
        assert conversion["sourceSha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
        assert conversion["accuracyDelta"] <= 1e-4  # the default tolerance holds

        [pod] = kube_json(journey.cluster, "get", "pods", "-n", ns, "-l",
                          f"modelyard.dev/model-deployment={name}")["items"]
        env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
        assert (env["MODELYARD_MODEL_FORMAT"], env["MODELYARD_MODEL_SHA256"]) == (
            "aoti", conversion["artifactSha256"])
        _assert_answers_like(model, f"http://{pod['status']['podIP']}:8080", name)
        journey.kubectl("delete", "md", name, "-n", ns, "--wait=true", "--timeout=120s")


def _exported_mlp(path: Any) -> Any:
    """A small MLP exported with a dynamic batch up to the model's batching limit (8)."""
    import torch

    torch.manual_seed(8)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 4)).eval()
    batch = torch.export.Dim("batch", min=1, max=8)
    torch.export.save(torch.export.export(model, (torch.zeros(2, 16),),
                                          dynamic_shapes=({0: batch},)), str(path))
    return model


def _assert_answers_like(model: Any, url: str, name: str) -> None:
    """A batch of 3 through the served model matches the source model's outputs."""
    import numpy as np
    import torch

    x = np.linspace(-1, 1, 3 * 16, dtype=np.float32).reshape(3, 16)
    body = {"inputs": [{"name": "input", "shape": [3, 16], "datatype": "FP32",
                        "data": x.ravel().tolist()}]}
    reply = httpx.post(f"{url}/v2/models/{name}/infer", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    answer = np.asarray(reply.json()["outputs"][0]["data"]).reshape(3, 4)
    np.testing.assert_allclose(answer, expected, rtol=1e-4, atol=1e-5)

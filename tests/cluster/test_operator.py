"""The operator against the real local control plane: scheduling, status, rollouts of
versions, garbage collection, drift repair, restarts, and writes at rest."""

from __future__ import annotations

import ipaddress
import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import Kube, ready_endpoints, wait_for

from modelyard.operator.devcluster.pki import OPERATOR_USER

ROOT = Path(__file__).resolve().parents[2]
H100 = "NVIDIA-H100-80GB-HBM3"


def manifest(name: str = "resnet", version: str = "1", gpus: int = 1,
             product: str | None = H100, replicas: int = 2, **spec: Any) -> str:
    gpu: dict[str, Any] = {"count": gpus}
    if product:
        gpu["product"] = product
    body = {
        "apiVersion": "modelyard.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name},
        "spec": {
            "model": {"version": version, "uri": f"file:///models/{name}/{version}/model.pt"},
            "resources": {"gpu": gpu, "cpu": "2", "memory": "8Gi"},
            "replicas": replicas,
            **spec,
        },
    }
    return yaml.safe_dump(body)


def _passes() -> float:
    """Reconcile passes this process's operator has finished, by its own metric."""
    from modelyard.operator import metrics

    return sum(metrics.METRICS.registry.get_sample_value(
        "modelyard_operator_reconcile_total", {"result": result}) or 0.0
        for result in ("ok", "error"))


def ready(kube: Kube, name: str) -> bool:
    cond = kube.condition(name, "Ready")
    md = kube.get("md", name) or {}
    status = md.get("status", {})
    return bool(cond and cond["status"] == "True"
                and status.get("observedGeneration") == md["metadata"]["generation"])


def settled(kube: Kube, name: str, replicas: int) -> bool:
    progressing = kube.condition(name, "Progressing")
    status = (kube.get("md", name) or {}).get("status", {})
    return ready(kube, name) and status.get("readyReplicas") == replicas \
        and progressing is not None and progressing["reason"] == "Complete"


def _describe(write: dict[str, Any]) -> str:
    ref = write["objectRef"]
    return (f"{write['stageTimestamp']} {write['verb']} {ref.get('resource')}/{ref.get('name')}"
            f"/{ref.get('subresource', '')} by {write.get('userAgent', '')[:40]}")


def pods(kube: Kube, name: str) -> list[dict[str, Any]]:
    return list(kube.get("pods", selector=f"modelyard.dev/model-deployment={name}") or [])


def test_gpu_model_is_scheduled_on_the_requested_gpu_product_and_reports_ready(
        kube: Kube, operator: Any) -> None:
    kube.apply(manifest("resnet", replicas=3))
    # Ready turns True with the first ready replica; the figures below are those of all three.
    wait_for(lambda: settled(kube, "resnet", 3), what="resnet Ready with 3 ready replicas")

    deployment = kube.get("deployment", "resnet-v1")
    pod_spec = deployment["spec"]["template"]["spec"]
    container = pod_spec["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod_spec["nodeSelector"] == {"nvidia.com/gpu.product": H100}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} \
        in pod_spec["tolerations"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/models/resnet/ready"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod_spec["securityContext"]["runAsNonRoot"] is True
    assert pod_spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MODELYARD_MODEL_URI"] == "file:///models/resnet/1/model.pt"
    assert env["MODELYARD_MODEL_VERSION"] == "1"
    assert deployment["metadata"]["ownerReferences"][0]["kind"] == "ModelDeployment"

    running = wait_for(lambda: [p for p in pods(kube, "resnet") if p["spec"].get("nodeName")]
                       if len(pods(kube, "resnet")) == 3 else None, what="3 scheduled pods")
    nodes = {p["spec"]["nodeName"] for p in running}
    assert nodes <= {"gpu-h100-0", "gpu-h100-1"}, nodes  # never the L4 or the CPU node
    network = kube.cluster.pod_network.pod_range
    assert all(ipaddress.ip_address(p["status"]["podIP"]) in network for p in running)

    status = kube.get("md", "resnet")["status"]
    assert status["readyReplicas"] == 3
    assert status["replicas"] == 3
    assert status["gpus"] == 3
    assert status["stableVersion"] == "1"
    assert status["url"] == f"http://resnet.{kube.namespace}.svc.cluster.local"
    assert status["selector"] == "modelyard.dev/model-deployment=resnet"
    assert status["versions"][0]["version"] == "1"
    assert status["versions"][0]["phase"] == "Stable"
    assert status["versions"][0]["uri"] == "file:///models/resnet/1/model.pt"
    service = kube.get("service", "resnet")
    assert service["spec"]["selector"] == {"modelyard.dev/model-deployment": "resnet"}
    # The API server took the model's NetworkPolicy (enforcement needs a policy plug-in,
    # which this cluster has not: docs/security.md).
    policy = kube.get("networkpolicy", "resnet")
    assert policy["spec"]["podSelector"] == {
        "matchLabels": {"modelyard.dev/model-deployment": "resnet"}}
    assert {"podSelector": {}} in policy["spec"]["ingress"][0]["from"]
    # The Service's endpoints are the ready pods, as EndpointSlices (pods have routable IPs).
    slices = wait_for(lambda: ready_endpoints(kube, "resnet") if len(
        ready_endpoints(kube, "resnet")) == 3 else None, what="3 ready endpoints")
    assert slices == sorted(p["status"]["podIP"] for p in running)

    meta = kube.get("md", "resnet")["metadata"]
    # the operator writes nothing on the resource but its status: no kopf annotations, and
    # no finalizer (deletion never waits on us)
    assert all(k.startswith("kubectl.kubernetes.io/") for k in meta.get("annotations", {}))
    assert not meta.get("finalizers")

    table = kube.run("get", "md").stdout
    assert "resnet" in table
    assert "True" in table
    assert "VERSION" in table
    assert "GPU" in table


def test_a_model_without_gpus_may_run_on_the_cpu_node(kube: Kube, operator: Any) -> None:
    kube.apply(manifest("tiny", gpus=0, product=None, replicas=1))
    wait_for(lambda: ready(kube, "tiny"), what="tiny Ready")
    [pod] = pods(kube, "tiny")
    assert pod["spec"]["nodeName"] == "cpu-0"  # the only node without the GPU taint
    assert "nvidia.com/gpu" not in pod["spec"]["containers"][0]["resources"].get("limits", {})


def test_asking_for_more_gpus_than_exist_reports_the_schedulers_reason(
        kube: Kube, operator: Any) -> None:
    kube.apply(manifest("huge", gpus=16, replicas=1))

    def degraded() -> dict[str, Any] | None:
        cond = kube.condition("huge", "Degraded")
        return cond if cond and cond["status"] == "True" else None

    cond = wait_for(degraded, what="Degraded=True")
    assert cond["reason"] == "Unschedulable"
    assert "Insufficient nvidia.com/gpu" in cond["message"]
    assert kube.condition("huge", "Ready")["status"] == "False"  # type: ignore[index]
    [pod] = pods(kube, "huge")
    assert pod["status"]["phase"] == "Pending"
    events = wait_for(lambda: [e for e in kube.events("huge") if e["reason"] == "Unschedulable"],
                      what="an Unschedulable event")
    assert "Insufficient nvidia.com/gpu" in events[0]["message"]
    assert events[0]["type"] == "Warning"


def test_changing_the_version_rolls_out_and_records_history(kube: Kube, operator: Any) -> None:
    kube.apply(manifest("resnet", version="1", replicas=2))
    wait_for(lambda: ready(kube, "resnet"), what="v1 Ready")

    kube.apply(manifest("resnet", version="2", replicas=2))

    def rolled() -> dict[str, Any] | None:
        md = kube.get("md", "resnet")
        status = md.get("status", {})
        done = status.get("stableVersion") == "2" and kube.get("deployment", "resnet-v1") is None
        return status if done and ready(kube, "resnet") else None

    status = wait_for(rolled, what="version 2 stable and version 1 retired")
    history = [(v["version"], v["phase"]) for v in status["versions"]]
    assert history == [("2", "Stable"), ("1", "Superseded")]
    assert status["versions"][1]["reason"] == "replaced by version 2"
    assert status["versions"][1].get("finishedAt")
    assert {p["metadata"]["labels"]["modelyard.dev/version"]
            for p in wait_for(lambda: [p for p in pods(kube, "resnet")
                                       if not p["metadata"].get("deletionTimestamp")]
                              if len(pods(kube, "resnet")) == 2 else None,
                              what="only v2 pods")} == {"2"}
    progressing = kube.condition("resnet", "Progressing")
    assert progressing is not None
    assert progressing["reason"] == "Complete"
    reasons = [e["reason"] for e in kube.events("resnet")]
    assert "RolloutStarted" in reasons
    assert "RolloutComplete" in reasons


def test_deleting_the_model_garbage_collects_every_child(kube: Kube, operator: Any) -> None:
    kube.apply(manifest("gone", replicas=2))
    wait_for(lambda: ready(kube, "gone"), what="Ready")
    assert kube.get("deployment", "gone-v1")
    assert kube.get("service", "gone")

    kube.run("delete", "md", "gone", "--wait=true", "--timeout=60s")

    wait_for(lambda: kube.get("deployment", "gone-v1") is None
             and kube.get("service", "gone") is None
             and kube.get("networkpolicy", "gone") is None
             and not pods(kube, "gone"), timeout=90, what="children garbage-collected")


def test_deleting_works_while_the_operator_is_down(kube: Kube, operator_identity: str) -> None:
    from modelyard.operator.runner import OperatorThread

    with OperatorThread():
        kube.apply(manifest("orphan", replicas=1))
        wait_for(lambda: ready(kube, "orphan"), what="Ready")
    kube.run("delete", "md", "orphan", "--wait=true", "--timeout=30s")  # no operator running
    wait_for(lambda: kube.get("deployment", "orphan-v1") is None
             and kube.get("service", "orphan") is None, timeout=90,
             what="children garbage-collected by the cluster")


def test_a_hand_edited_child_is_reconciled_back(kube: Kube, operator: Any) -> None:
    kube.apply(manifest("edited", replicas=2))
    wait_for(lambda: ready(kube, "edited"), what="Ready")

    kube.run("scale", "deployment", "edited-v1", "--replicas=5")
    kube.run("patch", "service", "edited", "--type=merge",
             "-p", '{"spec":{"selector":{"modelyard.dev/model-deployment":"other"}}}')

    wait_for(lambda: kube.get("deployment", "edited-v1")["spec"]["replicas"] == 2,
             what="replicas back to 2")
    wait_for(lambda: kube.get("service", "edited")["spec"]["selector"]
             == {"modelyard.dev/model-deployment": "edited"}, what="selector restored")
    # A child deleted by hand comes back too.
    kube.run("delete", "service", "edited")
    wait_for(lambda: kube.get("service", "edited"), what="service recreated")


def test_no_writes_at_rest_and_none_after_a_restart(
        cluster: Any, kube: Kube, operator_identity: str) -> None:
    from modelyard.operator.runner import OperatorThread

    with OperatorThread():
        kube.apply(manifest("quiet", replicas=2))
        wait_for(lambda: settled(kube, "quiet", 2), what="rolled out and settled")
        time.sleep(3)  # let the last status write and watch events settle
        before = time.time()
        time.sleep(10)  # an idle interval: the cluster changes nothing, nor may the operator
        at_rest = [w for w in cluster.writes_by(OPERATOR_USER, since=before)
                   if w["objectRef"].get("namespace") == kube.namespace]
        assert at_rest == [], [_describe(w) for w in at_rest]

    uids = {d["metadata"]["uid"] for d in kube.get("deployments")}
    everywhere = len(json.loads(kube.run("get", "md", "--all-namespaces", "-o", "json")
                                .stdout)["items"])
    passes_before = _passes()
    restarted = time.time()
    with OperatorThread():
        # The resume handlers ran a whole pass for every existing resource (each would have
        # written, had anything differed), and only then is the audit log read.
        wait_for(lambda: _passes() - passes_before >= everywhere,
                 what=f"a pass for each of the {everywhere} ModelDeployments after the restart")
        after_restart = [w for w in cluster.writes_by(OPERATOR_USER, since=restarted)
                         if w["objectRef"].get("namespace") == kube.namespace]
        assert after_restart == [], [_describe(w) for w in after_restart]
        assert {d["metadata"]["uid"] for d in kube.get("deployments")} == uids
        assert {s["metadata"]["name"] for s in kube.get("services")} == {"quiet", "quiet-v1"}
        assert ready(kube, "quiet")


@pytest.mark.parametrize("watched", [True, False])
def test_the_operator_can_be_limited_to_namespaces(
        cluster: Any, kube: Kube, operator_identity: str, watched: bool) -> None:
    from modelyard.operator.runner import OperatorThread

    namespaces = [kube.namespace] if watched else ["somewhere-else"]
    with OperatorThread(namespaces):
        kube.apply(manifest("scoped", replicas=1))
        if watched:
            wait_for(lambda: ready(kube, "scoped"), what="Ready")
        else:
            time.sleep(5)
            assert kube.get("deployment", "scoped-v1") is None
            assert not (kube.get("md", "scoped") or {}).get("status")


def test_the_scale_subresource_serves_kubectl_scale_and_an_hpa(kube: Kube, operator: Any) -> None:
    kube.apply(manifest("scaled", replicas=1))
    wait_for(lambda: ready(kube, "scaled"), what="scaled Ready")
    kube.run("scale", "md", "scaled", "--replicas=3")
    wait_for(lambda: (kube.get("deployment", "scaled-v1") or {}).get("spec", {})
             .get("replicas") == 3, what="the Deployment at 3")
    wait_for(lambda: kube.get("md", "scaled")["status"]["readyReplicas"] == 3, what="3 ready")
    kube.apply(yaml.safe_dump({
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "scaled"},
        "spec": {"scaleTargetRef": {"apiVersion": "modelyard.dev/v1alpha1",
                                    "kind": "ModelDeployment", "name": "scaled"},
                 "minReplicas": 1, "maxReplicas": 5,
                 "metrics": [{"type": "Resource", "resource": {
                     "name": "cpu", "target": {"type": "Utilization",
                                               "averageUtilization": 60}}}]},
    }))

    def able_to_scale() -> dict[str, Any] | None:
        conditions = (kube.get("hpa", "scaled") or {}).get("status", {}).get("conditions", [])
        return next((c for c in conditions if c["type"] == "AbleToScale"
                     and c["status"] == "True"), None)

    # The HPA controller found the resource's scale subresource (replicas, selector); it has
    # no metrics server here to act on, which it reports separately. (Its discovery of a new
    # CRD can take a sync period or two.)
    condition = wait_for(able_to_scale, timeout=120, what="the HPA reading the scale")
    assert condition["reason"] == "SucceededGetScale"
    hpa = kube.get("hpa", "scaled")
    assert hpa["status"]["currentReplicas"] == 3


def test_the_operator_serves_its_metrics_and_liveness(
        kube: Kube, operator_identity: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    from modelyard.operator.runner import OperatorThread

    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    monkeypatch.setenv("MODELYARD_METRICS_PORT", str(ports[0]))
    with OperatorThread(liveness=f"http://127.0.0.1:{ports[1]}/healthz"):
        kube.apply(manifest("watched", replicas=1))
        wait_for(lambda: ready(kube, "watched"), what="watched Ready")

        def scraped() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
            text = httpx.get(f"http://127.0.0.1:{ports[0]}/metrics", timeout=5).text
            return {(s.name, tuple(sorted(s.labels.items()))): s.value
                    for f in text_string_to_metric_families(text) for s in f.samples}

        seen = wait_for(lambda: (m := scraped()) and m.get((
            "modelyard_modeldeployment_ready", (("name", "watched"),
                                                ("namespace", kube.namespace),
                                                ("reason", "Serving")))) == 1 and m,
            what="the model's readiness in the operator's metrics")
        assert seen[("modelyard_operator_reconcile_total", (("result", "ok"),))] > 0
        assert seen[("modelyard_operator_leader", ())] == 1
        assert httpx.get(f"http://127.0.0.1:{ports[1]}/healthz", timeout=5).status_code == 200


def test_no_spurious_drift_the_live_spec_is_what_was_applied(kube: Kube, operator: Any) -> None:
    """What Argo CD compares: after the operator reconciled (and rolled out, and wrote
    status), the live spec is the applied manifest plus the CRD schema's defaults, and
    no field of it is owned by the operator."""
    from modelyard.operator.kube import FIELD_MANAGER

    example = list(yaml.safe_load_all((ROOT / "examples" / "resnet.yaml").read_text()))
    [model] = [doc for doc in example if doc["kind"] == "ModelDeployment"]
    model["metadata"]["namespace"] = kube.namespace
    applied = yaml.safe_dump(model)
    dry_run = json.loads(kube.run("apply", "--server-side", "--dry-run=server",
                                  "--field-manager=gitops", "-o", "json", "-f", "-",
                                  input=applied).stdout)
    kube.run("apply", "--server-side", "--field-manager=gitops", "-f", "-", input=applied)
    wait_for(lambda: ready(kube, "resnet"), what="resnet Ready")
    time.sleep(4)  # several resync passes
    live = json.loads(kube.run("get", "md", "resnet", "-o", "json",
                               "--show-managed-fields").stdout)
    assert live["spec"] == dry_run["spec"]  # the manifest and the schema's defaults, no more
    assert _subset(model["spec"], live["spec"])
    owners = {(f["manager"], f.get("subresource", "")) for f in live["metadata"]["managedFields"]
              if "f:spec" in (f.get("fieldsV1") or {})}
    assert owners == {("gitops", "")}, owners
    assert (FIELD_MANAGER, "status") in {(f["manager"], f.get("subresource", ""))
                                         for f in live["metadata"]["managedFields"]}


def _subset(small: Any, big: Any) -> bool:
    if isinstance(small, dict):
        return isinstance(big, dict) and all(k in big and _subset(v, big[k])
                                             for k, v in small.items())
    return bool(small == big)

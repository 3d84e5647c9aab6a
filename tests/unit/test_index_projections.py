"""The indexes keep projections of objects, not whole objects: a pass must see the same
world from them, and they must be much smaller than what the API server sends."""

from __future__ import annotations

import copy
import json
from typing import Any

from modelyard.operator import api
from modelyard.operator.render import GPU_RESOURCE, MANAGED_BY, MANAGER, MODEL_LABEL, VERSION_LABEL
from modelyard.operator.world import Observed, build, project_child, project_model, project_pod

_MANAGED_FIELDS = [{"manager": m, "operation": "Update", "apiVersion": "v1",
                    "time": "2026-12-05T10:00:00Z", "fieldsType": "FieldsV1",
                    "fieldsV1": {"f:metadata": {"f:labels": {f"f:{k}": {} for k in "abcdef"}},
                                 "f:spec": {"f:containers": {'k:{"name":"runtime"}': {
                                     f"f:{k}": {} for k in ("env", "image", "ports",
                                                            "readinessProbe", "resources")}}}}}
                   for m in ("kube-controller-manager", "kubelet", "kube-scheduler")]


def pod(version: str, index: int, *, ready: bool = True, node: str | None = "gpu-0",
        waiting: str | None = None, unschedulable: bool = False) -> dict[str, Any]:
    """A pod as the API server sends it for a model's runtime, with what a kubelet adds."""
    labels = {MANAGED_BY: MANAGER, MODEL_LABEL: "m", VERSION_LABEL: version,
              "pod-template-hash": "6cc96fdb8c"}
    conditions = [{"type": t, "status": "True", "lastProbeTime": None,
                   "lastTransitionTime": "2026-12-05T10:00:01Z"}
                  for t in ("PodReadyToStartContainers", "Initialized", "ContainersReady")]
    conditions.append({"type": "Ready", "status": "True" if ready else "False",
                       "lastTransitionTime": "2026-12-05T10:00:09Z"})
    if unschedulable:
        conditions = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                       "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}]
    state = {"waiting": {"reason": waiting, "message": "back-off 10s"}} if waiting else \
        {"running": {"startedAt": "2026-12-05T10:00:02Z"}}
    body: dict[str, Any] = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": f"m-v{version}-6cc96fdb8c-{index:05d}", "namespace": "ns",
            "uid": f"uid-{version}-{index}", "resourceVersion": "4711", "labels": labels,
            "annotations": {"modelyard.dev/spec-hash": "a" * 64,
                            "prometheus.io/scrape": "true", "prometheus.io/port": "8080"},
            "generateName": f"m-v{version}-6cc96fdb8c-",
            "creationTimestamp": "2026-12-05T10:00:00Z",
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rs",
                                 "uid": "rs-uid", "controller": True,
                                 "blockOwnerDeletion": True}],
            "managedFields": copy.deepcopy(_MANAGED_FIELDS),
        },
        "spec": {
            "containers": [{
                "name": "runtime", "image": "modelyard-runtime:0.1.0",
                "args": ["serve", "--model-uri", "s3://models/m/" + version],
                "env": [{"name": f"MODELYARD_SETTING_{i}", "value": str(i)} for i in range(12)],
                "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
                "readinessProbe": {"httpGet": {"path": "/v2/health/ready", "port": 8080},
                                   "periodSeconds": 2, "failureThreshold": 3},
                "resources": {"limits": {GPU_RESOURCE: "1", "memory": "4Gi"},
                              "requests": {GPU_RESOURCE: "1", "cpu": "1"}},
                "volumeMounts": [{"name": "models", "mountPath": "/models"},
                                 {"name": "kube-api-access", "readOnly": True,
                                  "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}],
                "terminationMessagePath": "/dev/termination-log", "imagePullPolicy": "IfNotPresent",
            }],
            "volumes": [{"name": "models", "emptyDir": {}},
                        {"name": "kube-api-access", "projected": {"sources": [
                            {"serviceAccountToken": {"expirationSeconds": 3607,
                                                     "path": "token"}}]}}],
            "restartPolicy": "Always", "schedulerName": "default-scheduler",
            "tolerations": [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}],
            "serviceAccountName": "default", "priority": 0,
        },
        "status": {
            "phase": "Running" if not unschedulable else "Pending", "qosClass": "Burstable",
            "conditions": conditions, "hostIP": "10.0.0.5",
            "podIPs": [{"ip": f"10.201.0.{index}"}], "startTime": "2026-12-05T10:00:01Z",
            "containerStatuses": [{"name": "runtime", "ready": ready, "restartCount": 0,
                                   "image": "modelyard-runtime:0.1.0",
                                   "imageID": "sha256:" + "b" * 64,
                                   "containerID": "containerd://" + "c" * 64, "started": True,
                                   "state": state}],
        },
    }
    if node:
        body["spec"]["nodeName"] = node
        body["status"]["podIP"] = f"10.201.0.{index}"
    return body


def deployment(version: str, replicas: int, ready: int) -> dict[str, Any]:
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": f"m-v{version}", "namespace": "ns", "generation": 2,
                         "labels": {MANAGED_BY: MANAGER, MODEL_LABEL: "m", VERSION_LABEL: version},
                         "annotations": {"modelyard.dev/spec-hash": "h"},
                         "managedFields": copy.deepcopy(_MANAGED_FIELDS)},
            "spec": {"replicas": replicas, "template": pod(version, 0)["spec"]},
            "status": {"observedGeneration": 2, "replicas": replicas, "readyReplicas": ready,
                       "updatedReplicas": replicas}}


def model() -> dict[str, Any]:
    spec = {"model": {"version": "2", "uri": "s3://models/m/2"}, "replicas": 3,
            "rollout": {"strategy": "canary", "steps": [{"weight": 50, "pauseSeconds": 10}]}}
    return {"apiVersion": api.API_VERSION, "kind": api.KIND,
            "metadata": {"name": "m", "namespace": "ns", "uid": "u-1", "generation": 3,
                         "resourceVersion": "99",
                         "annotations": {
                             api.PROMOTE_ANNOTATION: "2", api.ABORT_ANNOTATION: "x",
                             "kubectl.kubernetes.io/last-applied-configuration":
                                 json.dumps({"spec": spec}) * 3,
                             "argocd.argoproj.io/tracking-id":
                                 "app:modelyard.dev/ModelDeployment:ns/m"},
                         "managedFields": copy.deepcopy(_MANAGED_FIELDS)},
            "spec": spec, "status": {"observedGeneration": 3, "stableVersion": "1"}}


def observed(project: bool) -> Observed:
    pods = [pod("1", 1), pod("1", 2), pod("1", 3, ready=False, waiting="CrashLoopBackOff"),
            pod("2", 4), pod("2", 5, node=None, unschedulable=True)]
    deployments = [deployment("1", 3, 2), deployment("2", 2, 1)]
    resource = model()
    if project:
        return Observed(project_model(resource), [project_child(d) for d in deployments],
                        [project_pod(p) for p in pods], [])
    return Observed(resource, deployments, pods, [])


def test_a_pass_sees_the_same_world_from_the_projections() -> None:
    whole, kept = (build(observed(p), {}, gateway=False, activator=None) for p in (False, True))
    assert kept.versions == whole.versions
    assert kept.versions["1"].pod_failure == ("CrashLoopBackOff", "back-off 10s")
    assert kept.versions["2"].unschedulable is not None
    assert kept.versions["1"].gpus == 3  # every scheduled pod's GPU limit counts
    for version in ("1", "2"):
        assert kept.ready_pod_ips(version) == whole.ready_pod_ips(version) != []
    assert kept.spec == whole.spec
    assert kept.previous == whole.previous
    assert (kept.key, kept.owner, kept.generation) == (whole.key, whole.owner, whole.generation)
    assert [p["metadata"]["name"] for p in kept.pods] == \
        [p["metadata"]["name"] for p in whole.pods]


def test_a_model_keeps_only_modelyards_annotations() -> None:
    kept = build(observed(True), {}, gateway=False, activator=None)
    assert dict(kept.annotations) == {api.PROMOTE_ANNOTATION: "2", api.ABORT_ANNOTATION: "x"}
    assert "managedFields" not in kept.resource["metadata"]


def test_children_keep_what_the_diff_compares() -> None:
    dep = deployment("1", 3, 3)
    kept = project_child(dep)
    assert kept["spec"] == dep["spec"]
    assert kept["metadata"]["annotations"] == dep["metadata"]["annotations"]
    assert "managedFields" not in kept["metadata"]
    slice_ = {"metadata": {"name": "s"}, "endpoints": [{"addresses": ["10.0.0.1"]}],
              "ports": [{"port": 8080}], "addressType": "IPv4"}
    assert project_child(slice_, fields=("endpoints", "ports", "addressType")) == \
        {"metadata": {"name": "s"}, "status": {}, "endpoints": slice_["endpoints"],
         "ports": slice_["ports"], "addressType": "IPv4"}


def test_projections_are_a_fraction_of_the_objects() -> None:
    def size(obj: Any) -> int:
        return len(json.dumps(obj))

    whole, kept = pod("1", 1), project_pod(pod("1", 1))
    print(f"pod: {size(whole)} -> {size(kept)} bytes of JSON")
    assert size(kept) * 3 < size(whole)
    assert size(project_model(model())) * 2 < size(model())


def test_children_alike_share_their_strings() -> None:
    """Each watch event is decoded on its own; the projections of 1000 alike children hold
    one copy of each key and common value (image, env, labels), not 1000."""
    first, second = (project_child(json.loads(json.dumps(deployment(v, 1, 1))))
                     for v in ("1", "2"))
    one = first["spec"]["template"]["containers"][0]
    two = second["spec"]["template"]["containers"][0]
    assert one["image"] is two["image"]
    assert next(iter(one)) is next(iter(two))  # the keys
    assert project_pod(json.loads(json.dumps(pod("1", 1))))["status"]["phase"] is \
        project_pod(json.loads(json.dumps(pod("2", 2))))["status"]["phase"]

"""Bad manifests are refused by the real API server at `kubectl apply` time, with a
message that tells the person what to fix; good ones get the schema's defaults."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml
from support import Kube

VALID: dict[str, Any] = {
    "apiVersion": "modelyard.dev/v1alpha1",
    "kind": "ModelDeployment",
    "metadata": {"name": "resnet"},
    "spec": {
        "model": {"version": "3", "uri": "s3://models/resnet/3/model.pt"},
        "resources": {"gpu": {"count": 1, "product": "NVIDIA-H100-80GB-HBM3"}},
    },
}


def with_(path: str, value: Any) -> dict[str, Any]:
    """VALID with the dotted ``path`` set to ``value`` (``...`` deletes it)."""
    doc = copy.deepcopy(VALID)
    *parents, leaf = path.split(".")
    node = doc
    for key in parents:
        node = node.setdefault(key, {})
    if value is ...:
        del node[leaf]
    else:
        node[leaf] = value
    return doc


def llm(**runtime: Any) -> dict[str, Any]:
    """A generative model's manifest with ``runtime`` set as given."""
    return with_("spec", {"model": {"version": "1", "uri": "s3://models/chat/1/",
                                    "format": "hf"},
                          "runtime": {"engine": "vllm", **runtime}})


INVALID = [
    ("vllm engine for a torchscript file", with_("spec.runtime", {"engine": "vllm"}),
     "runtime.engine vllm serves format hf (a model directory), and format hf needs "
     "runtime.engine vllm"),
    ("hf directory without the vllm engine", with_("spec.model.format", "hf"),
     "format hf needs runtime.engine vllm"),
    ("vllm settings for the modelyard engine", with_("spec.runtime", {
        "vllm": {"maxModelLen": 256}}), "runtime.vllm is set but runtime.engine is not vllm"),
    ("extra engine argument modelyard owns", llm(vllm={"extraArgs": ["--port=9000"]}),
     "runtime.vllm.extraArgs may not set a flag modelyard sets itself"),
    ("extra served model name", llm(vllm={"extraArgs": ["--served-model-name", "x"]}),
     "runtime.vllm.extraArgs may not set a flag modelyard sets itself"),
    ("gpu memory share above 1", llm(vllm={"gpuMemoryUtilization": 1.5}),
     "spec.runtime.vllm.gpuMemoryUtilization: Invalid value"),
    ("unknown engine dtype", llm(vllm={"dtype": "int3"}),
     'spec.runtime.vllm.dtype: Unsupported value: "int3"'),
    ("handler for vllm", llm(handler="pkg.mod:Handler"), "runtime.handler is for engine "
     "modelyard"),
    ("missing version", with_("spec.model.version", ...), "spec.model.version: Required value"),
    ("missing uri", with_("spec.model.uri", ...), "spec.model.uri: Required value"),
    ("bad uri scheme", with_("spec.model.uri", "ftp://host/model.pt"),
     "uri must start with s3://, http://, https://, pvc:// or file://"),
    ("malformed pvc uri", with_("spec.model.uri", "pvc://Claim_1"),
     "a pvc:// uri must look like pvc://CLAIM/PATH/TO/MODEL"),
    ("negative gpu count", with_("spec.resources.gpu.count", -1),
     "spec.resources.gpu.count: Invalid value: -1: spec.resources.gpu.count in body should be "
     "greater than or equal to 0"),
    ("gpu product without gpus", with_("spec.resources.gpu.count", 0),
     "gpu.product is set but gpu.count is 0"),
    ("unknown format", with_("spec.model.format", "onnx"),
     'spec.model.format: Unsupported value: "onnx"'),
    ("safetensors without entry point", with_("spec.model.format", "safetensors"),
     "format safetensors needs entryPoint"),
    ("bad sha256", with_("spec.model.sha256", "abc123"), "spec.model.sha256: Invalid value"),
    ("version with spaces", with_("spec.model.version", "v 1"),
     "spec.model.version: Invalid value"),
    ("min replicas above max", with_("spec.autoscaling", {"minReplicas": 5, "maxReplicas": 2,
                                                          "target": 8}),
     "autoscaling.minReplicas must not exceed autoscaling.maxReplicas"),
    ("unknown autoscaling metric", with_("spec.autoscaling", {"maxReplicas": 2, "target": 1,
                                                              "metric": "vibes"}),
     'spec.autoscaling.metric: Unsupported value: "vibes"'),
    ("prometheus source without url", with_("spec.autoscaling", {
        "maxReplicas": 2, "target": 1, "source": "prometheus"}),
     "autoscaling.source prometheus needs prometheusUrl"),
    ("zero autoscaling target", with_("spec.autoscaling", {"maxReplicas": 2, "target": 0}),
     "spec.autoscaling.target: Invalid value"),
    ("negative replicas", with_("spec.replicas", -2), "spec.replicas: Invalid value: -2"),
    ("cpu that is not a quantity", with_("spec.resources.cpu", "four"),
     "must be a Kubernetes quantity such as 4, 500m, 16Gi"),
    ("batch size zero", with_("spec.runtime", {"batching": {"maxBatchSize": 0}}),
     "spec.runtime.batching.maxBatchSize: Invalid value: 0"),
    ("handler that is not an import path", with_("spec.runtime", {"handler": "my handler"}),
     "spec.runtime.handler: Invalid value"),
    ("canary without steps", with_("spec.rollout", {"strategy": "Canary"}),
     "strategy Canary needs at least one step"),
    ("canary weights going down", with_("spec.rollout", {
        "strategy": "Canary", "steps": [{"weight": 50}, {"weight": 10}]}),
     "canary step weights must not decrease"),
    ("canary weight above 100", with_("spec.rollout", {
        "strategy": "Canary", "steps": [{"weight": 150}]}),
     "spec.rollout.steps[0].weight: Invalid value: 150"),
    ("unknown field", with_("spec.model.weights", "x"), 'unknown field "spec.model.weights"'),
    ("name too long for its Service", with_("metadata.name", "a" * 50),
     "metadata.name must be at most 42 characters"),
    ("no spec", with_("spec", ...), "spec: Required value"),
    ("vllm told to log prompts", llm(vllm={"extraArgs": ["--enable-log-requests"]}),
     "may not turn on vLLM's logging of prompts and outputs"),
    ("tls for the vllm engine", {**llm(), "spec": {**llm()["spec"], "tls": {
        "secretName": "chat-tls"}}}, "runtime.engine vllm does not take it yet"),
    ("a network client naming nobody", with_("spec.networkPolicy", {"clients": [{}]}),
     "a client names a namespaceSelector, a podSelector or both"),
    ("explanations of an aoti package", with_("spec", {
        "model": {"version": "1", "uri": "s3://m/1/model.pt2", "format": "aoti"},
        "runtime": {"explain": {"enabled": True}}}),
     "runtime.explain needs gradients through the model, and an aoti package has none"),
    ("explanations of int8 layers", with_("spec", {
        "model": {"version": "1", "uri": "s3://m/1/model.safetensors", "format": "safetensors",
                  "entryPoint": "m:build", "optimize": {"quantize": "dynamic-int8"}},
        "runtime": {"explain": {"enabled": True}}}),
     "dynamic-int8 layers have none"),
    ("explanations of a converted model", with_("spec", {
        "model": {"version": "1", "uri": "s3://m/1/model.pt2", "format": "export",
                  "convert": {"target": "aoti"}},
        "runtime": {"explain": {"enabled": True}}}),
     "model.convert makes the pods serve an aoti package"),
    ("explain steps above the bound", with_("spec.runtime", {"explain": {"steps": 4096}}),
     "spec.runtime.explain.steps: Invalid value: 4096"),
    ("conversion from an http store", with_("spec.model", {
        "version": "1", "uri": "https://models.example/m/1/model.pt2", "format": "export",
        "convert": {}}), "an http(s) store is read only"),
    ("conversion of a TorchScript file", with_("spec.model.convert", {}),
     "convert compiles an exported program or safetensors weights"),
    ("an exported program quantised weight-only", with_("spec.model", {
        "version": "1", "uri": "s3://m/1/model.pt2", "format": "export",
        "convert": {"quantize": "int8-weight-only"}}), "which does int8-dynamic only"),
    ("an exported program quantised for a GPU", with_("spec.model", {
        "version": "1", "uri": "s3://m/1/model.pt2", "format": "export",
        "convert": {"quantize": "int8-dynamic"}}), "on GPUs convert from format safetensors"),
    ("conversion with load-time optimize", with_("spec.model", {
        "version": "1", "uri": "s3://m/1/model.safetensors", "format": "safetensors",
        "entryPoint": "m:build", "optimize": {"compile": True}, "convert": {}}),
     "optimize does not apply"),
    ("tls behind a Gateway", with_("spec", {**VALID["spec"], "tls": {"secretName": "t"},
                                            "gateway": {"name": "gw"}}),
     "tls and gateway together are not supported yet"),
]


@pytest.mark.parametrize(("case", "body", "message"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_manifest_is_rejected_with_a_clear_message(
        kube: Kube, case: str, body: dict[str, Any], message: str) -> None:
    proc = kube.apply(yaml.safe_dump(body), check=False)
    assert proc.returncode != 0, f"{case}: accepted"
    assert message in proc.stderr, proc.stderr
    assert kube.get("md") == []  # nothing was stored


def test_valid_manifest_is_accepted_and_defaulted_by_the_schema(kube: Kube) -> None:
    kube.apply(yaml.safe_dump(VALID))
    spec = kube.get("md", "resnet")["spec"]
    assert spec["model"]["format"] == "torchscript"
    assert spec["runtime"]["engine"] == "modelyard"
    assert "image" not in spec["runtime"]  # the engine's own image (modelyard-runtime)
    assert spec["runtime"]["batching"] == {"maxBatchSize": 32, "maxDelayMs": 5}
    assert spec["runtime"]["port"] == 8080
    assert spec["replicas"] == 1
    assert spec["rollout"]["strategy"] == "RollingUpdate"
    assert spec["networkPolicy"] == {"enabled": True}  # on unless turned off


def test_a_conversion_is_accepted_and_defaulted(kube: Kube) -> None:
    kube.apply(yaml.safe_dump(with_("spec.model", {
        "version": "3", "uri": "pvc://store/resnet/3/model.pt2", "format": "export",
        "convert": {}})))
    convert = kube.get("md", "resnet")["spec"]["model"]["convert"]
    assert convert == {"target": "aoti", "quantize": "none", "activeDeadlineSeconds": 1800}
    # an exported program quantised as a graph, for a CPU
    cpu = with_("spec.model", {"version": "4", "uri": "pvc://store/resnet/4/model.pt2",
                               "format": "export", "convert": {"quantize": "int8-dynamic"}})
    cpu["spec"]["resources"] = {"cpu": "2"}
    kube.apply(yaml.safe_dump(cpu))
    assert kube.get("md", "resnet")["spec"]["model"]["convert"]["quantize"] == "int8-dynamic"


def test_a_generative_model_is_accepted_with_its_engine_settings(kube: Kube) -> None:
    body = llm(vllm={"maxModelLen": 8192, "dtype": "bfloat16",
                     "extraArgs": ["--enable-prefix-caching", "--max-num-seqs=64"]})
    body["spec"]["resources"] = {"gpu": {"count": 2}}
    kube.apply(yaml.safe_dump(body))
    spec = kube.get("md", "resnet")["spec"]
    assert spec["runtime"]["vllm"]["extraArgs"] == ["--enable-prefix-caching",
                                                    "--max-num-seqs=64"]


def test_scale_subresource_works_with_kubectl_scale(kube: Kube) -> None:
    kube.apply(yaml.safe_dump(VALID))
    kube.run("scale", "md/resnet", "--replicas=3")
    assert kube.get("md", "resnet")["spec"]["replicas"] == 3

"""Rendering the desired children: pure, deterministic, GPU-aware."""

from __future__ import annotations

import json
from typing import Any

import pytest

from modelyard.operator import api, render

OWNER = render.Owner("resnet", "vision", "uid-1")


def spec(**overrides: Any) -> api.ModelDeploymentSpec:
    body: dict[str, Any] = {"model": {"version": "3", "uri": "s3://models/resnet/3/model.pt"}}
    body.update(overrides)
    return api.parse_spec(body)


def test_rendering_is_deterministic() -> None:
    a = render.render_deployment(OWNER, spec(), 2)
    b = render.render_deployment(OWNER, spec(), 2)
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    key = render.HASH_ANNOTATION
    # Replicas alone are scaling, not a new shape of the Deployment: same digest.
    c = render.render_deployment(OWNER, spec(), 3)
    assert a["metadata"]["annotations"][key] == c["metadata"]["annotations"][key]
    assert c["spec"]["replicas"] == 3
    d = render.render_deployment(OWNER, spec(runtime={"port": 9000}), 2)
    assert a["metadata"]["annotations"][key] != d["metadata"]["annotations"][key]


def test_gpu_request_selects_the_product_and_tolerates_the_taint() -> None:
    dep = render.render_deployment(
        OWNER, spec(resources={"gpu": {"count": 2, "product": "NVIDIA-L4"}, "cpu": 4,
                               "memory": "16Gi"}), 1)
    pod = dep["spec"]["template"]["spec"]
    res = pod["containers"][0]["resources"]
    assert res["limits"] == {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "2"}
    assert res["requests"] == res["limits"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-L4"}
    assert pod["tolerations"][0] == {"key": "nvidia.com/gpu", "operator": "Exists",
                                     "effect": "NoSchedule"}
    env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
    assert env["MODELYARD_DEVICE"] == "cuda"


def test_cpu_model_neither_tolerates_nor_selects_gpu_nodes() -> None:
    pod = render.render_deployment(OWNER, spec(), 1)["spec"]["template"]["spec"]
    assert "tolerations" not in pod
    assert "nodeSelector" not in pod
    env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
    assert env["MODELYARD_DEVICE"] == "cpu"


def test_runtime_contract_env() -> None:
    s = spec(model={"version": "3", "uri": "s3://m/k", "sha256": "a" * 64, "name": "vision",
                    "optimize": {"dtype": "float16"}},
             runtime={"batching": {"maxBatchSize": 8, "maxDelayMs": 2.5},
                      "queue": {"maxWaitMs": 250},
                      "env": {"EXTRA": "1", "MODELYARD_MODEL_URI": "ignored"}},
             )
    env = {e["name"]: e["value"] for e in render.runtime_env(OWNER, s)}
    assert env["MODELYARD_MODEL_NAME"] == "vision"
    assert env["MODELYARD_MODEL_SHA256"] == "a" * 64
    assert env["MODELYARD_MAX_BATCH_SIZE"] == "8"
    assert env["MODELYARD_MAX_DELAY_MS"] == "2.5"
    assert "MODELYARD_MAX_QUEUE_ITEMS" not in env  # the default bound: the runtime's own
    assert env["MODELYARD_MAX_QUEUE_WAIT_MS"] == "250"
    assert env["MODELYARD_DTYPE"] == "float16"
    assert env["MODELYARD_MODEL_URI"] == "s3://m/k"  # user env cannot silently override
    assert env["EXTRA"] == "1"


def test_pvc_uri_is_mounted_read_only_and_read_as_a_file() -> None:
    dep = render.render_deployment(
        OWNER, spec(model={"version": "1", "uri": "pvc://models/resnet/1/model.pt"}), 1)
    pod = dep["spec"]["template"]["spec"]
    assert {"name": "model-store", "persistentVolumeClaim": {"claimName": "models",
                                                             "readOnly": True}} in pod["volumes"]
    env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
    assert env["MODELYARD_MODEL_URI"] == "file:///mnt/models/models/resnet/1/model.pt"


def test_credentials_secret_becomes_env_from() -> None:
    dep = render.render_deployment(
        OWNER, spec(model={"version": "1", "uri": "s3://b/k", "credentialsSecret": "s3"}), 1)
    assert dep["spec"]["template"]["spec"]["containers"][0]["envFrom"] == [
        {"secretRef": {"name": "s3"}}]


@pytest.mark.parametrize(("version", "slug"), [
    ("3", "3"), ("v2", "v2"), ("2024.01_RC1", None), ("A" * 63, None)])
def test_version_slugs_are_dns_safe_and_distinct(version: str, slug: str | None) -> None:
    got = render.version_slug(version)
    if slug:
        assert got == slug
    assert len(render.deployment_name("x" * api.MAX_NAME_LENGTH, version)) <= 63
    assert all(c.isalnum() or c == "-" for c in got)
    assert got == got.lower()


def test_slugs_do_not_collide_when_characters_are_replaced() -> None:
    assert render.version_slug("1.0") != render.version_slug("1-0")
    assert render.version_slug("RC") != render.version_slug("rc")


def test_autoscaling_starts_at_its_minimum() -> None:
    s = spec(replicas=5, autoscaling={"minReplicas": 2, "maxReplicas": 4, "target": 8})
    assert render.replicas_wanted(s) == 2


def llm_spec(**runtime: Any) -> api.ModelDeploymentSpec:
    return api.parse_spec({
        "model": {"version": "7", "uri": "pvc://weights/chat/7", "format": "hf",
                  "sha256": "a" * 64},
        "runtime": {"engine": "vllm", **runtime},
        "resources": {"gpu": {"count": 2, "product": "NVIDIA-H100-80GB-HBM3"}}})


def test_a_generative_model_runs_vllm_under_the_launcher() -> None:
    dep = render.render_deployment(OWNER, llm_spec(vllm={
        "maxModelLen": 8192, "dtype": "bfloat16", "gpuMemoryUtilization": 0.85,
        "extraArgs": ["--enable-prefix-caching"]}), 1)
    pod = dep["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["image"] == api.DEFAULT_VLLM_IMAGE
    assert container["command"] == ["python3", "-m", "modelyard.runtime.llm"]
    # Tensor parallelism is the GPUs of a replica; the launcher adds model, name and port.
    assert container["args"] == ["--dtype", "bfloat16", "--max-model-len", "8192",
                                 "--gpu-memory-utilization", "0.85",
                                 "--tensor-parallel-size", "2", "--enable-prefix-caching"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["MODELYARD_MODEL_NAME"] == "resnet"
    assert env["MODELYARD_MODEL_URI"] == "file:///mnt/models/weights/chat/7"
    assert env["MODELYARD_MODEL_SHA256"] == "a" * 64
    assert "MODELYARD_MAX_BATCH_SIZE" not in env  # the engine batches on its own
    # Ready is the launcher's verdict (a real completion answered), on its own port;
    # clients reach vLLM's port directly.
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "health"}
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
        "http": 8080, "health": 8081}
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}


def test_the_tensor_runtime_renders_as_before() -> None:
    # The engine field and its default image leave a tensor model's Deployment unchanged:
    # its digest is what it was, so upgrading the operator starts no rollout.
    dep = render.render_deployment(OWNER, spec(), 1)
    [container] = dep["spec"]["template"]["spec"]["containers"]
    assert container["image"] == api.DEFAULT_RUNTIME_IMAGE
    assert "command" not in container
    assert dep["metadata"]["annotations"][render.HASH_ANNOTATION] == "b57a987c78fd0530"


def test_the_node_cache_is_mounted_where_the_engines_cache_models() -> None:
    cache = render.NodeCache("/var/lib/modelyard/models", 200 * 2**30)
    for body in (llm_spec(), spec()):
        dep = render.render_deployment(OWNER, body, 1, cache)
        pod = dep["spec"]["template"]["spec"]
        [container] = pod["containers"]
        # Through the namespace's claim: no hostPath in the pod, which Pod Security's
        # baseline and restricted levels would refuse.
        assert {"name": "node-cache", "persistentVolumeClaim": {
            "claimName": cache.claim_name}} in pod["volumes"]
        assert not [v for v in pod["volumes"] if "hostPath" in v]
        assert {"name": "node-cache", "mountPath": render.MODEL_CACHE_DIR} in \
            container["volumeMounts"]
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["MODELYARD_CACHE_DIR"] == render.MODEL_CACHE_DIR
        assert env["MODELYARD_CACHE_MAX_BYTES"] == str(200 * 2**30)  # both engines evict
    # Without one, nothing changes: the pod's own emptyDir.
    plain = render.render_deployment(OWNER, spec(), 1)["spec"]["template"]["spec"]
    assert not [v for v in plain["volumes"] if "hostPath" in v]


def test_the_node_cache_claim_is_pre_bound_to_a_volume_of_the_cache_directory() -> None:
    cache = render.NodeCache("/var/lib/modelyard/models", 200 * 2**30)
    volume, claim = cache.claim("team-a")
    assert claim["metadata"] == {"name": cache.claim_name, "namespace": "team-a",
                                 "labels": volume["metadata"]["labels"]}
    # Each binds only the other: the claim names the volume, the volume the claim, and
    # neither takes a storage class's dynamic provisioning.
    assert claim["spec"]["volumeName"] == volume["metadata"]["name"] == \
        cache.volume_name("team-a")
    assert volume["spec"]["claimRef"]["namespace"] == "team-a"
    assert volume["spec"]["claimRef"]["name"] == cache.claim_name
    assert claim["spec"]["storageClassName"] == volume["spec"]["storageClassName"] == ""
    assert volume["spec"]["hostPath"] == {"path": "/var/lib/modelyard/models",
                                          "type": "DirectoryOrCreate"}
    assert volume["spec"]["persistentVolumeReclaimPolicy"] == "Retain"
    assert volume["spec"]["capacity"] == claim["spec"]["resources"]["requests"] == \
        {"storage": str(200 * 2**30)}
    # One volume per namespace; another path is another claim (a volume's path is fixed).
    assert cache.volume_name("team-b") != cache.volume_name("team-a")
    assert render.NodeCache("/srv/cache").claim_name != cache.claim_name
    assert len(cache.volume_name("n" * 63)) <= 253


def test_the_operator_reads_the_node_cache_from_the_chart_s_variables() -> None:
    from modelyard.operator.handlers import node_cache_from_env

    assert node_cache_from_env({}) is None
    assert node_cache_from_env({"MODELYARD_NODE_CACHE_PATH": "/c",
                                "MODELYARD_NODE_CACHE_MAX_BYTES": "2Gi"}) == \
        render.NodeCache("/c", 2 * 2**30)
    assert node_cache_from_env({"MODELYARD_NODE_CACHE_PATH": "/c",
                                "MODELYARD_NODE_CACHE_MAX_BYTES": ""}) == render.NodeCache("/c")


def test_grpc_port_is_rendered_in_the_pod_and_the_service_when_asked() -> None:
    s = spec(runtime={"grpcPort": 8081})
    [container] = render.render_deployment(OWNER, s, 1)["spec"]["template"]["spec"]["containers"]
    assert {"name": "grpc", "containerPort": 8081, "protocol": "TCP"} in container["ports"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["MODELYARD_GRPC_PORT"] == "8081"
    service = render.render_service(OWNER, grpc_port=s.runtime.grpc_port)
    assert {"name": "grpc", "port": 8081, "targetPort": "grpc", "protocol": "TCP",
            "appProtocol": "kubernetes.io/h2c"} in service["spec"]["ports"]
    # unset: REST only, and the pod is what it was
    [plain] = render.render_deployment(OWNER, spec(), 1)["spec"]["template"]["spec"]["containers"]
    assert [p["name"] for p in plain["ports"]] == ["http"]
    assert "MODELYARD_GRPC_PORT" not in {e["name"] for e in plain["env"]}
    assert [p["name"] for p in render.render_service(OWNER)["spec"]["ports"]] == ["http"]


def test_a_declared_signature_reaches_the_runtime_as_its_metadata() -> None:
    s = spec(model={"version": "1", "uri": "s3://m/k",
                    "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]})
    env = {e["name"]: e["value"] for e in render.runtime_env(OWNER, s)}
    assert json.loads(env["MODELYARD_METADATA"]) == {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}], "outputs": []}
    assert "MODELYARD_METADATA" not in {e["name"] for e in render.runtime_env(OWNER, spec())}
    with pytest.raises(ValueError, match="datatype"):
        spec(model={"version": "1", "uri": "s3://m/k",
                    "inputs": [{"name": "x", "datatype": "FLOAT", "shape": [-1]}]})
    with pytest.raises(ValueError, match="shape"):
        spec(model={"version": "1", "uri": "s3://m/k",
                    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-2]}]})


def test_explanations_are_rendered_only_when_enabled_and_read_back_by_the_runtime() -> None:
    """spec.runtime.explain reaches the runtime as its MODELYARD_EXPLAIN* settings, which
    the runtime's own parser reads into its config; unset or off, the pod is what it was."""
    from modelyard.runtime.config import parse_config

    s = spec(model={"version": "1", "uri": "s3://m/k.pt2", "format": "export"},
             runtime={"explain": {"enabled": True, "method": "saliency", "steps": 64,
                                  "maxBatchSize": 2, "maxConcurrent": 3}})
    env = {e["name"]: e["value"] for e in render.runtime_env(OWNER, s)}
    assert {k: v for k, v in env.items() if k.startswith("MODELYARD_EXPLAIN")} == {
        "MODELYARD_EXPLAIN": "true", "MODELYARD_EXPLAIN_METHOD": "saliency",
        "MODELYARD_EXPLAIN_STEPS": "64", "MODELYARD_EXPLAIN_MAX_BATCH_SIZE": "2",
        "MODELYARD_EXPLAIN_MAX_CONCURRENT": "3"}
    config = parse_config([], env)
    assert (config.explain, config.explain_method, config.explain_steps,
            config.explain_max_batch_size, config.explain_max_concurrent) == (
        True, "saliency", 64, 2, 3)
    for runtime in ({}, {"explain": {"enabled": False, "steps": 8}}):
        plain = render.runtime_env(OWNER, spec(runtime=runtime))
        assert not [e for e in plain if e["name"].startswith("MODELYARD_EXPLAIN")]
        assert parse_config([], {e["name"]: e["value"] for e in plain}).explain is False
    with pytest.raises(ValueError, match="less than or equal to 512"):
        spec(runtime={"explain": {"enabled": True, "steps": 10_000}})

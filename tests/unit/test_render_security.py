"""The endpoint's security as rendered: API keys mounted from their Secret, passed to vLLM,
and carried through the activator."""

from __future__ import annotations

from typing import Any

from modelyard.activator.routing import forward_headers, ready_endpoints
from modelyard.operator import api, render

OWNER = render.Owner("resnet", "vision", "uid-1")


def spec(**overrides: Any) -> api.ModelDeploymentSpec:
    body: dict[str, Any] = {"model": {"version": "3", "uri": "s3://models/resnet/3/model.pt"}}
    body.update(overrides)
    return api.parse_spec(body)


def pod_of(spec_: api.ModelDeploymentSpec) -> dict[str, Any]:
    return render.render_deployment(OWNER, spec_, 1)["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def test_without_auth_no_key_is_mounted_or_configured() -> None:
    pod = pod_of(spec())
    [container] = pod["containers"]
    assert "api-keys" not in {v["name"] for v in pod["volumes"]}
    assert "MODELYARD_API_KEYS" not in {e["name"] for e in container["env"]}


def test_the_runtime_mounts_the_api_key_secret_and_reads_it_from_there() -> None:
    pod = pod_of(spec(auth={"apiKeySecret": "resnet-keys"}))
    [container] = pod["containers"]
    assert {"name": "api-keys", "secret": {"secretName": "resnet-keys", "defaultMode": 0o440}} \
        in pod["volumes"]
    assert {"name": "api-keys", "mountPath": render.API_KEYS_DIR, "readOnly": True} \
        in container["volumeMounts"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MODELYARD_API_KEYS"] == render.API_KEYS_DIR
    # A volume, not an env var: the kubelet updates it in place (rotation without restart).
    assert not any("valueFrom" in e for e in container["env"])
    # Probes carry no key: the runtime leaves them open.
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/models/resnet/ready"


def test_vllm_reads_its_one_key_from_the_secret_s_api_key_entry() -> None:
    pod = pod_of(api.parse_spec({
        "model": {"version": "7", "uri": "s3://m/chat/7", "format": "hf"},
        "runtime": {"engine": "vllm"}, "auth": {"apiKeySecret": "chat-keys"}}))
    [container] = pod["containers"]
    assert {"name": "VLLM_API_KEY", "valueFrom": {"secretKeyRef": {
        "name": "chat-keys", "key": "api-key"}}} in container["env"]
    assert "api-keys" not in {v["name"] for v in pod["volumes"]}


def test_the_activator_forwards_the_authorization_header() -> None:
    headers = [("Host", "resnet.vision"), ("Authorization", "Bearer k-1"),
               ("Connection", "keep-alive"), ("Proxy-Authorization", "Basic x")]
    assert forward_headers(headers) == [("Host", "resnet.vision"),
                                        ("Authorization", "Bearer k-1")]


def test_tls_mounts_the_certificate_and_probes_over_https() -> None:
    dep = render.render_deployment(OWNER, spec(tls={"secretName": "resnet-tls"}), 1)
    template = dep["spec"]["template"]
    pod = template["spec"]
    [container] = pod["containers"]
    assert {"name": "tls", "secret": {"secretName": "resnet-tls", "defaultMode": 0o440}} \
        in pod["volumes"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["MODELYARD_TLS_CERT_FILE"] == f"{render.TLS_DIR}/tls.crt"
    assert env["MODELYARD_TLS_KEY_FILE"] == f"{render.TLS_DIR}/tls.key"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["scheme"] == "HTTPS"
    assert template["metadata"]["annotations"]["prometheus.io/scheme"] == "https"
    assert template["metadata"]["annotations"]["modelyard.dev/scheme"] == "https"
    plain = render.render_deployment(OWNER, spec(), 1)["spec"]["template"]
    assert "scheme" not in plain["spec"]["containers"][0]["readinessProbe"]["httpGet"]
    assert "modelyard.dev/scheme" not in plain["metadata"]["annotations"]


def test_the_activator_reaches_a_tls_pod_over_https() -> None:
    def pod(annotations: dict[str, str]) -> dict[str, Any]:
        return {"metadata": {"annotations": annotations},
                "status": {"podIP": "10.0.0.7",
                           "conditions": [{"type": "Ready", "status": "True"}]}}
    [tls] = ready_endpoints([pod({"modelyard.dev/scheme": "https"})])
    [plain] = ready_endpoints([pod({})])
    assert tls.url == "https://10.0.0.7:8080"
    assert plain.url == "http://10.0.0.7:8080"

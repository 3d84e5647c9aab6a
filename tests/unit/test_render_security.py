"""The endpoint's security as rendered: API keys mounted from their Secret, passed to vLLM,
and carried through the activator."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pydantic
import pytest
from worlds import world_of

from modelyard.activator.routing import forward_headers, ready_endpoints
from modelyard.operator import api, render
from modelyard.operator.handlers import network_peers_from_env
from modelyard.operator.plan import plan

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


OPERATOR = render.namespace_peer("modelyard-system", {"app.kubernetes.io/component": "operator"})


def test_a_model_s_network_policy_admits_its_namespace_and_modelyard_by_default() -> None:
    policy = render.render_network_policy(OWNER, spec(), [OPERATOR])
    assert policy["kind"] == "NetworkPolicy"
    assert policy["metadata"]["name"] == "resnet"
    assert policy["metadata"]["ownerReferences"][0]["kind"] == "ModelDeployment"
    body = policy["spec"]
    assert body["podSelector"] == {"matchLabels": {"modelyard.dev/model-deployment": "resnet"}}
    assert body["policyTypes"] == ["Ingress"]  # egress (the model store, DNS) left alone
    [rule] = body["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 8080}]
    assert rule["from"] == [{"podSelector": {}}, OPERATOR]


def test_named_clients_replace_the_namespace_and_the_gateway_is_admitted() -> None:
    clients = [{"namespaceSelector": {"matchLabels": {"team": "vision"}},
                "podSelector": {"matchLabels": {"app": "frontend"}}},
               {"podSelector": {"matchLabels": {"role": "batch"}}}]
    policy = render.render_network_policy(OWNER, spec(
        networkPolicy={"clients": clients}, gateway={"name": "gw", "namespace": "infra"},
        runtime={"port": 9000}), [OPERATOR])
    [rule] = policy["spec"]["ingress"]
    assert rule["from"] == [
        {"namespaceSelector": {"matchLabels": {"team": "vision"}},
         "podSelector": {"matchLabels": {"app": "frontend"}}},
        {"podSelector": {"matchLabels": {"role": "batch"}}},
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "infra"}}},
        OPERATOR]
    assert rule["ports"] == [{"protocol": "TCP", "port": 9000}]
    with_grpc = render.render_network_policy(OWNER, spec(runtime={"grpcPort": 8081}))
    assert with_grpc["spec"]["ingress"][0]["ports"] == [  # gRPC, when served, too
        {"protocol": "TCP", "port": 8080}, {"protocol": "TCP", "port": 8081}]


def test_the_policy_is_planned_by_default_and_not_when_turned_off() -> None:
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    body = {"model": {"version": "1", "uri": "s3://b/m.pt"}}
    on = plan(world_of(body, network_peers=(OPERATOR,)), None, None, now)
    [policy] = [o for o in on.apply if o["kind"] == "NetworkPolicy"]
    assert OPERATOR in policy["spec"]["ingress"][0]["from"]
    off = plan(world_of({**body, "networkPolicy": {"enabled": False}}), None, None, now)
    assert not [o for o in off.apply if o["kind"] == "NetworkPolicy"]


def test_the_operator_reads_the_peers_the_chart_renders() -> None:
    assert network_peers_from_env({}) == ()
    peers = [OPERATOR, {"namespaceSelector": {"matchLabels": {"x": "y"}}}]
    assert network_peers_from_env({"MODELYARD_NETWORK_PEERS": json.dumps(peers)}) == \
        tuple(peers)
    with pytest.raises(ValueError, match="JSON list"):
        network_peers_from_env({"MODELYARD_NETWORK_PEERS": '{"a": 1}'})


def test_a_client_names_at_least_one_selector() -> None:
    with pytest.raises(pydantic.ValidationError):
        spec(networkPolicy={"clients": [{"unknown": {}}]})


def test_the_vllm_launcher_sends_the_key_with_its_readiness_completion(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM with --api-key / VLLM_API_KEY refuses /v1 without it: the launcher's own
    completion (what makes the pod Ready) must carry the key, or the pod never turns Ready."""
    import http.server
    import threading

    from modelyard.runtime import llm

    seen: list[str | None] = []

    class Engine(http.server.BaseHTTPRequestHandler):  # vLLM's auth middleware, as seen
        def do_POST(self) -> None:
            seen.append(self.headers.get("Authorization"))
            self.rfile.read(int(self.headers["Content-Length"]))
            ok = self.headers.get("Authorization") == "Bearer engine-key-1"
            body = json.dumps({"choices": [{"text": "!"}]} if ok else
                              {"error": "Unauthorized"}).encode()
            self.send_response(200 if ok else 401)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Engine)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        config = llm.parse_config([], {"MODELYARD_MODEL_NAME": "chat",
                                       "MODELYARD_MODEL_URI": "s3://m/chat/7/"})
        launcher = llm.Launcher(config)
        base = f"http://127.0.0.1:{server.server_address[1]}"
        monkeypatch.delenv("VLLM_API_KEY", raising=False)
        launcher._first_completion(base)
        assert not launcher.state.answered  # refused without the key
        monkeypatch.setenv("VLLM_API_KEY", "engine-key-1")
        launcher._first_completion(base)
        assert launcher.state.answered
        assert seen == [None, "Bearer engine-key-1"]
    finally:
        server.shutdown()
        server.server_close()

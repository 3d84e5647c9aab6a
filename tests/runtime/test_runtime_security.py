"""The endpoint's security, on one real runtime process and real HTTP clients: HTTPS from a
certificate chain made here (CA -> server certificate, clients verifying against the CA, a
renewal served without a restart) and API keys from a mounted Secret (rotated without a
restart). Both Secrets are written the way the kubelet updates a Secret volume."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from cryptography import x509
from runtime_support import CertificateAuthority, free_port

from modelyard.activator.discovery import Lookup
from modelyard.activator.proxy import Activator
from modelyard.activator.routing import Endpoint, ModelRef, ready_endpoints
from modelyard.activator.settings import Settings
from modelyard.operator.measure import scrape_metrics
from modelyard.runtime.client import (
    Client,
    InferenceServerError,
    decode_response,
    encode_request,
)

KEY_A = "key-a-7f3c1e2d9b8a"
KEY_B = "key-b-0d4e5f6a7b8c"
KEY_C = "key-c-91ab23cd45ef"


def write_secret(directory: Path, entries: dict[str, str], generation: int) -> None:
    """Write a Secret volume the way the kubelet does: the entries in a fresh timestamped
    directory, ``..data`` swapped to it atomically, each entry a link through ``..data``."""
    target = directory / f"..gen_{generation}"
    target.mkdir()
    for name, value in entries.items():
        (target / name).write_text(value)
    link = directory / "..data_tmp"
    link.symlink_to(target.name)
    link.rename(directory / "..data")
    for name in entries:
        entry = directory / name
        if not entry.is_symlink():
            entry.symlink_to(Path("..data") / name)
    for stale in directory.iterdir():
        if stale.is_symlink() and stale.name != "..data" and not stale.exists():
            stale.unlink()


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority()


@pytest.fixture(scope="module")
def verify(ca: CertificateAuthority) -> ssl.SSLContext:
    """What a client trusts: only the test CA."""
    return ssl.create_default_context(cadata=ca.pem.decode())


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory: pytest.TempPathFactory, ca: CertificateAuthority) -> Path:
    directory = tmp_path_factory.mktemp("tls")
    write_secret(directory, ca.issue()[0], 1)
    return directory


def served_serial(port: int, verify: ssl.SSLContext) -> int:
    """The serial number of the certificate a new TLS connection is given (verified)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            verify.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


@pytest.fixture(scope="module")
def keys_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("api-keys")
    write_secret(directory, {"current": KEY_A + "\n", "next": f"{KEY_B}\n"}, 1)
    return directory


@pytest.fixture(scope="module")
def guarded(start_server, models: dict[str, Path], keys_dir: Path, tls_dir: Path,  # type: ignore[no-untyped-def]
            verify: ssl.SSLContext):
    """The runtime as the operator configures a pod with spec.auth and spec.tls."""
    server = start_server({
        "MODELYARD_MODEL_NAME": "mlp",
        "MODELYARD_MODEL_VERSION": "3",
        "MODELYARD_MODEL_URI": f"file://{models['mlp']}",
        "MODELYARD_API_KEYS": str(keys_dir),
        "MODELYARD_TLS_CERT_FILE": str(tls_dir / "tls.crt"),
        "MODELYARD_TLS_KEY_FILE": str(tls_dir / "tls.key"),
        "MODELYARD_GRPC_PORT": str(free_port()),
    }, ready=False)
    server.url = server.url.replace("http://", "https://")
    deadline = time.monotonic() + 90
    while True:
        assert server.process.poll() is None, server.log()
        try:
            if httpx.get(f"{server.url}/v2/models/mlp/ready", verify=verify).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.1)


@pytest.fixture
def no_env_key() -> Iterator[None]:
    saved = os.environ.pop("MODELYARD_API_KEY", None)
    yield
    if saved is not None:
        os.environ["MODELYARD_API_KEY"] = saved


X = np.ones((2, 4), dtype=np.float32)


def test_https_only_verified_against_the_ca(guarded, verify) -> None:
    assert httpx.get(f"{guarded.url}/v2/health/live", verify=verify).status_code == 200
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{guarded.url}/v2/health/live")  # the system's CAs do not know ours
    with pytest.raises(httpx.HTTPError):  # no plain HTTP on the port
        httpx.get(guarded.url.replace("https://", "http://") + "/v2/health/live")


def test_probes_and_metrics_answer_without_a_key(guarded, verify) -> None:
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/mlp/ready",
                 "/v2/models/mlp/versions/3/ready", "/metrics"):
        assert httpx.get(guarded.url + path, verify=verify).status_code == 200, path


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-key-123", f"Basic {KEY_A}",
                                          f"Bearer {KEY_A}x", "Bearer"])
def test_inference_and_metadata_without_a_valid_key_are_401(guarded, verify,
                                                            authorization) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    for method, path in (("POST", "/v2/models/mlp/infer"), ("POST", "/v1/models/mlp:predict"),
                         ("GET", "/v2/models/mlp"), ("GET", "/v2"), ("GET", "/v1/models")):
        response = httpx.request(method, guarded.url + path, headers=headers, content=b"{}",
                                 verify=verify)
        assert response.status_code == 401, (path, response.text)
        assert response.headers["www-authenticate"] == "Bearer"
        assert "Authorization: Bearer" in response.json()["error"]
        assert "wrong-key" not in response.text
        assert KEY_A not in response.text


def test_every_key_of_the_secret_is_valid(guarded, verify, no_env_key) -> None:
    for key in (KEY_A, KEY_B):
        with Client(guarded.url, "mlp", api_key=key, verify=verify) as client:
            assert client.infer({"input": X})["logits"].shape == (2, 3)
            assert client.metadata()["name"] == "mlp"
    with Client(guarded.url, "mlp", verify=verify) as client, \
            pytest.raises(InferenceServerError) as refused:
        client.infer({"input": X})
    assert refused.value.status == 401


def test_no_payload_reaches_the_log(guarded, verify) -> None:
    """Tensors, request IDs and bad bodies are answered, never logged (docs/security.md)."""
    auth = {"Authorization": f"Bearer {KEY_B}"}
    marker = 7321.8125  # exact in float32: it would appear as written
    body = {"id": "patient-4711", "inputs": [
        {"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [marker, 1, 2, 3]}]}
    url = f"{guarded.url}/v2/models/mlp/infer"
    answered = httpx.post(url, json=body, headers=auth, verify=verify)
    assert answered.status_code == 200
    assert answered.json()["id"] == "patient-4711"
    bad = httpx.post(url, content=b'{"inputs": [{"name": "secret-diagnosis-91"',
                     headers=auth, verify=verify)
    assert bad.status_code == 400
    predicted = httpx.post(f"{guarded.url}/v1/models/mlp:predict", headers=auth, verify=verify,
                           json={"instances": [[marker, 0, 0, 0]]})
    assert predicted.status_code == 200
    log = guarded.log()
    for secret in ("7321.8125", "patient-4711", "secret-diagnosis-91", KEY_B):
        assert secret not in log


def test_the_client_takes_its_key_from_the_environment(guarded, verify, no_env_key) -> None:
    os.environ["MODELYARD_API_KEY"] = KEY_B
    with Client(guarded.url, "mlp", verify=verify) as client:
        assert client.predict([[1.0, 2.0, 3.0, 4.0]])


def test_a_rotated_secret_takes_effect_without_a_restart(guarded, verify,
                                                         keys_dir: Path) -> None:
    pid = guarded.process.pid
    # Rotation: KEY_A retired, KEY_B kept, KEY_C added, as the kubelet updates the volume.
    write_secret(keys_dir, {"next": KEY_B, "newest": f"{KEY_C}\n"}, 2)
    url = f"{guarded.url}/v2/models/mlp"
    deadline = time.monotonic() + 30
    while httpx.get(url, headers={"Authorization": f"Bearer {KEY_C}"},
                     verify=verify).status_code != 200:
        assert time.monotonic() < deadline, "the new key was never accepted"
        time.sleep(0.1)
    assert httpx.get(url, headers={"Authorization": f"Bearer {KEY_A}"},
                     verify=verify).status_code == 401
    assert httpx.get(url, headers={"Authorization": f"Bearer {KEY_B}"},
                     verify=verify).status_code == 200
    assert guarded.process.pid == pid
    assert guarded.process.poll() is None
    assert KEY_A not in guarded.log()
    assert KEY_C not in guarded.log()


def test_a_renewed_certificate_is_served_without_a_restart(guarded, verify, ca,
                                                          tls_dir: Path) -> None:
    pid = guarded.process.pid
    port = int(guarded.url.rsplit(":", 1)[1])
    first = served_serial(port, verify)
    entries, renewed = ca.issue()  # what cert-manager writes when it renews
    write_secret(tls_dir, entries, 2)
    deadline = time.monotonic() + 30
    while (serial := served_serial(port, verify)) != renewed:
        assert serial == first
        assert time.monotonic() < deadline, "the renewed certificate was never served"
        time.sleep(0.2)
    with Client(guarded.url, "mlp", api_key=KEY_B, verify=verify) as client:
        assert client.infer({"input": X})["logits"].shape == (2, 3)
    assert guarded.process.pid == pid
    assert guarded.process.poll() is None
    assert "TLS certificate reloaded" in guarded.log()


def test_the_operator_scrapes_metrics_over_tls(guarded) -> None:
    """Canary analysis and autoscaling read /metrics by pod IP; the TLS-only port is found."""
    port = int(guarded.url.rsplit(":", 1)[1])
    text = asyncio.run(scrape_metrics("127.0.0.1", port))
    assert text is not None
    assert "modelyard_requests_total" in text


class _Pods:
    """The activator's Kubernetes lookups, played: the model's one ready pod."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint

    async def lookup(self, ref: ModelRef) -> Lookup:
        return Lookup([self.endpoint])


def test_the_activator_carries_the_key_to_a_tls_pod(guarded, verify) -> None:
    port = int(guarded.url.rsplit(":", 1)[1])
    [endpoint] = ready_endpoints([{
        "metadata": {"annotations": {"modelyard.dev/scheme": "https"}},
        "spec": {"containers": [{"ports": [{"name": "http", "containerPort": port}]}]},
        "status": {"podIP": "127.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]},
    }])
    assert endpoint.url == guarded.url
    activator = Activator(Settings(), _Pods(endpoint))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(activator, log_level="warning", lifespan="off"))

    async def serve() -> None:
        try:
            await server.serve(sockets=[sock])
        finally:
            await activator.aclose()

    thread = threading.Thread(target=lambda: asyncio.run(serve()), daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        host = {"Host": "mlp.ns.svc"}
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        body, headers = encode_request({"input": X})
        answer = httpx.post(f"{url}/v2/models/mlp/infer", content=body, headers={
            **headers, **host, "Authorization": f"Bearer {KEY_B}"})
        assert answer.status_code == 200, answer.text
        assert decode_response(answer.content, answer.headers)["logits"].shape == (2, 3)
        refused = httpx.get(f"{url}/v2/models/mlp", headers=host)
        assert refused.status_code == 401
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def test_the_page_asks_for_the_key_and_keeps_it_in_the_tab(guarded) -> None:
    """The page at / in headless Chromium, on the guarded HTTPS server."""
    from playwright import sync_api
    from test_runtime_browser import ARGS, CHROMIUM

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(ignore_https_errors=True)  # the test CA is not Chromium's
        try:
            page.goto(guarded.url + "/")
            page.wait_for_selector("#key-section:not([hidden])", timeout=20_000)
            page.fill("#api-key", "wrong")
            page.click("#use-key")
            page.wait_for_function(
                "document.getElementById('key-error').textContent.includes('invalid API key')",
                timeout=20_000)
            page.fill("#api-key", KEY_B)
            page.click("#use-key")
            page.wait_for_selector("body[data-loaded=true]", timeout=20_000)
            assert page.is_hidden("#key-section")
            page.click("#submit")
            page.wait_for_function(
                "document.getElementById('took').textContent.startsWith('HTTP')",
                timeout=20_000)
            assert page.text_content("#took").startswith("HTTP 200")
            assert page.evaluate("sessionStorage.getItem('modelyard-api-key')") == KEY_B
            assert KEY_B not in page.url
        finally:
            browser.close()


def test_grpc_is_tls_only_with_the_same_keys_and_follows_a_renewal(guarded, ca,
                                                                   tls_dir: Path) -> None:
    """OIP over gRPC on the same pod: TLS verified against the CA, probes open, the API keys
    as ``authorization`` metadata (UNAUTHENTICATED without), a renewal picked up without a
    restart (the next handshake gets it)."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    target = f"127.0.0.1:{guarded.grpc_port}"
    credentials = grpc.ssl_channel_credentials(root_certificates=ca.pem)
    with grpc.secure_channel(target, credentials) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerLive(service_pb2.ServerLiveRequest()).live
        metadata = service_pb2.ModelMetadataRequest(name="mlp")
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelMetadata(metadata, metadata=(("authorization", "Bearer wrong"),))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "wrong" not in (refused.value.details() or "")
        answer = stub.ModelMetadata(metadata, metadata=(("authorization", f"Bearer {KEY_B}"),))
        assert answer.name == "mlp"
    with grpc.insecure_channel(target) as plain:  # no cleartext beside TLS
        with pytest.raises(grpc.RpcError) as cleartext:
            service_pb2_grpc.GRPCInferenceServiceStub(plain).ServerLive(
                service_pb2.ServerLiveRequest(), timeout=5)
        assert cleartext.value.code() == grpc.StatusCode.UNAVAILABLE

    verify = ssl.create_default_context(cadata=ca.pem.decode())
    verify.set_alpn_protocols(["h2"])  # what a gRPC client offers
    entries, renewed = ca.issue()
    write_secret(tls_dir, entries, 3)
    deadline = time.monotonic() + 30
    while served_serial(guarded.grpc_port, verify) != renewed:
        assert time.monotonic() < deadline, "gRPC never served the renewed certificate"
        time.sleep(0.2)

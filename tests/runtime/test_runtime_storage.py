"""Fetching models: paths, file://, a real local HTTP server (retries, cache), S3 via moto."""

from __future__ import annotations

import hashlib
import http.server
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from runtime_support import free_port
from support import moto_s3

from modelyard.runtime.errors import ChecksumMismatch, StorageError
from modelyard.runtime.storage import fetch, sha256_of

PAYLOAD = b"model bytes " * 1000
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()


def test_plain_path_and_file_uri(tmp_path: Path) -> None:
    model = tmp_path / "model.pt"
    model.write_bytes(PAYLOAD)
    assert fetch(str(model), tmp_path / "cache", DIGEST) == model
    assert fetch(f"file://{model}", tmp_path / "cache", DIGEST.upper()) == model
    assert sha256_of(model) == DIGEST
    assert not (tmp_path / "cache").exists()  # local files are used in place


def test_missing_file_and_unknown_scheme(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="not found"):
        fetch(str(tmp_path / "nope.pt"), tmp_path)
    with pytest.raises(StorageError, match="unsupported URI scheme"):
        fetch("ftp://host/model.pt", tmp_path)


def test_checksum_mismatch_is_refused_clearly(tmp_path: Path) -> None:
    model = tmp_path / "model.pt"
    model.write_bytes(PAYLOAD)
    with pytest.raises(ChecksumMismatch, match="refusing to serve") as caught:
        fetch(str(model), tmp_path, "0" * 64)
    assert DIGEST in str(caught.value)


class _Handler(http.server.BaseHTTPRequestHandler):
    failures_left = 0
    hits = 0

    def do_GET(self) -> None:
        type(self).hits += 1
        if self.path == "/missing.pt":
            self.send_error(404)
            return
        if type(self).failures_left > 0:
            type(self).failures_left -= 1
            self.send_error(503)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAYLOAD)))
        self.end_headers()
        self.wfile.write(PAYLOAD)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_origin() -> Iterator[str]:
    _Handler.failures_left = 0
    _Handler.hits = 0
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_http_retries_then_caches(http_origin: str, tmp_path: Path) -> None:
    _Handler.failures_left = 2
    path = fetch(f"{http_origin}/models/m.pt", tmp_path, DIGEST, backoff_s=0.01)
    assert path.read_bytes() == PAYLOAD
    assert path.is_relative_to(tmp_path)
    assert _Handler.hits == 3  # two 503s, then the file
    again = fetch(f"{http_origin}/models/m.pt", tmp_path, DIGEST, backoff_s=0.01)
    assert again == path
    assert _Handler.hits == 3  # served from the cache, not downloaded again
    assert not list(path.parent.glob(".part-*"))


def test_http_404_fails_without_retrying(http_origin: str, tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="HTTP 404"):
        fetch(f"{http_origin}/missing.pt", tmp_path, backoff_s=0.01)
    assert _Handler.hits == 1


def test_http_gives_up_after_the_attempts(http_origin: str, tmp_path: Path) -> None:
    _Handler.failures_left = 10
    with pytest.raises(StorageError, match="after 3 attempts: HTTP 503"):
        fetch(f"{http_origin}/m.pt", tmp_path, attempts=3, backoff_s=0.01)


def test_http_checksum_mismatch_leaves_no_cached_file(http_origin: str, tmp_path: Path) -> None:
    with pytest.raises(ChecksumMismatch):
        fetch(f"{http_origin}/m.pt", tmp_path, "f" * 64, backoff_s=0.01)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_https_trusts_the_ca_bundle_it_is_given(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """An https origin is verified: against certifi's CAs by default (the images have no
    system store), against SSL_CERT_FILE when set (a private CA)."""
    from runtime_support import CertificateAuthority

    from modelyard.runtime import storage

    ca = CertificateAuthority()
    secret, _ = ca.issue()
    (tmp_path / "tls.crt").write_text(secret["tls.crt"])
    (tmp_path / "tls.key").write_text(secret["tls.key"])
    (tmp_path / "ca.crt").write_text(secret["ca.crt"])
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "tls.crt", tmp_path / "tls.key")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"https://127.0.0.1:{server.server_address[1]}/m.pt"
    try:
        monkeypatch.delenv("SSL_CERT_FILE", raising=False)
        storage._pool.cache_clear()
        with pytest.raises(StorageError, match="CERTIFICATE_VERIFY_FAILED"):
            fetch(uri, tmp_path / "a", DIGEST, attempts=1)
        monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.crt"))
        storage._pool.cache_clear()
        assert fetch(uri, tmp_path / "b", DIGEST, attempts=1).read_bytes() == PAYLOAD
    finally:
        storage._pool.cache_clear()
        server.shutdown()
        server.server_close()


def test_unreachable_http_host_fails(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    with pytest.raises(StorageError, match="after 2 attempts"):
        fetch(f"http://127.0.0.1:{port}/m.pt", tmp_path, attempts=2, backoff_s=0.01,
              timeout_s=2)


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto's standalone S3-compatible server on loopback."""
    with moto_s3("127.0.0.1", tmp_path_factory.mktemp("moto") / "moto.log") as url:
        yield url


@pytest.fixture
def s3_env(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    import boto3

    client = boto3.client("s3")
    buckets = [b["Name"] for b in client.list_buckets().get("Buckets", [])]
    if "models" not in buckets:
        client.create_bucket(Bucket="models")
    client.put_object(Bucket="models", Key="mlp/1/model.pt", Body=PAYLOAD)
    return s3_endpoint


def test_s3_fetch_and_cache(s3_env: str, tmp_path: Path) -> None:
    path = fetch("s3://models/mlp/1/model.pt", tmp_path, DIGEST)
    assert path.read_bytes() == PAYLOAD
    mtime = path.stat().st_mtime_ns
    assert fetch("s3://models/mlp/1/model.pt", tmp_path, DIGEST) == path
    assert path.stat().st_mtime_ns == mtime  # not downloaded again


def test_s3_missing_key_and_bad_checksum(s3_env: str, tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="NoSuchKey"):
        fetch("s3://models/nope.pt", tmp_path)
    with pytest.raises(ChecksumMismatch, match="refusing to serve"):
        fetch("s3://models/mlp/1/model.pt", tmp_path, "a" * 64)


def test_runtime_serves_a_model_from_s3(s3_env: str, start_server, models: dict[str, Path],
                                        tmp_path: Path) -> None:
    import boto3

    data = models["mlp"].read_bytes()
    boto3.client("s3").put_object(Bucket="models", Key="mlp/2/mlp.pt", Body=data)
    server = start_server({
        "MODELYARD_MODEL_NAME": "s3mlp",
        "MODELYARD_MODEL_URI": "s3://models/mlp/2/mlp.pt",
        "MODELYARD_MODEL_SHA256": hashlib.sha256(data).hexdigest(),
        "MODELYARD_CACHE_DIR": str(tmp_path / "cache"),
    })
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4],
                        "data": [1, 2, 3, 4]}]}
    assert httpx.post(f"{server.url}/v2/models/s3mlp/infer", json=body).status_code == 200
    assert list((tmp_path / "cache").rglob("mlp.pt"))


def test_runtime_serves_a_model_over_http(start_server, models: dict[str, Path],
                                          tmp_path: Path) -> None:
    directory = models["mlp"].parent
    port = free_port()
    origin = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
         "--directory", str(directory)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        server = start_server({
            "MODELYARD_MODEL_NAME": "httpmlp",
            "MODELYARD_MODEL_URI": f"http://127.0.0.1:{port}/mlp.pt",
            "MODELYARD_MODEL_SHA256": sha256_of(models["mlp"]),
            "MODELYARD_CACHE_DIR": str(tmp_path / "cache"),
        })
        body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4],
                            "data": [1, 2, 3, 4]}]}
        assert httpx.post(f"{server.url}/v2/models/httpmlp/infer", json=body).status_code == 200
    finally:
        origin.terminate()
        origin.wait(timeout=10)


def test_runtime_refuses_a_model_whose_checksum_differs(start_server,
                                                        models: dict[str, Path]) -> None:
    server = start_server({
        "MODELYARD_MODEL_NAME": "tampered",
        "MODELYARD_MODEL_URI": str(models["mlp"]),
        "MODELYARD_MODEL_SHA256": "0" * 64,
    }, ready=False)
    assert server.wait_exit(timeout=60) == 1
    log = server.log()
    assert "refusing to serve" in log
    assert sha256_of(models["mlp"]) in log


# ------------------------------------------- a conversion Job's package, published beside


def _package(tmp_path: Path) -> tuple[Path, Path, str]:
    """Stand-ins for a converted package and its manifest (what the Job publishes)."""
    package = tmp_path / "work" / "model.pt2"
    package.parent.mkdir(parents=True, exist_ok=True)
    package.write_bytes(PAYLOAD + b"compiled")
    manifest = package.with_name("model.pt2.manifest.json")
    manifest.write_text('{"format": "aoti"}')
    return package, manifest, sha256_of(package)


def test_a_package_is_published_next_to_its_s3_source_and_fetched_by_its_digest(
        s3_env: str, tmp_path: Path) -> None:
    import boto3

    from modelyard.runtime.convertjob import publish

    package, manifest, digest = _package(tmp_path)
    uri = publish(package, manifest, "s3://models/mlp/1/model.pt", digest)
    assert uri == f"s3://models/mlp/1/aoti/{digest}.pt2"
    assert fetch(uri, tmp_path / "cache", digest).read_bytes() == package.read_bytes()
    body = boto3.client("s3").get_object(Bucket="models",
                                         Key=f"mlp/1/aoti/{digest}.pt2.manifest.json")["Body"]
    assert body.read() == manifest.read_bytes()


def test_a_package_is_published_next_to_its_file_source_and_http_is_read_only(
        tmp_path: Path) -> None:
    from modelyard.runtime.convertjob import publish

    package, manifest, digest = _package(tmp_path)
    source = tmp_path / "store" / "m" / "3" / "model.pt2"
    uri = publish(package, manifest, source.as_uri(), digest)
    written = source.parent / "aoti" / f"{digest}.pt2"
    assert uri == written.as_uri()
    assert sha256_of(written) == digest
    assert (source.parent / "aoti" / f"{digest}.pt2.manifest.json").is_file()
    with pytest.raises(StorageError, match="read only"):
        publish(package, manifest, "https://models.example/m/3/model.pt2", digest)


def test_a_conversion_job_reports_why_it_failed_and_writes_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from modelyard.runtime.convertjob import main

    source = tmp_path / "m" / "1" / "model.pt2"
    source.parent.mkdir(parents=True)
    source.write_bytes(PAYLOAD)
    log = tmp_path / "termination-log"
    monkeypatch.setenv("MODELYARD_TERMINATION_LOG", str(log))
    monkeypatch.setenv("MODELYARD_CACHE_DIR", str(tmp_path / "cache"))
    code = main(["--source", source.as_uri(), "--format", "export", "--sha256", "a" * 64])
    assert code == 1
    report = json.loads(log.read_text())
    assert "refusing to serve" in report["error"]
    assert report["source"] == source.as_uri()
    assert "artifactUri" not in report
    assert not (source.parent / "aoti").exists()
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == report


def test_a_conversion_job_without_a_compiler_says_which_image_to_use(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The runtime image serves packages but cannot compile one (no g++): the Job's report
    names the fix, spec.model.convert.image."""
    import json

    from modelyard.runtime.convertjob import main

    log = tmp_path / "termination-log"
    monkeypatch.setenv("MODELYARD_TERMINATION_LOG", str(log))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    assert main(["--source", (tmp_path / "model.pt2").as_uri(), "--format", "export"]) == 1
    error = json.loads(log.read_text())["error"]
    assert "no C++ compiler" in error
    assert "spec.model.convert.image" in error

"""The endpoint's security, on the real runtime process and real HTTP clients: API keys from a
mounted Secret (and their rotation without a restart)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from modelyard.runtime.client import Client, InferenceServerError

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
def keys_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("api-keys")
    write_secret(directory, {"current": KEY_A + "\n", "next": f"{KEY_B}\n"}, 1)
    return directory


@pytest.fixture(scope="module")
def guarded(start_server, models: dict[str, Path], keys_dir: Path):  # type: ignore[no-untyped-def]
    return start_server({
        "MODELYARD_MODEL_NAME": "mlp",
        "MODELYARD_MODEL_VERSION": "3",
        "MODELYARD_MODEL_URI": f"file://{models['mlp']}",
        "MODELYARD_API_KEYS": str(keys_dir),
    })


@pytest.fixture
def no_env_key() -> Iterator[None]:
    saved = os.environ.pop("MODELYARD_API_KEY", None)
    yield
    if saved is not None:
        os.environ["MODELYARD_API_KEY"] = saved


X = np.ones((2, 4), dtype=np.float32)


def test_probes_and_metrics_answer_without_a_key(guarded) -> None:
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/mlp/ready",
                 "/v2/models/mlp/versions/3/ready", "/metrics"):
        assert httpx.get(guarded.url + path).status_code == 200, path


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-key-123", f"Basic {KEY_A}",
                                          f"Bearer {KEY_A}x", "Bearer"])
def test_inference_and_metadata_without_a_valid_key_are_401(guarded, authorization) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    for method, path in (("POST", "/v2/models/mlp/infer"), ("POST", "/v1/models/mlp:predict"),
                         ("GET", "/v2/models/mlp"), ("GET", "/v2"), ("GET", "/v1/models")):
        response = httpx.request(method, guarded.url + path, headers=headers, content=b"{}")
        assert response.status_code == 401, (path, response.text)
        assert response.headers["www-authenticate"] == "Bearer"
        assert "Authorization: Bearer" in response.json()["error"]
        assert "wrong-key" not in response.text
        assert KEY_A not in response.text


def test_every_key_of_the_secret_is_valid(guarded, no_env_key) -> None:
    for key in (KEY_A, KEY_B):
        with Client(guarded.url, "mlp", api_key=key) as client:
            assert client.infer({"input": X})["logits"].shape == (2, 3)
            assert client.metadata()["name"] == "mlp"
    with Client(guarded.url, "mlp") as client, pytest.raises(InferenceServerError) as refused:
        client.infer({"input": X})
    assert refused.value.status == 401


def test_the_client_takes_its_key_from_the_environment(guarded, no_env_key) -> None:
    os.environ["MODELYARD_API_KEY"] = KEY_B
    with Client(guarded.url, "mlp") as client:
        assert client.predict([[1.0, 2.0, 3.0, 4.0]])


def test_a_rotated_secret_takes_effect_without_a_restart(guarded, keys_dir: Path) -> None:
    pid = guarded.process.pid
    # Rotation: KEY_A retired, KEY_B kept, KEY_C added, as the kubelet updates the volume.
    write_secret(keys_dir, {"next": KEY_B, "newest": f"{KEY_C}\n"}, 2)
    url = f"{guarded.url}/v2/models/mlp"
    deadline = time.monotonic() + 30
    while httpx.get(url, headers={"Authorization": f"Bearer {KEY_C}"}).status_code != 200:
        assert time.monotonic() < deadline, "the new key was never accepted"
        time.sleep(0.1)
    assert httpx.get(url, headers={"Authorization": f"Bearer {KEY_A}"}).status_code == 401
    assert httpx.get(url, headers={"Authorization": f"Bearer {KEY_B}"}).status_code == 200
    assert guarded.process.pid == pid
    assert guarded.process.poll() is None
    assert KEY_A not in guarded.log()
    assert KEY_C not in guarded.log()

"""The real runtime process over loopback: OIP v2 REST, v1 predict, health, metrics, client."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
import torch
from runtime_testmodels import ALLTYPES_DATATYPES, ALLTYPES_INPUTS, TinyMLP

from modelyard.runtime.client import AsyncClient, Client, InferenceServerError


def expected_mlp(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        logits, label = TinyMLP().eval()(torch.from_numpy(x))
    return logits.numpy(), label.numpy()


def test_health_and_metadata(mlp_server) -> None:
    url = mlp_server.url
    assert httpx.get(f"{url}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{url}/v2/health/ready").json() == {"ready": True}
    server = httpx.get(f"{url}/v2").json()
    assert server["name"] == "modelyard"
    assert "binary_tensor_data" in server["extensions"]
    for path in ("/v2/models/mlp", "/v2/models/mlp/versions/3"):
        meta = httpx.get(url + path).json()
        assert meta["name"] == "mlp"
        assert meta["versions"] == ["3"]
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]
        assert [o["name"] for o in meta["outputs"]] == ["logits", "label"]
    assert httpx.get(f"{url}/v2/models/mlp/ready").status_code == 200
    assert httpx.get(f"{url}/v2/models/mlp/versions/3/ready").status_code == 200
    assert httpx.get(f"{url}/v1/models").json() == {"models": ["mlp"]}


@pytest.mark.parametrize(
    "path",
    ["/v2/models/nope", "/v2/models/mlp/versions/9", "/v2/models/nope/ready",
     "/v2/models/mlp/versions/9/ready", "/v1/models/nope", "/no/such/route"],
)
def test_unknown_model_or_version_is_404(mlp_server, path: str) -> None:
    response = httpx.get(mlp_server.url + path)
    assert response.status_code == 404
    assert "error" in response.json()


def test_infer_json_matches_the_model(mlp_server) -> None:
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    body = {"id": "req-1", "inputs": [
        {"name": "input", "datatype": "FP32", "shape": [3, 4], "data": x.ravel().tolist()}
    ]}
    response = httpx.post(f"{mlp_server.url}/v2/models/mlp/infer", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["id"] == "req-1"
    assert answer["model_name"] == "mlp"
    assert answer["model_version"] == "3"
    logits, label = expected_mlp(x)
    outputs = {o["name"]: o for o in answer["outputs"]}
    assert outputs["logits"]["datatype"] == "FP32"
    assert outputs["logits"]["shape"] == [3, 3]
    np.testing.assert_allclose(np.array(outputs["logits"]["data"]).reshape(3, 3), logits,
                               rtol=1e-5, atol=1e-6)
    assert outputs["label"]["datatype"] == "INT64"
    assert outputs["label"]["data"] == label.tolist()


def test_infer_nested_json_data_and_versioned_route(mlp_server) -> None:
    x = [[1.0, 2.0, 3.0, 4.0]]
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": x}]}
    response = httpx.post(f"{mlp_server.url}/v2/models/mlp/versions/3/infer", json=body)
    assert response.status_code == 200
    label = expected_mlp(np.array(x, np.float32))[1]
    assert response.json()["outputs"][1]["data"] == label.tolist()


def test_infer_binary_in_and_out(mlp_server) -> None:
    x = np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32)
    header = orjson.dumps({
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [5, 4],
                    "parameters": {"binary_data_size": x.nbytes}}],
        "outputs": [{"name": "logits", "parameters": {"binary_data": True}},
                    {"name": "label", "parameters": {"binary_data": False}}],
    })
    response = httpx.post(
        f"{mlp_server.url}/v2/models/mlp/infer", content=header + x.tobytes(),
        headers={"Inference-Header-Content-Length": str(len(header)),
                 "Content-Type": "application/octet-stream"},
    )
    assert response.status_code == 200, response.text
    length = int(response.headers["inference-header-content-length"])
    document = orjson.loads(response.content[:length])
    logits_entry, label_entry = document["outputs"]
    assert logits_entry["parameters"]["binary_data_size"] == 5 * 3 * 4
    got = np.frombuffer(response.content[length:], dtype=np.float32).reshape(5, 3)
    logits, label = expected_mlp(x)
    np.testing.assert_allclose(got, logits, rtol=1e-5, atol=1e-6)
    assert label_entry["data"] == label.tolist()


def test_requested_subset_of_outputs(mlp_server) -> None:
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4],
                        "data": [0, 0, 0, 1]}],
            "outputs": [{"name": "label"}]}
    answer = httpx.post(f"{mlp_server.url}/v2/models/mlp/infer", json=body).json()
    assert [o["name"] for o in answer["outputs"]] == ["label"]


def test_v1_predict(mlp_server) -> None:
    x = np.array([[1, 2, 3, 4], [4, 3, 2, 1]], dtype=np.float32)
    response = httpx.post(f"{mlp_server.url}/v1/models/mlp:predict",
                          json={"instances": x.tolist()})
    assert response.status_code == 200
    predictions = response.json()["predictions"]
    assert [p["label"] for p in predictions] == expected_mlp(x)[1].tolist()


def test_sync_client_binary_and_json(mlp_server) -> None:
    x = np.random.default_rng(2).standard_normal((2, 4)).astype(np.float32)
    logits, label = expected_mlp(x)
    with Client(mlp_server.url, "mlp") as client:
        assert client.live()
        assert client.ready()
        assert client.metadata()["name"] == "mlp"
        for binary in (True, False):
            out = client.infer({"input": x}, binary=binary)
            np.testing.assert_allclose(out["logits"], logits, rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(out["label"], label)
        assert [p["label"] for p in client.predict(x.tolist())] == label.tolist()
        with pytest.raises(InferenceServerError) as caught:
            client.infer({"input": np.zeros((1, 5), np.float32)})
        assert caught.value.status == 400
    with Client(mlp_server.url, "mlp", version="3") as client:
        assert client.ready()
    with Client(mlp_server.url, "mlp", version="7") as client:
        assert not client.ready()


def test_async_client_concurrent_requests_are_batched(mlp_server) -> None:
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal((1 + i % 3, 4)).astype(np.float32) for i in range(48)]

    async def run() -> list[dict[str, np.ndarray]]:
        async with AsyncClient(mlp_server.url, "mlp") as client:
            return await asyncio.gather(*(client.infer({"input": x}) for x in xs))

    results = asyncio.run(run())
    for x, out in zip(xs, results, strict=True):
        logits, label = expected_mlp(x)
        np.testing.assert_allclose(out["logits"], logits, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(out["label"], label)
    metrics = httpx.get(f"{mlp_server.url}/metrics").text
    # some forward passes carried more than one request: the batch-size histogram shows it
    count = float(next(line.split()[-1] for line in metrics.splitlines()
                       if line.startswith("modelyard_batch_size_count")))
    total = float(next(line.split()[-1] for line in metrics.splitlines()
                       if line.startswith("modelyard_batch_size_sum")))
    assert total > count


def test_metrics_exposes_the_runtime_series(mlp_server) -> None:
    httpx.post(f"{mlp_server.url}/v2/models/mlp/infer", content=b"{")
    text = httpx.get(f"{mlp_server.url}/metrics").text
    for series in (
        'modelyard_requests_total{code="200",model="mlp",protocol="v2",version="3"}',
        'modelyard_requests_total{code="400",model="mlp",protocol="v2",version="3"}',
        "modelyard_request_duration_seconds_bucket",
        'modelyard_inflight_requests{model="mlp",version="3"}',
        'modelyard_queue_depth{model="mlp",version="3"}',
        "modelyard_batch_size_bucket",
        "modelyard_inference_duration_seconds_bucket",
        'modelyard_model_load_seconds{model="mlp",version="3"}',
        'modelyard_model_ready{model="mlp",version="3"} 1.0',
    ):
        assert series in text, series


@pytest.fixture(scope="module")
def alltypes_server(start_server, models: dict[str, Path]):
    return start_server({
        "MODELYARD_MODEL_NAME": "alltypes",
        "MODELYARD_MODEL_URI": str(models["alltypes"]),
    })


def _alltypes_inputs() -> dict[str, tuple[np.ndarray, str]]:
    values = {
        "FP32": np.array([[1.5, -2.0]], np.float32),
        "FP16": np.array([[0.5, 3.0]], np.float16),
        "BF16": np.array([[1.0, -0.25]], np.float32),
        "INT64": np.array([[2**40, -7]], np.int64),
        "INT32": np.array([[70000, -1]], np.int32),
        "INT8": np.array([[-128, 126]], np.int8),
        "UINT8": np.array([[0, 254]], np.uint8),
        "BOOL": np.array([[True, False]], np.bool_),
    }
    return {name: (values[dt], dt) for name, dt in zip(ALLTYPES_INPUTS, ALLTYPES_DATATYPES,
                                                         strict=True)}


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_every_datatype_round_trips(alltypes_server, binary: bool) -> None:
    inputs = _alltypes_inputs()
    with Client(alltypes_server.url, "alltypes", binary=binary) as client:
        meta = client.metadata()
        assert [i["datatype"] for i in meta["inputs"]] == ALLTYPES_DATATYPES
        out = client.infer(inputs)
    for name, (value, datatype) in inputs.items():
        got = out["out_" + name]
        if datatype in ("FP32", "FP16", "BF16"):
            np.testing.assert_allclose(got.astype(np.float64), value.astype(np.float64) * 2)
        elif datatype == "BOOL":
            np.testing.assert_array_equal(got, ~value)
        else:
            np.testing.assert_array_equal(got, value + 1)
        if datatype != "BF16":
            assert got.dtype == value.dtype, name

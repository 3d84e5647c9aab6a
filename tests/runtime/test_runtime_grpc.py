"""OIP v2 over gRPC, through a client we did not write: NVIDIA's tritonclient[grpc].

The server is the shared ``mlp_server`` (gRPC on beside REST): metadata, inference with
raw binary contents (what tritonclient sends) and with typed contents (a request built
with tritonclient's generated messages and stub), bad requests and their status codes,
and concurrent calls over one HTTP/2 connection.
"""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
import torch
from runtime_testmodels import TinyMLP

grpcclient = pytest.importorskip(
    "tritonclient.grpc", reason="tritonclient[grpc] is not installed (it is in the dev extra)")
from tritonclient.grpc import aio as grpcaio  # noqa: E402
from tritonclient.grpc import service_pb2, service_pb2_grpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402


def _expected(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        logits, label = TinyMLP().eval()(torch.from_numpy(x))
    return logits.numpy(), label.numpy()


@pytest.fixture(scope="module")
def target(mlp_server) -> str:  # type: ignore[no-untyped-def]
    return f"127.0.0.1:{mlp_server.grpc_port}"


def test_metadata_and_raw_inference(target: str) -> None:
    client = grpcclient.InferenceServerClient(url=target)
    try:
        assert client.is_server_live()
        assert client.is_server_ready()
        assert client.is_model_ready("mlp")
        assert client.is_model_ready("mlp", "3")
        assert "binary_tensor_data" in client.get_server_metadata(as_json=True)["extensions"]
        metadata = client.get_model_metadata("mlp", as_json=True)
        assert metadata["versions"] == ["3"]
        assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "4"]}]

        x = np.random.default_rng(3).standard_normal((3, 4)).astype(np.float32)
        tensor = grpcclient.InferInput("input", [3, 4], "FP32")
        tensor.set_data_from_numpy(x)  # tritonclient sends raw_input_contents
        result = client.infer("mlp", [tensor], request_id="g-1",
                              outputs=[grpcclient.InferRequestedOutput("label")])
        logits, label = _expected(x)
        np.testing.assert_array_equal(result.as_numpy("label"), label)
        assert result.as_numpy("logits") is None  # only what was asked for
        assert result.get_response().id == "g-1"
        full = client.infer("mlp", [tensor], model_version="3")
        np.testing.assert_allclose(full.as_numpy("logits"), logits, rtol=1e-5, atol=1e-6)
    finally:
        client.close()


def test_typed_contents(target: str) -> None:
    x = np.random.default_rng(4).standard_normal((2, 4)).astype(np.float32)
    request = service_pb2.ModelInferRequest(model_name="mlp")
    item = request.inputs.add(name="input", datatype="FP32", shape=[2, 4])
    item.contents.fp32_contents.extend(x.reshape(-1).tolist())
    with grpc.insecure_channel(target) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        response = stub.ModelInfer(request)
        by_name = {o.name: (o, raw) for o, raw in zip(response.outputs,
                                                        response.raw_output_contents, strict=True)}
        logits, label = _expected(x)
        out, raw = by_name["logits"]
        assert (out.datatype, list(out.shape)) == ("FP32", [2, 3])
        np.testing.assert_allclose(np.frombuffer(raw, np.float32).reshape(2, 3), logits,
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(np.frombuffer(by_name["label"][1], np.int64), label)

        # typed contents that do not fit the shape, or the wrong field for the datatype
        short = service_pb2.ModelInferRequest(model_name="mlp")
        bad = short.inputs.add(name="input", datatype="FP32", shape=[2, 4])
        bad.contents.fp32_contents.extend([1.0] * 7)
        with pytest.raises(grpc.RpcError) as error:
            stub.ModelInfer(short)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "needs 8 values" in error.value.details()
        raw_short = service_pb2.ModelInferRequest(model_name="mlp")
        raw_short.inputs.add(name="input", datatype="FP32", shape=[1, 4])
        raw_short.raw_input_contents.append(b"\0" * 15)
        with pytest.raises(grpc.RpcError) as error:
            stub.ModelInfer(raw_short)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # what the server says after them: still serving
        assert stub.ModelInfer(request).model_name == "mlp"


@pytest.mark.parametrize(("model", "shape", "datatype", "code"), [
    ("nope", [1, 4], "FP32", "StatusCode.NOT_FOUND"),
    ("mlp", [1, 5], "FP32", "StatusCode.INVALID_ARGUMENT"),
    ("mlp", [1, 4], "FP64", "StatusCode.INVALID_ARGUMENT"),
])
def test_bad_requests_get_the_right_code(target: str, model: str, shape: list[int],
                                         datatype: str, code: str) -> None:
    client = grpcclient.InferenceServerClient(url=target)
    try:
        tensor = grpcclient.InferInput("input", shape, datatype)
        tensor.set_data_from_numpy(np.zeros(shape, {"FP32": np.float32,
                                                    "FP64": np.float64}[datatype]))
        with pytest.raises(InferenceServerException) as error:
            client.infer(model, [tensor])
        assert error.value.status() == code
        with pytest.raises(InferenceServerException) as error:
            client.get_model_metadata("nope")
        assert error.value.status() == "StatusCode.NOT_FOUND"
    finally:
        client.close()


def test_concurrent_calls_on_one_connection(mlp_server, target: str) -> None:  # type: ignore[no-untyped-def]
    xs = [np.random.default_rng(i).standard_normal((1 + i % 3, 4)).astype(np.float32)
          for i in range(32)]

    async def calls() -> list[np.ndarray]:
        async with grpcaio.InferenceServerClient(url=target) as client:
            async def one(x: np.ndarray) -> np.ndarray:
                tensor = grpcaio.InferInput("input", list(x.shape), "FP32")
                tensor.set_data_from_numpy(x)
                result = await client.infer("mlp", [tensor])
                return result.as_numpy("label")  # type: ignore[no-any-return]

            return await asyncio.gather(*(one(x) for x in xs))

    labels = asyncio.run(asyncio.wait_for(calls(), timeout=60))
    for x, label in zip(xs, labels, strict=True):
        np.testing.assert_array_equal(label, _expected(x)[1])
    import httpx

    metrics = httpx.get(f"{mlp_server.url}/metrics").text
    assert 'modelyard_requests_total{code="200",model="mlp",protocol="grpc",version="3"}' \
        in metrics

"""Interoperability with an OIP v2 client we did not write: NVIDIA's tritonclient[http]."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from runtime_testmodels import TinyMLP

httpclient = pytest.importorskip(
    "tritonclient.http", reason="tritonclient[http] is not installed (it is in the dev extra)"
)


def test_tritonclient_talks_to_the_runtime(mlp_server) -> None:
    client = httpclient.InferenceServerClient(url=mlp_server.url.removeprefix("http://"))
    try:
        assert client.is_server_live()
        assert client.is_server_ready()
        assert client.is_model_ready("mlp")
        assert client.is_model_ready("mlp", "3")
        metadata = client.get_model_metadata("mlp")
        assert metadata["inputs"][0] == {"name": "input", "datatype": "FP32", "shape": [-1, 4]}
        assert "binary_tensor_data" in client.get_server_metadata()["extensions"]

        x = np.random.default_rng(7).standard_normal((3, 4)).astype(np.float32)
        with torch.no_grad():
            logits, label = TinyMLP().eval()(torch.from_numpy(x))
        for binary in (True, False):
            tensor = httpclient.InferInput("input", [3, 4], "FP32")
            tensor.set_data_from_numpy(x, binary_data=binary)
            outputs = [httpclient.InferRequestedOutput("logits", binary_data=binary),
                       httpclient.InferRequestedOutput("label", binary_data=not binary)]
            result = client.infer("mlp", [tensor], outputs=outputs, request_id="t-1")
            np.testing.assert_allclose(result.as_numpy("logits"), logits.numpy(),
                                       rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(result.as_numpy("label"), label.numpy())
            assert result.get_response()["id"] == "t-1"

        tensor = httpclient.InferInput("input", [1, 5], "FP32")
        tensor.set_data_from_numpy(np.zeros((1, 5), np.float32))
        with pytest.raises(Exception, match="shape"):
            client.infer("mlp", [tensor])
    finally:
        client.close()


def test_tritonclient_every_datatype(start_server, models: dict[str, Path]) -> None:
    server = start_server({"MODELYARD_MODEL_NAME": "types3",
                           "MODELYARD_MODEL_URI": str(models["alltypes"])})
    client = httpclient.InferenceServerClient(url=server.url.removeprefix("http://"))
    try:
        values = {
            "fp32": ("FP32", np.array([[1.5, 2]], np.float32)),
            "fp16": ("FP16", np.array([[0.5, 1]], np.float16)),
            "int64": ("INT64", np.array([[5, -6]], np.int64)),
            "int32": ("INT32", np.array([[5, -6]], np.int32)),
            "int8": ("INT8", np.array([[5, -6]], np.int8)),
            "uint8": ("UINT8", np.array([[5, 6]], np.uint8)),
            "flag": ("BOOL", np.array([[True, False]], np.bool_)),
        }
        inputs = []
        for name, (datatype, value) in values.items():
            tensor = httpclient.InferInput(name, list(value.shape), datatype)
            tensor.set_data_from_numpy(value)
            inputs.append(tensor)
        ml_dtypes = pytest.importorskip("ml_dtypes", reason="tritonclient needs it for BF16")
        bf16 = httpclient.InferInput("bf16", [1, 2], "BF16")  # tritonclient sends BF16 binary
        bf16.set_data_from_numpy(np.array([[1.0, -2.0]], ml_dtypes.bfloat16))
        inputs.append(bf16)
        result = client.infer("types3", inputs)
        np.testing.assert_allclose(result.as_numpy("out_fp32"), values["fp32"][1] * 2)
        np.testing.assert_array_equal(result.as_numpy("out_int8"), values["int8"][1] + 1)
        np.testing.assert_array_equal(result.as_numpy("out_flag"), ~values["flag"][1])
        np.testing.assert_allclose(result.as_numpy("out_bf16").astype(np.float32),
                                   [[2.0, -4.0]])
    finally:
        client.close()

"""Bad requests get the right 4xx and an {"error": ...} body; the server answers well afterwards."""

from __future__ import annotations

import socket

import httpx
import numpy as np
import orjson
import pytest

GOOD = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}


def _input(**changes: object) -> bytes:
    entry: dict[str, object] = {"name": "input", "datatype": "FP32", "shape": [1, 4],
                                "data": [1, 2, 3, 4]}
    entry.update(changes)
    return orjson.dumps({"inputs": [entry]})


def _binary(header_length: str | None, size: int, payload: bytes,
            shape: list[int] | None = None) -> tuple[bytes, dict[str, str]]:
    header = orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32",
                                       "shape": shape or [1, 4],
                                       "parameters": {"binary_data_size": size}}]})
    headers = {"Content-Type": "application/octet-stream"}
    if header_length is not None:
        headers["Inference-Header-Content-Length"] = header_length.replace("HL", str(len(header)))
    return header + payload, headers


FOUR = np.arange(4, dtype=np.float32).tobytes()

# id -> (body, extra headers, expected status, a fragment of the error message)
BAD: dict[str, tuple[bytes, dict[str, str], int, str]] = {
    "malformed-json": (b'{"inputs": [', {}, 400, "malformed JSON"),
    "not-an-object": (b"[1, 2, 3]", {}, 400, "JSON object"),
    "empty-body": (b"", {}, 400, "malformed JSON"),
    "no-inputs": (b'{"inputs": []}', {}, 400, "non-empty list"),
    "unknown-datatype": (_input(datatype="FP8"), {}, 400, "unsupported datatype"),
    "wrong-datatype-for-model": (_input(datatype="INT64"), {}, 400, "must be FP32"),
    "shape-data-mismatch": (_input(shape=[1, 4], data=[1, 2, 3]), {}, 400, "needs 4 values"),
    "wrong-rank": (_input(shape=[4], data=[1, 2, 3, 4]), {}, 400, "rank"),
    "wrong-dimension": (_input(shape=[1, 5], data=[1, 2, 3, 4, 5]), {}, 400, "shape"),
    "unknown-input-name": (_input(name="pixels"), {}, 400, "unknown input"),
    "negative-shape": (_input(shape=[-1, 4]), {}, 400, "non-negative"),
    "strings-as-numbers": (_input(data=["a", "b", "c", "d"]), {}, 400, "does not fit"),
    "bools-as-ints": (_input(datatype="INT64", data=[True, False, True, True]), {}, 400,
                      "does not fit"),
    "ragged-data": (_input(data=[[1, 2], [3]]), {}, 400, "regular array"),
    "null-in-data": (_input(data=[1, None, 2, 3]), {}, 400, "NaN or infinity"),
    "nan-literal": (b'{"inputs":[{"name":"input","datatype":"FP32","shape":[1,4],'
                    b'"data":[NaN,1,2,3]}]}', {}, 400, "malformed JSON"),
    "huge-float-is-infinite": (_input(data=[1e39, 1, 2, 3]), {}, 400, "NaN or infinity"),
    "deep-nesting": (b'{"inputs":' + b"[" * 5000 + b"]" * 5000 + b"}", {}, 400, "malformed"),
    "missing-data": (_input(data=None) .replace(b',"data":null', b""), {}, 400, "neither"),
    "unknown-output": (orjson.dumps({**GOOD, "outputs": [{"name": "nope"}]}), {}, 400,
                       "unknown output"),
    "binary-header-length-not-int": (*_binary("abc", 16, FOUR), 400, "not an integer"),
    "binary-header-length-too-long": (*_binary("99999", 16, FOUR), 400, "does not fit"),
    "binary-header-length-wrong": (*_binary("10", 16, FOUR), 400, "malformed JSON"),
    "binary-size-mismatch-shape": (*_binary("HL", 12, FOUR[:12]), 400, "does not match shape"),
    "binary-data-truncated": (*_binary("HL", 16, FOUR[:8]), 400, "binary bytes were sent"),
    "binary-extra-bytes": (*_binary("HL", 16, FOUR + b"xxxx"), 400, "not claimed"),
    "binary-nan": (*_binary("HL", 16, np.array([np.nan, 1, 2, 3], np.float32).tobytes()),
                   400, "NaN"),
    "body-too-large": (b"{" + b" " * (2 * 1024 * 1024) + b"}", {}, 413, "limit"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_request_then_good_request(mlp_server, case: str) -> None:
    body, headers, status, fragment = BAD[case]
    url = f"{mlp_server.url}/v2/models/mlp/infer"
    response = httpx.post(url, content=body, headers=headers, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert fragment.lower() in error.lower(), error
    good = httpx.post(url, json=GOOD, timeout=30)
    assert good.status_code == 200
    assert good.json()["outputs"][0]["shape"] == [1, 3]


def test_bad_v1_predict_requests(mlp_server) -> None:
    url = f"{mlp_server.url}/v1/models/mlp:predict"
    for body, fragment in (
        (b"not json", "malformed"),
        (b'{"instances": []}', "non-empty"),
        (b'{"instances": [[1, 2, 3]]}', "shape"),
        (b'{"instances": [[1, 2], [3]]}', "regular array"),
        (b'{"instances": [["x", 1, 2, 3]]}', "regular array"),
    ):
        response = httpx.post(url, content=body)
        assert response.status_code == 400, (body, response.text)
        assert fragment in response.json()["error"]
    assert httpx.post(url, json={"instances": [[1, 2, 3, 4]]}).status_code == 200


def test_unknown_model_on_infer_is_404(mlp_server) -> None:
    for path in ("/v2/models/other/infer", "/v2/models/mlp/versions/1/infer",
                 "/v1/models/other:predict"):
        response = httpx.post(mlp_server.url + path, json=GOOD)
        assert response.status_code == 404
        assert "error" in response.json()


def test_wrong_method_is_405_with_error_body(mlp_server) -> None:
    response = httpx.get(f"{mlp_server.url}/v2/models/mlp/infer")
    assert response.status_code == 405
    assert "error" in response.json()


def test_garbage_bytes_on_the_socket_do_not_hurt(mlp_server) -> None:
    host, port = mlp_server.host, mlp_server.port
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(b"\x00\xff GARBAGE / HTTP/9.9\r\n\r\n")
        sock.recv(1024)
    with socket.create_connection((host, port), timeout=5) as sock:  # chunked body, lying
        sock.sendall(b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\nzz\r\n")
        sock.recv(1024)
    good = httpx.post(f"{mlp_server.url}/v2/models/mlp/infer", json=GOOD)
    assert good.status_code == 200

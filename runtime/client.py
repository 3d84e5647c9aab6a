"""Python client for a modelyard runtime (or any Open Inference Protocol v2 server).

Used by people, by the tests and by the benchmark. Numpy arrays in and out;
binary tensors by default (JSON with ``binary=False``). The sync
:class:`Client` and async :class:`AsyncClient` share the pure codec functions
:func:`encode_request` / :func:`decode_response`, so only the transport call
differs. It imports numpy, orjson and httpx, never torch.

    from modelyard.runtime.client import Client
    with Client("http://127.0.0.1:8080", "resnet") as client:
        outputs = client.infer({"input": batch})      # {"logits": np.ndarray}

Explanations (a deployment with ``spec.runtime.explain``): ``client.explain(inputs,
target=3)`` returns an :class:`Explanation`, the outputs and each input's attributions.

Errors: every non-2xx answer raises :class:`InferenceServerError` with the
status and the server's ``error`` message.

An API key (``spec.auth``) travels as ``Authorization: Bearer <key>``: ``api_key=``, or
``$MODELYARD_API_KEY`` when not given. Over HTTPS, ``verify=`` takes a CA bundle's path
or an ``ssl.SSLContext`` (httpx's own ``SSL_CERT_FILE`` is honoured too).
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import httpx
import numpy as np
import orjson

__all__ = [
    "AsyncClient",
    "Client",
    "Explanation",
    "InferenceServerError",
    "auth_headers",
    "decode_explanation",
    "decode_response",
    "encode_request",
]

_HEADER = "Inference-Header-Content-Length"

_TO_DATATYPE: dict[np.dtype[Any], str] = {
    np.dtype(np.float32): "FP32",
    np.dtype(np.float16): "FP16",
    np.dtype(np.float64): "FP64",
    np.dtype(np.int64): "INT64",
    np.dtype(np.int32): "INT32",
    np.dtype(np.int16): "INT16",
    np.dtype(np.int8): "INT8",
    np.dtype(np.uint8): "UINT8",
    np.dtype(np.bool_): "BOOL",
}
_FROM_DATATYPE: dict[str, np.dtype[Any]] = {name: dtype for dtype, name in _TO_DATATYPE.items()}
_FROM_DATATYPE["BF16"] = np.dtype(np.uint16)  # bfloat16 bits on the wire

#: an input: an array (datatype from its dtype) or (array, datatype), e.g. for BF16
InputValue = np.ndarray[Any, Any] | tuple[np.ndarray[Any, Any], str]


class InferenceServerError(Exception):
    """The server answered with an error status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


def _bf16_bits(array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """float32 -> bfloat16 bits (round to nearest even)."""
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
    rounded = bits + (0x7FFF + ((bits >> 16) & 1))
    return (rounded >> 16).astype(np.uint16)


def _bf16_to_float32(bits: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def encode_request(
    inputs: Mapping[str, InputValue],
    *,
    binary: bool = True,
    outputs: list[str] | None = None,
    request_id: str | None = None,
    parameters: Mapping[str, Any] | None = None,
) -> tuple[bytes, dict[str, str]]:
    """Build an OIP request body and its headers (``parameters``: the request's own)."""
    entries: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, value in inputs.items():
        array, datatype = value if isinstance(value, tuple) else (value, None)
        array = np.asarray(array)
        if datatype is None:
            try:
                datatype = _TO_DATATYPE[array.dtype]
            except KeyError:
                raise ValueError(f"input {name!r}: no OIP datatype for {array.dtype}") from None
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            wire = _bf16_bits(array) if datatype == "BF16" else np.ascontiguousarray(
                array, dtype=_FROM_DATATYPE[datatype]
            )
            blob = wire.tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            flat = np.ascontiguousarray(array).reshape(-1)
            entry["data"] = flat.astype(np.float32) if datatype == "BF16" else flat
        entries.append(entry)
    document: dict[str, Any] = {"inputs": entries}
    if request_id is not None:
        document["id"] = request_id
    if outputs is not None:
        document["outputs"] = [
            {"name": name, "parameters": {"binary_data": binary}} for name in outputs
        ]
    else:
        document["parameters"] = {"binary_data_output": binary}
    if parameters:
        document["parameters"] = {**document.get("parameters", {}), **parameters}
    header = orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)
    if not binary:
        return header, {"Content-Type": "application/json"}
    return b"".join([header, *blobs]), {
        "Content-Type": "application/octet-stream",
        _HEADER: str(len(header)),
    }


def _raise_for_status(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        message = str(orjson.loads(response.content).get("error", response.text))
    except (orjson.JSONDecodeError, AttributeError):
        message = response.text
    raise InferenceServerError(response.status_code, message)


def decode_response(body: bytes, headers: Mapping[str, str]) -> dict[str, np.ndarray[Any, Any]]:
    """Decode an OIP response into named numpy arrays (BF16 comes back as float32)."""
    length = headers.get(_HEADER) or headers.get(_HEADER.lower())
    split = int(length) if length is not None else len(body)
    document = orjson.loads(body[:split])
    binary = memoryview(body)[split:]
    offset = 0
    result: dict[str, np.ndarray[Any, Any]] = {}
    for output in document.get("outputs", []):
        datatype = output["datatype"]
        dtype = _FROM_DATATYPE[datatype]
        shape = output["shape"]
        size = (output.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            array = np.frombuffer(binary, dtype=dtype, count=size // dtype.itemsize,
                                  offset=offset).reshape(shape)
            offset += size
            if datatype == "BF16":
                array = _bf16_to_float32(array)
        else:
            wanted = np.dtype(np.float32) if datatype == "BF16" else dtype
            array = np.asarray(output["data"], dtype=wanted).reshape(shape)
        result[output["name"]] = array
    return result


@dataclass(frozen=True)
class Explanation:
    """An ``/explain`` answer: the model's outputs, each input's attributions (the input's
    shape) and what was computed (method, output, target per row, steps,
    convergence_delta per row for integrated gradients)."""

    outputs: dict[str, np.ndarray[Any, Any]]
    attributions: dict[str, np.ndarray[Any, Any]]
    parameters: dict[str, Any]


def decode_explanation(body: bytes) -> Explanation:
    """Decode an ``/explain`` answer (JSON)."""
    document = orjson.loads(body)

    def arrays(entries: list[dict[str, Any]]) -> dict[str, np.ndarray[Any, Any]]:
        return {e["name"]: np.asarray(e["data"], dtype=np.float32 if e["datatype"] == "BF16"
                                      else _FROM_DATATYPE[e["datatype"]]).reshape(e["shape"])
                for e in entries}

    return Explanation(arrays(document.get("outputs", [])),
                       arrays(document.get("attributions", [])),
                       dict(document.get("parameters") or {}))


def _explain_parameters(**given: Any) -> dict[str, Any]:
    return {name: value for name, value in given.items() if value is not None}


API_KEY_ENV = "MODELYARD_API_KEY"


def auth_headers(api_key: str | None = None) -> dict[str, str]:
    """``Authorization: Bearer`` for ``api_key``, else ``$MODELYARD_API_KEY``, else none."""
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
    return {"Authorization": f"Bearer {key}"} if key else {}


class _Base:
    def __init__(self, url: str, model: str, version: str | None, binary: bool) -> None:
        self.url = url.rstrip("/")
        self.model = model
        self.binary = binary
        base = f"/v2/models/{model}" + (f"/versions/{version}" if version else "")
        self._infer_path = base + "/infer"
        self._explain_path = base + "/explain"
        self._ready_path = base + "/ready"
        self._metadata_path = base

    def _request(
        self, inputs: Mapping[str, InputValue], binary: bool | None, outputs: list[str] | None,
        request_id: str | None,
    ) -> tuple[bytes, dict[str, str]]:
        return encode_request(
            inputs, binary=self.binary if binary is None else binary,
            outputs=outputs, request_id=request_id,
        )


class Client(_Base):
    """Synchronous client (one keep-alive connection pool)."""

    def __init__(
        self, url: str, model: str, version: str | None = None, *, binary: bool = True,
        timeout: float = 60.0, transport: httpx.BaseTransport | None = None,
        api_key: str | None = None, verify: ssl.SSLContext | str | bool = True,
    ) -> None:
        super().__init__(url, model, version, binary)
        self._http = httpx.Client(base_url=self.url, timeout=timeout, transport=transport,
                                  headers=auth_headers(api_key), verify=verify)

    def live(self) -> bool:
        return self._http.get("/v2/health/live").status_code == 200

    def ready(self) -> bool:
        return self._http.get(self._ready_path).status_code == 200

    def metadata(self) -> dict[str, Any]:
        response = self._http.get(self._metadata_path)
        _raise_for_status(response)
        return dict(orjson.loads(response.content))

    def infer(
        self, inputs: Mapping[str, InputValue], *, binary: bool | None = None,
        outputs: list[str] | None = None, request_id: str | None = None,
    ) -> dict[str, np.ndarray[Any, Any]]:
        body, headers = self._request(inputs, binary, outputs, request_id)
        response = self._http.post(self._infer_path, content=body, headers=headers)
        _raise_for_status(response)
        return decode_response(response.content, response.headers)

    def explain(
        self, inputs: Mapping[str, InputValue], *, target: int | list[int] | None = None,
        method: str | None = None, steps: int | None = None, output: str | None = None,
    ) -> Explanation:
        """Attributions of ``output``'s ``target`` class (default: each row's highest) to
        each input, by ``method`` in ``steps`` (defaults: the deployment's)."""
        body, headers = encode_request(inputs, binary=self.binary, parameters=_explain_parameters(
            target=target, method=method, steps=steps, output=output))
        response = self._http.post(self._explain_path, content=body, headers=headers)
        _raise_for_status(response)
        return decode_explanation(response.content)

    def predict(self, instances: list[Any]) -> list[Any]:
        """KServe v1 ``:predict``: instances in, predictions out."""
        response = self._http.post(
            f"/v1/models/{self.model}:predict", content=orjson.dumps({"instances": instances}),
            headers={"Content-Type": "application/json"},
        )
        _raise_for_status(response)
        return list(orjson.loads(response.content)["predictions"])

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class AsyncClient(_Base):
    """Asynchronous client (``httpx.AsyncClient``); same methods, awaited."""

    def __init__(
        self, url: str, model: str, version: str | None = None, *, binary: bool = True,
        timeout: float = 60.0, transport: httpx.AsyncBaseTransport | None = None,
        max_connections: int = 100, api_key: str | None = None,
        verify: ssl.SSLContext | str | bool = True,
    ) -> None:
        super().__init__(url, model, version, binary)
        limits = httpx.Limits(max_connections=max_connections,
                              max_keepalive_connections=max_connections)
        self._http = httpx.AsyncClient(
            base_url=self.url, timeout=timeout, transport=transport, limits=limits,
            headers=auth_headers(api_key), verify=verify,
        )

    async def live(self) -> bool:
        return (await self._http.get("/v2/health/live")).status_code == 200

    async def ready(self) -> bool:
        return (await self._http.get(self._ready_path)).status_code == 200

    async def metadata(self) -> dict[str, Any]:
        response = await self._http.get(self._metadata_path)
        _raise_for_status(response)
        return dict(orjson.loads(response.content))

    async def infer(
        self, inputs: Mapping[str, InputValue], *, binary: bool | None = None,
        outputs: list[str] | None = None, request_id: str | None = None,
    ) -> dict[str, np.ndarray[Any, Any]]:
        body, headers = self._request(inputs, binary, outputs, request_id)
        response = await self._http.post(self._infer_path, content=body, headers=headers)
        _raise_for_status(response)
        return decode_response(response.content, response.headers)

    async def explain(
        self, inputs: Mapping[str, InputValue], *, target: int | list[int] | None = None,
        method: str | None = None, steps: int | None = None, output: str | None = None,
    ) -> Explanation:
        body, headers = encode_request(inputs, binary=self.binary, parameters=_explain_parameters(
            target=target, method=method, steps=steps, output=output))
        response = await self._http.post(self._explain_path, content=body, headers=headers)
        _raise_for_status(response)
        return decode_explanation(response.content)

    async def predict(self, instances: list[Any]) -> list[Any]:
        response = await self._http.post(
            f"/v1/models/{self.model}:predict", content=orjson.dumps({"instances": instances}),
            headers={"Content-Type": "application/json"},
        )
        _raise_for_status(response)
        return list(orjson.loads(response.content)["predictions"])

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

"""OIP v2 over gRPC: the standard ``inference.GRPCInferenceService`` on the same batcher.

Started by ``server.create_app``'s lifespan when ``grpc_port`` is set, on the same event
loop as the HTTP server (``grpc.aio``), and stopped before the batcher drains. Every RPC
goes through the same :class:`~modelyard.runtime.server.Runtime` as REST: the same model
checks, the same input validation (``protocol.validate_inputs``), the same batcher (its
bounds, deadlines and cancellation), the same metrics (``protocol="grpc"``, with the HTTP
status the same error has on REST, so analysis reads one code space) and the same API keys
(the ``authorization`` metadata, as ``Authorization: Bearer <key>``).

The messages and the service stub are the ones NVIDIA ships generated in ``tritonclient``
(``tritonclient.grpc.service_pb2``): Triton's service is the KServe OIP service (package
``inference``, service ``GRPCInferenceService``) plus Triton's own RPCs, which answer
UNIMPLEMENTED here. See docs/runtime.md#grpc for why these and not our own generation.

With TLS configured (``tls_cert_file``/``tls_key_file``, the same mounted Secret as HTTPS)
the gRPC port serves TLS only, and a renewed certificate is picked up on the next
handshake (gRPC's dynamic credentials re-read the files; no restart).

Errors map to status codes through :data:`CODE_BY_ERROR` (one table, most specific first).
Inputs come as typed contents (``fp32_contents`` ...) or as ``raw_input_contents`` (the
wire layout of the binary extension, read with ``np.frombuffer``); outputs always go back
as ``raw_output_contents``, as Triton answers and ``tritonclient`` reads.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
import torch
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from modelyard.runtime import __version__
from modelyard.runtime.deadlines import earliest, remaining_to_deadline
from modelyard.runtime.errors import (
    DeadlineExceeded,
    InferenceFailed,
    InvalidInput,
    ModelNotFound,
    Overloaded,
    PayloadTooLarge,
    RuntimeServingError,
    ServiceUnavailable,
    status_for,
)
from modelyard.runtime.protocol import (
    DATATYPES,
    datatype_of,
    numpy_to_torch,
    torch_to_numpy,
    validate_inputs,
)

if TYPE_CHECKING:
    from modelyard.runtime.auth import ApiKeys
    from modelyard.runtime.server import Runtime

__all__ = ["CODE_BY_ERROR", "serve_grpc"]

log = logging.getLogger(__name__)

#: The gRPC status of each error the runtime raises (most specific first).
CODE_BY_ERROR: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (ModelNotFound, grpc.StatusCode.NOT_FOUND),
    (PayloadTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ServiceUnavailable, grpc.StatusCode.UNAVAILABLE),  # Overloaded too: retry elsewhere
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (InferenceFailed, grpc.StatusCode.INTERNAL),
)

# The typed-contents field of each datatype (FP16 and BF16 have none: raw contents only).
_CONTENTS = {"FP32": "fp32_contents", "FP64": "fp64_contents", "INT8": "int_contents",
             "INT16": "int_contents", "INT32": "int_contents", "INT64": "int64_contents",
             "UINT8": "uint_contents", "BOOL": "bool_contents"}


def code_for(error: Exception) -> grpc.StatusCode:
    for error_type, code in CODE_BY_ERROR:
        if isinstance(error, error_type):
            return code
    return grpc.StatusCode.INTERNAL


def _tensor(item: Any, raw: bytes | None) -> torch.Tensor:
    """One ``InferInputTensor`` (and its raw contents, if the request sent raw) -> torch."""
    name, datatype = item.name, item.datatype
    spec = DATATYPES.get(datatype)
    if spec is None:
        raise InvalidInput(f"input {name!r}: unsupported datatype {datatype!r} "
                           f"(supported: {', '.join(DATATYPES)})")
    shape = tuple(item.shape)
    if any(d < 0 for d in shape):
        raise InvalidInput(f"input {name!r}: shape must be non-negative integers")
    count = math.prod(shape)
    if raw is not None:
        size = count * spec.numpy.itemsize
        if len(raw) != size:
            raise InvalidInput(f"input {name!r}: {len(raw)} raw bytes do not match shape "
                               f"{list(shape)} of {datatype} ({size} bytes)")
        array = np.frombuffer(raw, dtype=spec.numpy, count=count)
    else:
        field = _CONTENTS.get(datatype)
        if field is None:
            raise InvalidInput(f"input {name!r}: {datatype} travels only as raw_input_contents")
        values: Sequence[Any] = getattr(item.contents, field)
        if len(values) != count:
            raise InvalidInput(f"input {name!r}: shape {list(shape)} needs {count} values, "
                               f"got {len(values)} in {field}")
        try:
            with np.errstate(over="raise", invalid="raise"):
                wide = np.asarray(values)
                array = wide.astype(spec.numpy)
        except (ValueError, TypeError, OverflowError, FloatingPointError):
            raise InvalidInput(f"input {name!r}: values do not fit {datatype}") from None
        if array.size and wide.dtype.kind in "iu" and not np.array_equal(array, wide):
            raise InvalidInput(f"input {name!r}: values do not fit {datatype}")
    if array.dtype.kind == "f" and array.size and not np.isfinite(array).all():
        raise InvalidInput(f"input {name!r} contains NaN or infinity")
    tensor = numpy_to_torch(array.reshape(shape), datatype)
    if datatype == "BF16" and tensor.numel() and not bool(torch.isfinite(tensor).all()):
        raise InvalidInput(f"input {name!r} contains NaN or infinity")
    return tensor


def _param_timeout(request: Any) -> int | None:
    """Triton's ``timeout`` request parameter (microseconds), when sent."""
    if "timeout" not in request.parameters:
        return None
    value = request.parameters["timeout"]
    kind = value.WhichOneof("parameter_choice")
    if kind not in ("int64_param", "uint64_param"):
        raise InvalidInput("the timeout parameter must be an integer of microseconds")
    return int(getattr(value, kind))


class _Servicer(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """The OIP RPCs over one :class:`Runtime`."""

    def __init__(self, runtime: Runtime, keys: ApiKeys | None) -> None:
        self.runtime = runtime
        self.keys = keys

    async def _guard(self, context: grpc.aio.ServicerContext, *, probe: bool = False) -> None:
        """API keys, as on REST: liveness and readiness stay open."""
        if self.keys is None or probe:
            return
        header = next((v for k, v in context.invocation_metadata() or ()
                       if k == "authorization"), None)
        token = header.encode() if isinstance(header, str) else header
        if not self.keys.allows(token):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid API key: "
                                "send the metadata authorization: Bearer <key>")

    async def _fail(self, context: grpc.aio.ServicerContext, error: Exception) -> None:
        if not isinstance(error, RuntimeServingError):
            log.exception("unexpected error during a gRPC call", exc_info=error)
            message = "internal server error"
        else:
            message = str(error)
        trailers = (("retry-after", str(error.retry_after)),) if isinstance(error, Overloaded) \
            else ()
        await context.abort(code_for(error), message, trailers)

    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self._guard(context, probe=True)
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self._guard(context, probe=True)
        return pb.ServerReadyResponse(ready=self.runtime.ready)

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self._guard(context, probe=True)
        try:
            self.runtime.check_model(request.name, request.version or None)
        except ModelNotFound as error:
            await self._fail(context, error)
        return pb.ModelReadyResponse(ready=self.runtime.ready)

    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self._guard(context)
        return pb.ServerMetadataResponse(name="modelyard", version=__version__,
                                         extensions=["binary_tensor_data"])

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self._guard(context)
        try:
            self.runtime.check_model(request.name, request.version or None)
            model, _ = self.runtime.loaded()
        except RuntimeServingError as error:
            await self._fail(context, error)
            raise  # not reached: abort raises
        meta = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=model.name, versions=[model.version], platform=model.platform,
            inputs=[meta(name=m.name, datatype=m.datatype, shape=m.shape) for m in model.inputs],
            outputs=[meta(name=m.name, datatype=m.datatype, shape=m.shape)
                     for m in model.outputs])

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self._guard(context)
        runtime = self.runtime
        runtime.last_request = time.monotonic()  # a drain waits for quiet
        metrics = runtime.metrics
        started = time.perf_counter()
        metrics.inflight.inc()
        status = 200
        try:
            return await self._infer(request, context)
        except Exception as error:
            status = status_for(error)
            await self._fail(context, error)
            raise  # not reached: abort raises
        finally:
            metrics.inflight.dec()
            metrics.observe_request("grpc", status, time.perf_counter() - started)

    async def _infer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        runtime = self.runtime
        runtime.check_model(request.model_name, request.model_version or None)
        model, batcher = runtime.loaded()
        batcher.check_room()
        raw = list(request.raw_input_contents)
        if raw and len(raw) != len(request.inputs):
            raise InvalidInput(f"{len(raw)} raw_input_contents for {len(request.inputs)} "
                               "inputs: send raw contents for every input or for none")
        inputs: dict[str, torch.Tensor] = {}
        for index, item in enumerate(request.inputs):
            if item.name in inputs:
                raise InvalidInput(f"input {item.name!r} is given twice")
            inputs[item.name] = _tensor(item, raw[index] if raw else None)
        checked = validate_inputs(inputs, model.inputs)
        wanted = [o.name for o in request.outputs]
        if wanted and model.outputs:
            known = {m.name for m in model.outputs}
            for name in wanted:
                if name not in known:
                    raise InvalidInput(f"unknown output {name!r}; the model returns "
                                       f"{', '.join(sorted(known))}")
        deadline = earliest(remaining_to_deadline(context.time_remaining()),
                            _param_timeout(request))
        outputs = await batcher.submit(checked, deadline)
        response = pb.ModelInferResponse(model_name=model.name, model_version=model.version,
                                         id=request.id)
        for name in wanted or list(outputs):
            tensor = outputs[name].detach().cpu()
            response.outputs.add(name=name, datatype=datatype_of(tensor.dtype),
                                 shape=list(tensor.shape))
            response.raw_output_contents.append(torch_to_numpy(tensor).tobytes())
        return response


def _tls(certfile: Path, keyfile: Path) -> grpc.ServerCredentials:
    """TLS credentials that follow the files: gRPC asks ``fetch`` before each handshake,
    which answers a new configuration only when the files' content changed."""

    def read() -> tuple[bytes, Any]:
        chain, key = certfile.read_bytes(), keyfile.read_bytes()
        return (hashlib.sha256(chain + b"\0" + key).digest(),
                grpc.ssl_server_certificate_configuration([(key, chain)]))

    current, initial = read()

    def fetch() -> Any:
        nonlocal current
        try:
            digest, configuration = read()
        except OSError:  # mid-swap of the mounted Secret: keep what is served
            return None
        if digest == current:
            return None
        current = digest
        log.info("gRPC: serving the renewed certificate")
        return configuration

    fetcher: Callable[[], Any] = fetch
    return grpc.dynamic_ssl_server_credentials(initial, fetcher)


async def serve_grpc(runtime: Runtime, keys: ApiKeys | None = None) -> grpc.aio.Server:
    """Start the gRPC server on ``runtime.config``'s host and ``grpc_port``."""
    config = runtime.config
    limit = config.max_body_bytes
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", -1),
        ("grpc.so_reuseport", 0),
    ])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(_Servicer(runtime, keys), server)
    host = f"[{config.host}]" if ":" in config.host else config.host
    address = f"{host}:{config.grpc_port}"
    if config.tls_cert_file is not None and config.tls_key_file is not None:
        server.add_secure_port(address, _tls(config.tls_cert_file, config.tls_key_file))
    else:
        server.add_insecure_port(address)
    await server.start()
    log.info("gRPC (OIP v2) on port %d%s", config.grpc_port,
             " (TLS)" if config.tls_cert_file is not None else "")
    return server

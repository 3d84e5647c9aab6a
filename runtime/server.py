"""The HTTP surface: OIP v2 REST (JSON and binary tensors), v1 predict, health, metrics, page.

``__main__`` builds the app with :func:`create_app` and runs it under uvicorn;
tests do the same in a subprocess. Routes are thin: they read raw body bytes
(never a pydantic body), then call the protocol-independent :class:`Runtime`
(fetch/load/warm-up, readiness, draining, batching). Every error leaves through
one handler using ``errors.status_for``, as ``{"error": "..."}``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from modelyard.runtime import __version__, modeldir
from modelyard.runtime.auth import ApiKeys
from modelyard.runtime.batching import Batcher
from modelyard.runtime.concurrency import run_blocking
from modelyard.runtime.config import RuntimeConfig
from modelyard.runtime.deadlines import TIMEOUT_HEADER, earliest, from_header
from modelyard.runtime.errors import (
    InvalidInput,
    ModelNotFound,
    NotEnabled,
    Overloaded,
    PayloadTooLarge,
    RuntimeServingError,
    ServiceUnavailable,
    status_for,
)
from modelyard.runtime.explain import Explainer, outcome_of
from modelyard.runtime.handlers import Handler
from modelyard.runtime.metrics import CONTENT_TYPE, RuntimeMetrics
from modelyard.runtime.models import LoadedModel, load_model, load_object
from modelyard.runtime.protocol import (
    DATATYPES,
    decode_infer_request,
    encode_infer_response,
    parse_header_length,
    validate_inputs,
)
from modelyard.runtime.storage import fetch

__all__ = ["InferenceDoor", "Reply", "Runtime", "create_app"]

log = logging.getLogger(__name__)

JSON = "application/json"


BINARY = "application/octet-stream"


def fetch_model(config: RuntimeConfig) -> Path:
    """The model file, verified: a local one (a path, ``file://``, a PVC's mount) where it
    is; a remote one through the model cache (the node's when the pod mounts it, else the
    pod's own), where it stays in use, kept from eviction, while this process runs."""
    uri = config.model_uri
    if urllib.parse.urlparse(uri).scheme.lower() in ("", "file"):
        return fetch(uri, config.cache_dir, config.sha256)
    cache = modeldir.NodeCache(modeldir.writable_cache(config.cache_dir),
                               config.cache_max_bytes)
    return modeldir.fetch_file(uri, cache, config.sha256).path  # in use until exit


@dataclass(frozen=True)
class Reply:
    """An HTTP answer of the inference path."""

    status: int
    body: bytes
    content_type: str = JSON
    header_length: int | None = None  # binary tensor extension
    retry_after: int | None = None  # seconds (overload)

    @classmethod
    def json(cls, document: Any, status: int = 200) -> Reply:
        return cls(status, orjson.dumps(document), JSON)

    @classmethod
    def error(cls, error: Exception) -> Reply:
        message = str(error) if isinstance(error, RuntimeServingError) else "internal server error"
        retry_after = error.retry_after if isinstance(error, Overloaded) else None
        return cls(status_for(error), orjson.dumps({"error": message}), JSON,
                   retry_after=retry_after)

    def headers(self) -> list[tuple[bytes, bytes]]:
        headers = [(b"content-type", self.content_type.encode()),
                   (b"content-length", str(len(self.body)).encode())]
        if self.header_length is not None:
            headers.append((b"inference-header-content-length",
                            str(self.header_length).encode()))
        if self.retry_after is not None:
            headers.append((b"retry-after", str(self.retry_after).encode()))
        return headers

    def response(self) -> Response:
        extra = {} if self.retry_after is None else {"Retry-After": str(self.retry_after)}
        return Response(self.body, self.status, extra, media_type=self.content_type)


def _json(document: Any, status: int = 200) -> Response:
    return Reply.json(document, status).response()


class Runtime:
    """The data plane of one model: load it, say whether it is ready, run inferences."""

    def __init__(
        self, config: RuntimeConfig, on_fatal: Callable[[str], None] | None = None
    ) -> None:
        self.config = config
        self.model: LoadedModel | None = None
        self.handler: Handler | None = None
        self.batcher: Batcher | None = None
        self.explainer: Explainer | None = None  # spec.runtime.explain (explain.py)
        self.failure: str | None = None
        self.draining = False
        self.last_request = 0.0  # time.monotonic() of the last inference or explain to arrive
        self.exit_code = 0
        self._on_fatal = on_fatal
        self._loader: asyncio.Task[None] | None = None
        self.metrics = RuntimeMetrics(
            config.model_name, config.model_version,
            gpu=config.device != "cpu" and torch.cuda.is_available(),
        )

    @property
    def ready(self) -> bool:
        return self.batcher is not None and not self.draining

    # lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Begin fetching and loading in the background; the port answers meanwhile."""
        self._loader = asyncio.get_running_loop().create_task(self._load(), name="load-model")

    async def _load(self) -> None:
        started = time.monotonic()
        config = self.config
        try:
            path = await run_blocking(fetch_model, config)
            model = await run_blocking(load_model, config, path)
            handler: Handler | None = None
            if config.handler:
                handler_class = load_object(config.handler)
                handler = handler_class()
                if not isinstance(handler, Handler):
                    raise InvalidInput(f"{config.handler} is not a modelyard Handler subclass")
            if config.warmup:
                await run_blocking(model.warmup, config.max_batch_size)
            if handler is not None:
                handler.setup(model)
            if config.explain:
                self.explainer = Explainer(model, config, self.metrics.explain_duration.observe)
                if config.warmup and model.extra.get("declared") and not any(
                        -1 in meta.shape[1:] for meta in model.inputs):
                    await run_blocking(self.explainer.check)
        except Exception as error:
            message = str(error) if isinstance(error, RuntimeServingError) else repr(error)
            self.failure = f"model failed to load: {message}"
            self.exit_code = 1
            log.error("%s", self.failure)
            if self._on_fatal is not None:
                self._on_fatal(self.failure)
            return
        self.model, self.handler = model, handler
        batcher = Batcher(
            model.predict, config.max_batch_size, config.max_delay_ms, self.metrics.observe_batch,
            max_queue_items=config.max_queue_items, max_queue_wait_ms=config.max_queue_wait_ms,
            on_shed=self.metrics.observe_shed,
        )
        batcher.start()
        self.metrics.track_queue(lambda: batcher.queue_depth)
        self.batcher = batcher
        self.metrics.load_seconds.set(time.monotonic() - started)
        self.metrics.ready.set(1)
        log.info("model %s version %s is ready", config.model_name, config.model_version)

    def begin_drain(self) -> None:
        """Readiness turns false at once; requests keep being answered."""
        if not self.draining:
            log.info("draining: readiness is now false, in-flight and new requests still served")
        self.draining = True
        self.metrics.ready.set(0)

    async def stop(self) -> None:
        """Finish queued work (called after the HTTP server stopped taking requests)."""
        self.draining = True
        if self._loader is not None and not self._loader.done():
            self._loader.cancel()
        if self.batcher is not None:
            await self.batcher.stop()
        if self.explainer is not None:
            self.explainer.close()

    # checks ----------------------------------------------------------------------------
    def check_model(self, name: str, version: str | None = None) -> None:
        if name != self.config.model_name:
            raise ModelNotFound(f"model {name!r} is not served here")
        if version is not None and version != self.config.model_version:
            raise ModelNotFound(f"model {name!r} has no version {version!r}")

    def loaded(self) -> tuple[LoadedModel, Batcher]:
        if self.failure is not None:
            raise ServiceUnavailable(self.failure)
        if self.model is None or self.batcher is None:
            raise ServiceUnavailable("the model is still loading")
        return self.model, self.batcher

    # inference -------------------------------------------------------------------------
    def check_size(self, declared: int | None, received: int = 0) -> None:
        limit = self.config.max_body_bytes
        if declared is not None and declared > limit:
            raise PayloadTooLarge(f"request body of {declared} bytes is over the {limit} limit")
        if received > limit:
            raise PayloadTooLarge(f"request body is over the {limit} byte limit")

    async def infer(
        self, name: str, version: str | None, body: bytes, header_length: str | None,
        deadline: float | None = None,
    ) -> Reply:
        """OIP v2 ``/infer``: decode, validate, batch, encode. ``deadline``: loop time."""
        self.check_model(name, version)
        model, batcher = self.loaded()
        batcher.check_room()
        decoded = decode_infer_request(body, parse_header_length(header_length, len(body)))
        deadline = earliest(deadline, decoded.parameters.get("timeout"))
        inputs = validate_inputs(decoded.inputs, model.inputs)
        if decoded.outputs is not None and model.outputs:
            known = {meta.name for meta in model.outputs}
            for wanted in decoded.outputs:
                if wanted.name not in known:
                    raise InvalidInput(f"unknown output {wanted.name!r}; the model returns "
                                       f"{', '.join(sorted(known))}")
        outputs = await batcher.submit(inputs, deadline)
        content, json_length = encode_infer_response(model.name, model.version, decoded, outputs)
        if json_length is None:
            return Reply(200, content, JSON)
        return Reply(200, content, BINARY, json_length)

    async def predict_v1(self, name: str, body: bytes, deadline: float | None = None) -> Reply:
        """KServe v1 ``:predict``: instances through the handler (or as one tensor)."""
        self.check_model(name)
        model, batcher = self.loaded()
        batcher.check_room()
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError as error:
            raise InvalidInput(f"malformed JSON: {error}") from None
        instances = document.get("instances") if isinstance(document, dict) else None
        if not isinstance(instances, list) or not instances:
            raise InvalidInput("'instances' must be a non-empty list")
        if self.handler is not None:
            handler = self.handler
            prepared = [await run_blocking(handler.preprocess, item) for item in instances]
            checked = [validate_inputs(p, model.inputs) for p in prepared]
            results = await asyncio.gather(*(batcher.submit(c, deadline) for c in checked))
            return Reply.json({"predictions": [handler.postprocess(r) for r in results]})
        if len(model.inputs) != 1:
            raise InvalidInput("v1 instances need a model with one input (or a handler)")
        meta = model.inputs[0]
        spec = DATATYPES[meta.datatype]
        try:
            array = np.asarray(instances, dtype=np.float32 if meta.datatype == "BF16"
                               else spec.numpy)
        except (ValueError, TypeError, OverflowError, RecursionError):
            raise InvalidInput(
                f"instances are not a regular array of {meta.datatype} values"
            ) from None
        tensor = torch.from_numpy(array).to(spec.torch)
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise InvalidInput("instances contain NaN or infinity")
        outputs = await batcher.submit(validate_inputs({meta.name: tensor}, model.inputs),
                                       deadline)
        listed = {k: (v.float() if v.dtype == torch.bfloat16 else v) for k, v in outputs.items()}
        if len(listed) == 1:
            return Reply.json({"predictions": next(iter(listed.values())).tolist()})
        rows = tensor.shape[0]
        return Reply.json({"predictions": [
            {k: v[i].tolist() for k, v in listed.items()} for i in range(rows)
        ]})

    async def explain(self, name: str, version: str | None,
                      body: Callable[[], Awaitable[bytes]], header_length: str | None) -> Reply:
        """``/explain`` (explain.py): the outputs and each input's attributions. Counted
        by outcome apart from inference (its metrics feed analysis and scaling); never
        raises."""
        error: Exception | None = None
        try:
            self.check_model(name, version)
            if not self.config.explain:
                raise NotEnabled(f"explanations are off for model {name!r}: its deployment "
                                 "turns them on with spec.runtime.explain.enabled "
                                 "(MODELYARD_EXPLAIN)")
            self.loaded()
            explainer = self.explainer
            assert explainer is not None
            explainer.check_room()  # before reading and decoding: refusing costs nothing
            content = await body()
            decoded = decode_infer_request(content, parse_header_length(header_length,
                                                                        len(content)))
            reply = Reply(200, await explainer.explain(decoded))
        except _ClientGone:
            raise
        except Exception as failure:
            if not isinstance(failure, RuntimeServingError):
                log.exception("unexpected error during an explanation", exc_info=failure)
            error = failure
            reply = Reply.error(failure)
        self.metrics.observe_explain(outcome_of(error))
        return reply

    async def answer(self, protocol: str, work: Awaitable[Reply]) -> Reply:
        """Run one inference request: count it, time it, map its error (never raise)."""
        started = time.perf_counter()
        metrics = self.metrics
        metrics.inflight.inc()
        try:
            reply = await work
        except Exception as error:
            if not isinstance(error, RuntimeServingError):
                log.exception("unexpected error during inference", exc_info=error)
            reply = Reply.error(error)
        finally:
            metrics.inflight.dec()
        metrics.observe_request(protocol, reply.status, time.perf_counter() - started)
        return reply


class _ClientGone(Exception):
    """The client disconnected before its request body arrived."""


async def _watch_disconnect(receive: Receive, task: asyncio.Task[Any], gone: list[bool]) -> None:
    """Once the body is read, ``receive`` answers only when the client disconnects: then
    cancel ``task`` (the request's), which takes its work out of the batch queue."""
    message = await receive()
    if message["type"] == "http.disconnect":
        gone.append(True)
        task.cancel()


_INFER = re.compile(r"^/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer$")
_EXPLAIN = re.compile(
    r"^/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?/explain$")
_PREDICT = re.compile(r"^/v1/models/(?P<name>[^/:]+):predict$")
# Open without an API key: the kubelet's probes, Prometheus' and the operator's scrapes
# (counts and latencies, no payload; the operator never reads Secrets), the static page.
_OPEN = re.compile(r"^(/v2/health/(live|ready)|/v2/models/[^/]+(/versions/[^/]+)?/ready"
                   r"|/metrics|/)$")
_UNAUTHORIZED = orjson.dumps(
    {"error": "missing or invalid API key: send the header Authorization: Bearer <key>"})


class InferenceDoor:
    """ASGI front door: inference requests go straight to the :class:`Runtime`.

    The hot path skips the framework (routing, dependency solving, middleware
    stack): the raw body bytes are read from ``receive``, decoded by
    ``protocol.py``, and the reply is sent in two ASGI messages. Everything else
    (health, metadata, metrics, the page, lifespan) goes to the FastAPI app.
    """

    def __init__(self, app: FastAPI, runtime: Runtime, keys: ApiKeys | None = None) -> None:
        self.app = app
        self.runtime = runtime
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            if self.keys is not None and not _OPEN.match(path) and not self.keys.allows(
                    next((v for k, v in scope["headers"] if k == b"authorization"), None)):
                await send({"type": "http.response.start", "status": 401, "headers": [
                    (b"content-type", JSON.encode()), (b"www-authenticate", b"Bearer"),
                    (b"content-length", str(len(_UNAUTHORIZED)).encode())]})
                await send({"type": "http.response.body", "body": _UNAUTHORIZED})
                return
            infer = _INFER.match(path)
            predict = None if infer else _PREDICT.match(path)
            if infer or predict:
                self.runtime.last_request = time.monotonic()  # a drain waits for quiet
                await self._inference(scope, receive, send, infer, predict)
                return
            explain = _EXPLAIN.match(path)
            if explain:
                self.runtime.last_request = time.monotonic()
                await self._explain(scope, receive, send, explain)
                return
        await self.app(scope, receive, send)

    async def _inference(
        self, scope: Scope, receive: Receive, send: Send,
        infer: re.Match[str] | None, predict: re.Match[str] | None,
    ) -> None:
        runtime = self.runtime
        if scope["method"] != "POST":
            reply = Reply.json({"error": "Method Not Allowed"}, 405)
        else:
            declared, header_length, timeout = _body_headers(scope)
            gone: list[bool] = []
            try:
                work = self._work(receive, declared, header_length, infer, predict,
                                  request_timeout=timeout, gone=gone)
                reply = await runtime.answer("v2" if infer else "v1", work)
            except _ClientGone:
                return
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not gone or task is None:
                    raise
                task.uncancel()  # the client left: nobody to answer
                return
        await send({"type": "http.response.start", "status": reply.status,
                    "headers": reply.headers()})
        await send({"type": "http.response.body", "body": reply.body})

    async def _explain(self, scope: Scope, receive: Receive, send: Send,
                       match: re.Match[str]) -> None:
        """``/explain``: outside the batcher; a client that leaves before its body is
        read gets no answer (one that leaves later: its explanation finishes)."""
        if scope["method"] != "POST":
            reply = Reply.json({"error": "Method Not Allowed"}, 405)
        else:
            declared, header_length, _ = _body_headers(scope)
            try:
                reply = await self.runtime.explain(match["name"], match["version"],
                                                   lambda: self._body(receive, declared),
                                                   header_length)
            except _ClientGone:
                return
        await send({"type": "http.response.start", "status": reply.status,
                    "headers": reply.headers()})
        await send({"type": "http.response.body", "body": reply.body})

    async def _body(self, receive: Receive, declared: int | None) -> bytes:
        """The request body, within the size limit (413 past it)."""
        runtime = self.runtime
        runtime.check_size(declared)
        chunks: list[bytes] = []
        total = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk = message.get("body", b"")
            total += len(chunk)
            runtime.check_size(None, total)
            chunks.append(chunk)
            more = message.get("more_body", False)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _work(
        self, receive: Receive, declared: int | None, header_length: str | None,
        infer: re.Match[str] | None, predict: re.Match[str] | None,
        *, request_timeout: bytes | None, gone: list[bool],
    ) -> Reply:
        runtime = self.runtime
        deadline = None if request_timeout is None else from_header(request_timeout)
        # A request that will be refused (no such model, not loaded, the queue full) is
        # refused before its body is read: under overload the refusals share the serving
        # core, and uvicorn drops an unread body once the answer is sent.
        match = infer or predict
        assert match is not None
        runtime.check_model(match["name"], infer["version"] if infer else None)
        runtime.loaded()[1].check_room()
        body = await self._body(receive, declared)
        task = asyncio.current_task()
        assert task is not None
        watcher = asyncio.ensure_future(_watch_disconnect(receive, task, gone))
        try:
            if infer is not None:
                return await runtime.infer(infer["name"], infer["version"], body,
                                           header_length, deadline)
            assert predict is not None
            return await runtime.predict_v1(predict["name"], body, deadline)
        finally:
            watcher.cancel()


def _page() -> bytes:
    return resources.files("modelyard.runtime").joinpath("static/index.html").read_bytes()


def create_app(runtime: Runtime) -> InferenceDoor:
    """The ASGI app serving ``runtime``'s model (FastAPI behind the inference door)."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        runtime.start()
        grpc_server = None
        if runtime.config.grpc_port:  # OIP over gRPC on the same loop and batcher
            from modelyard.runtime.grpcserver import serve_grpc

            grpc_server = await serve_grpc(runtime, keys)
        yield
        if grpc_server is not None:  # its calls in flight finish; then the batcher drains
            await grpc_server.stop(grace=30)
        await runtime.stop()

    app = FastAPI(
        title="modelyard runtime", version=__version__, lifespan=lifespan,
        docs_url=None, redoc_url=None, openapi_url=None,
    )
    app.state.runtime = runtime
    metrics = runtime.metrics
    page = _page()

    @app.exception_handler(RuntimeServingError)
    async def _serving_error(_: Request, error: RuntimeServingError) -> Response:
        return Reply.error(error).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, error: StarletteHTTPException) -> Response:
        return _json({"error": str(error.detail)}, error.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, error: RequestValidationError) -> Response:
        return _json({"error": f"invalid request: {error.errors()}"}, 400)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, error: Exception) -> Response:
        log.exception("unexpected error", exc_info=error)
        return _json({"error": "internal server error"}, 500)

    _health_routes(app, runtime)

    # operations -------------------------------------------------------------------------
    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/")
    async def index() -> Response:
        return Response(page, media_type="text/html; charset=utf-8")

    keys = ApiKeys(runtime.config.api_keys) if runtime.config.api_keys is not None else None
    return InferenceDoor(app, runtime, keys)


def _health_routes(app: FastAPI, runtime: Runtime) -> None:
    """Health, readiness and metadata routes (v2 and v1)."""

    @app.get("/v2/health/live")
    async def live() -> Response:
        return _json({"live": True})

    @app.get("/v2/health/ready")
    async def server_ready() -> Response:
        return _json({"ready": runtime.ready}, 200 if runtime.ready else 503)

    @app.get("/v2")
    async def server_metadata() -> Response:
        return _json({
            "name": "modelyard",
            "version": __version__,
            "extensions": ["binary_tensor_data"],
        })

    async def model_ready(name: str, version: str | None) -> Response:
        runtime.check_model(name, version)
        if runtime.failure is not None:
            return _json({"error": runtime.failure}, 503)
        if runtime.draining:
            return _json({"error": "draining: the server is shutting down"}, 503)
        if not runtime.ready:
            return _json({"error": "the model is still loading"}, 503)
        return _json({"name": name, "ready": True})

    @app.get("/v2/models/{name}/ready")
    async def ready_latest(name: str) -> Response:
        return await model_ready(name, None)

    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def ready_version(name: str, version: str) -> Response:
        return await model_ready(name, version)

    async def model_metadata(name: str, version: str | None) -> Response:
        runtime.check_model(name, version)
        model, _ = runtime.loaded()
        return _json(model.metadata())

    @app.get("/v2/models/{name}")
    async def metadata_latest(name: str) -> Response:
        return await model_metadata(name, None)

    @app.get("/v2/models/{name}/versions/{version}")
    async def metadata_version(name: str, version: str) -> Response:
        return await model_metadata(name, version)

    @app.get("/v1/models")
    async def list_models() -> Response:
        return _json({"models": [runtime.config.model_name]})

    @app.get("/v1/models/{name}")
    async def model_status(name: str) -> Response:
        runtime.check_model(name)
        handler = runtime.handler
        return _json({
            "name": name,
            "version": runtime.config.model_version,
            "ready": runtime.ready,
            "handler": runtime.config.handler,
            "accepts_images": bool(handler is not None and handler.accepts_images),
        })


def _body_headers(scope: Scope) -> tuple[int | None, str | None, bytes | None]:
    """The headers a request body is read by: its declared length, the OIP binary
    extension's JSON header length, and the request's own deadline (raw)."""
    declared: int | None = None
    header_length: str | None = None
    timeout: bytes | None = None
    for key, value in scope["headers"]:
        if key == b"content-length" and value.isdigit():
            declared = int(value)
        elif key == b"inference-header-content-length":
            header_length = value.decode("latin-1")
        elif key == TIMEOUT_HEADER:
            timeout = value
    return declared, header_length, timeout

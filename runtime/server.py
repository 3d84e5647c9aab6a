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
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

import numpy as np
import orjson
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from modelyard.runtime import __version__
from modelyard.runtime.batching import Batcher
from modelyard.runtime.concurrency import run_blocking
from modelyard.runtime.config import RuntimeConfig
from modelyard.runtime.errors import (
    InvalidInput,
    ModelNotFound,
    PayloadTooLarge,
    RuntimeServingError,
    ServiceUnavailable,
    status_for,
)
from modelyard.runtime.handlers import Handler
from modelyard.runtime.metrics import CONTENT_TYPE, RuntimeMetrics
from modelyard.runtime.models import LoadedModel, load_model, load_object
from modelyard.runtime.protocol import (
    DATATYPES,
    HEADER_LENGTH,
    decode_infer_request,
    encode_infer_response,
    parse_header_length,
    validate_inputs,
)
from modelyard.runtime.storage import fetch

__all__ = ["Runtime", "create_app"]

log = logging.getLogger(__name__)

JSON = "application/json"


def _json(document: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(document), status_code=status, media_type=JSON)


def _error(error: Exception) -> Response:
    status = status_for(error)
    message = str(error) if isinstance(error, RuntimeServingError) else "internal server error"
    return _json({"error": message}, status)


class Runtime:
    """The data plane of one model: load it, say whether it is ready, run inferences."""

    def __init__(
        self, config: RuntimeConfig, on_fatal: Callable[[str], None] | None = None
    ) -> None:
        self.config = config
        self.model: LoadedModel | None = None
        self.handler: Handler | None = None
        self.batcher: Batcher | None = None
        self.failure: str | None = None
        self.draining = False
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
            path = await run_blocking(fetch, config.model_uri, config.cache_dir, config.sha256)
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
            model.predict, config.max_batch_size, config.max_delay_ms, self.metrics.observe_batch
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
    async def read_body(self, request: Request) -> bytes:
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(f"request body of {declared} bytes is over the {limit} limit")
        chunks = []
        total = 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise PayloadTooLarge(f"request body is over the {limit} byte limit")
            chunks.append(chunk)
        return b"".join(chunks)

    async def infer(self, request: Request, name: str, version: str | None) -> Response:
        self.check_model(name, version)
        model, batcher = self.loaded()
        body = await self.read_body(request)
        header_length = parse_header_length(request.headers.get(HEADER_LENGTH), len(body))
        decoded = decode_infer_request(body, header_length)
        inputs = validate_inputs(decoded.inputs, model.inputs)
        if decoded.outputs is not None and model.outputs:
            known = {meta.name for meta in model.outputs}
            for wanted in decoded.outputs:
                if wanted.name not in known:
                    raise InvalidInput(f"unknown output {wanted.name!r}; the model returns "
                                       f"{', '.join(sorted(known))}")
        outputs = await batcher.submit(inputs)
        content, json_length = encode_infer_response(
            model.name, model.version, decoded, outputs
        )
        if json_length is None:
            return Response(content, media_type=JSON)
        return Response(
            content,
            media_type="application/octet-stream",
            headers={"Inference-Header-Content-Length": str(json_length)},
        )

    async def predict_v1(self, request: Request, name: str) -> Response:
        self.check_model(name)
        model, batcher = self.loaded()
        body = await self.read_body(request)
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
            results = await asyncio.gather(*(batcher.submit(c) for c in checked))
            return _json({"predictions": [handler.postprocess(r) for r in results]})
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
        outputs = await batcher.submit(validate_inputs({meta.name: tensor}, model.inputs))
        if len(outputs) == 1:
            predictions: Any = next(iter(outputs.values())).float().tolist() \
                if next(iter(outputs.values())).dtype == torch.bfloat16 \
                else next(iter(outputs.values())).tolist()
        else:
            count = tensor.shape[0]
            predictions = [
                {k: v[i].float().tolist() if v.dtype == torch.bfloat16 else v[i].tolist()
                 for k, v in outputs.items()}
                for i in range(count)
            ]
        return _json({"predictions": predictions})


def _page() -> bytes:
    return resources.files("modelyard.runtime").joinpath("static/index.html").read_bytes()


def create_app(runtime: Runtime) -> FastAPI:
    """The ASGI app serving ``runtime``'s model."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        runtime.start()
        yield
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
        return _error(error)

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

    async def measured(protocol: str, work: Awaitable[Response]) -> Response:
        started = time.perf_counter()
        metrics.inflight.inc()
        try:
            response = await work
        except Exception as error:
            if not isinstance(error, RuntimeServingError):
                log.exception("unexpected error during inference", exc_info=error)
            response = _error(error)
        finally:
            metrics.inflight.dec()
        metrics.observe_request(protocol, response.status_code, time.perf_counter() - started)
        return response

    _health_routes(app, runtime)

    # inference --------------------------------------------------------------------------
    @app.post("/v2/models/{name}/infer")
    async def infer_latest(name: str, request: Request) -> Response:
        return await measured("v2", runtime.infer(request, name, None))

    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def infer_version(name: str, version: str, request: Request) -> Response:
        return await measured("v2", runtime.infer(request, name, version))

    @app.post("/v1/models/{name}:predict")
    async def predict(name: str, request: Request) -> Response:
        return await measured("v1", runtime.predict_v1(request, name))

    # operations -------------------------------------------------------------------------
    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/")
    async def index() -> Response:
        return Response(page, media_type="text/html; charset=utf-8")

    return app


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

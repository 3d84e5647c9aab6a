"""The two ASGI apps: the proxy (every path, routed by the Host header) and the admin app
(``/metrics``, ``/healthz``), so no model path is ever shadowed."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Mapping

import httpx
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from .discovery import Discovery, ModelNotFound, NoReadyReplica, PodSource, ShuttingDown
from .metrics import Metrics
from .routing import Endpoint, ModelRef, choose, forward_headers, parse_host
from .settings import Settings

log = logging.getLogger(__name__)


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class _TooLarge(Exception):
    pass


class Activator:
    """The proxy app (``self``, ASGI) and the admin app (:attr:`admin`)."""

    def __init__(self, settings: Settings, source: PodSource,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.discovery = Discovery(source, self.metrics, poll_s=settings.poll_seconds,
                                   cache_s=settings.cache_seconds)
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(settings.upstream_timeout_seconds,
                                  connect=settings.connect_timeout_seconds),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
            trust_env=False, follow_redirects=False, transport=transport)
        self.admin = Starlette(routes=[
            Route("/metrics", self._metrics_endpoint, methods=["GET"]),
            Route("/healthz", self._healthz, methods=["GET"]),
        ])

    async def aclose(self) -> None:
        await self.discovery.close()
        await self._http.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # no lifespan work (see serve); websockets not proxied
            return
        response = await self._handle(Request(scope, receive))
        await response(scope, receive, send)

    async def _handle(self, request: Request) -> Response:
        ref = parse_host(request.headers.get("host"), self.settings.cluster_domain)
        if ref is None:
            self.metrics.rejected.labels("unknown_host").inc()
            return _error(404, f"host {request.headers.get('host')!r} names no model Service "
                               "(NAME.NAMESPACE[.svc[.cluster.local]])")
        try:
            body = await self._body(request)
        except _TooLarge:
            self.metrics.rejected.labels("too_large").inc()
            return _error(413, f"request body above {self.settings.max_body_bytes} bytes")
        except ClientDisconnect:
            return Response(status_code=400)
        start = time.monotonic()
        deadline = start + self.settings.timeout_seconds
        tried: set[Endpoint] = set()
        held = False
        while True:
            try:
                ready, waited = await self.discovery.endpoints(ref, deadline)
            except NoReadyReplica:
                return self._timed_out(ref, start, held)
            except ModelNotFound:
                self.metrics.rejected.labels("not_found").inc()
                return _error(404, f"no ModelDeployment {ref}")
            except ShuttingDown:
                self._observe(ref, start, held, "shutdown")
                return _error(503, f"model {ref} has no ready replica yet and this activator "
                                   "is stopping; try again",
                              {"Retry-After": str(self.settings.retry_after_seconds)})
            held = held or waited
            endpoint = choose(ready, self.discovery.turn(ref), tried)
            if endpoint is None:  # every listed pod refused: wait for the next lookup
                for gone in tried:
                    self.discovery.forget(ref, gone)
                tried.clear()
                continue
            try:
                upstream = await self._send(request, body, endpoint)
            except (httpx.ConnectError, httpx.ConnectTimeout) as error:
                log.info("pod %s of %s refused the connection (%s); trying another",
                         endpoint.url, ref, error)
                tried.add(endpoint)
                self.discovery.forget(ref, endpoint)
                continue
            except httpx.HTTPError as error:
                self._observe(ref, start, held, "error")
                return _error(502, f"model {ref}: pod {endpoint.url} failed the request: "
                                   f"{type(error).__name__}: {error}")
            self._observe(ref, start, held, "forwarded")
            response = StreamingResponse(_relay(upstream), status_code=upstream.status_code)
            response.raw_headers = [  # repeated headers (set-cookie) kept
                (key.encode("latin-1"), value.encode("latin-1"))
                for key, value in forward_headers(upstream.headers.multi_items())]
            return response

    def _timed_out(self, ref: ModelRef, start: float, held: bool) -> Response:
        self._observe(ref, start, held, "timeout")
        seconds = f"{self.settings.timeout_seconds:g}"
        return _error(503, f"model {ref} has no ready replica after {seconds} s",
                      {"Retry-After": str(self.settings.retry_after_seconds)})

    def _observe(self, ref: ModelRef, start: float, held: bool, outcome: str) -> None:
        labels = (ref.namespace, ref.name)
        self.metrics.wait.labels(*labels).observe(time.monotonic() - start)
        self.metrics.requests.labels(*labels, outcome).inc()
        if held:
            self.metrics.held.labels(*labels).inc()

    async def _body(self, request: Request) -> bytes:
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise _TooLarge
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _TooLarge
            chunks.append(chunk)
        return b"".join(chunks)

    async def _send(self, request: Request, body: bytes, endpoint: Endpoint) -> httpx.Response:
        url = httpx.URL(endpoint.url + request.url.path,
                        query=request.url.query.encode("latin-1"))
        headers = forward_headers(request.headers.items(), drop=("content-length", "expect"))
        upstream = self._http.build_request(request.method, url, headers=headers, content=body)
        return await self._http.send(upstream, stream=True)

    async def _metrics_endpoint(self, request: Request) -> Response:
        return Response(self.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    async def _healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})


async def _relay(upstream: httpx.Response) -> AsyncIterator[bytes]:
    """The pod's answer as it arrives, bytes untouched (compression included)."""
    try:
        async for chunk in upstream.aiter_raw():
            yield chunk
    finally:
        await upstream.aclose()

"""The two ASGI apps: the proxy (every path, routed by the Host header) and the admin app
(``/metrics``, ``/healthz``), so no model path is ever shadowed.

Answers pass through as they arrive: the pod's body is relayed chunk by chunk, never
gathered, so a streamed completion (server-sent events) reaches the client event by event;
a client that goes away mid-answer closes the connection to the pod, which stops the work
there (vLLM aborts the request). A client that goes away while its request is held stops
being held at once, so it no longer counts as a reason to wake the model."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Mapping
from typing import TypeVar
from urllib.parse import quote

import aiohttp
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send
from yarl import URL

from .discovery import Discovery, ModelNotFound, NoReadyReplica, PodSource, ShuttingDown
from .metrics import Metrics
from .routing import Endpoint, ModelRef, choose, forward_headers, parse_host
from .settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class _TooLarge(Exception):
    pass


class _ClientGone(Exception):
    """The client closed its connection before the pod's answer began (held, or while
    the pod works on a non-streamed answer)."""


class Activator:
    """The proxy app (``self``, ASGI) and the admin app (:attr:`admin`)."""

    def __init__(self, settings: Settings, source: PodSource) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.discovery = Discovery(source, self.metrics, poll_s=settings.poll_seconds,
                                   cache_s=settings.cache_seconds,
                                   hold_s=settings.hold_seconds)
        self._client: aiohttp.ClientSession | None = None
        self.admin = Starlette(routes=[
            Route("/metrics", self._metrics_endpoint, methods=["GET"]),
            Route("/healthz", self._healthz, methods=["GET"]),
        ])

    async def aclose(self) -> None:
        await self.discovery.close()
        if self._client is not None:
            await self._client.close()

    def _http(self) -> aiohttp.ClientSession:
        """The client to the pods (aiohttp: its HTTP parser is C, and on a streamed
        completion parsing each chunk is most of the relay's cost), made on first use: it
        belongs to the event loop that serves."""
        if self._client is None:
            settings = self.settings
            self._client = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=0,
                    # A model serving TLS (spec.tls) is reached encrypted, by pod IP,
                    # without a CA to verify its certificate against (docs/security.md).
                    ssl=False,
                    # Below the 5 s after which the pods' servers (uvicorn: the runtime,
                    # vLLM) close an idle connection: never reuse one they are closing.
                    keepalive_timeout=4.0),
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=settings.connect_timeout_seconds,
                    sock_read=settings.upstream_timeout_seconds),
                # Bytes untouched (compression included), no cookie kept from one client's
                # answer for the next, no content type the client did not send.
                auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
                skip_auto_headers=("Content-Type",))
        return self._client

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # no lifespan work (see serve); websockets not proxied
            return
        answer = await self._handle(Request(scope, receive))
        if isinstance(answer, Response):
            await answer(scope, receive, send)
        else:
            await _relay(answer, receive, send)

    async def _handle(self, request: Request) -> Response | aiohttp.ClientResponse:
        """The activator's own answer, or the pod's (its headers read, its body not)."""
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
        except ClientDisconnect:  # gone before its body was read: counted like any other
            self._observe(ref, time.monotonic(), False, "abandoned")
            return Response(status_code=499)
        start = time.monotonic()
        tried: set[Endpoint] = set()
        held = False
        while True:
            try:
                ready, waited = await self._endpoints(request, ref, start)
            except NoReadyReplica as error:
                return self._timed_out(ref, start, held, error.hold_s)
            except _ClientGone:
                self._observe(ref, start, held, "abandoned")
                return Response(status_code=499)  # nobody is there to read it
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
                # Until the pod's headers: a whole non-streamed completion. A client that
                # leaves meanwhile closes the pod's connection too (the pod stops).
                upstream = await _unless_gone(request, self._send(request, body, endpoint))
            except _ClientGone:
                self._observe(ref, start, held, "abandoned")
                return Response(status_code=499)
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as error:
                log.info("pod %s of %s refused the connection (%s); trying another",
                         endpoint.url, ref, error)
                tried.add(endpoint)
                self.discovery.forget(ref, endpoint)
                continue
            except aiohttp.ClientError as error:
                self._observe(ref, start, held, "error")
                return _error(502, f"model {ref}: pod {endpoint.url} failed the request: "
                                   f"{type(error).__name__}: {error}")
            self._observe(ref, start, held, "forwarded")
            return upstream

    async def _endpoints(self, request: Request, ref: ModelRef,
                         start: float) -> tuple[list[Endpoint], bool]:
        """:meth:`.Discovery.endpoints`, given up as soon as the client goes away."""
        if ready := self.discovery.fresh(ref):  # the common case: no waiting, no tasks
            return ready, False
        return await _unless_gone(request, self.discovery.endpoints(ref, start))

    def _timed_out(self, ref: ModelRef, start: float, held: bool, hold_s: float) -> Response:
        self._observe(ref, start, held, "timeout")
        return _error(503, f"model {ref} has no ready replica after {hold_s:g} s",
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

    async def _send(self, request: Request, body: bytes,
                    endpoint: Endpoint) -> aiohttp.ClientResponse:
        """The pod's answer, its headers read: path and query as the client sent them."""
        scope = request.scope
        target = scope.get("raw_path") or quote(scope["path"]).encode("ascii")
        if query := scope.get("query_string"):
            target += b"?" + query
        headers = forward_headers(request.headers.items(), drop=("content-length", "expect"))
        return await self._http().request(
            request.method, URL(endpoint.url + target.decode("latin-1"), encoded=True),
            headers=headers, data=body or None, allow_redirects=False)

    async def _metrics_endpoint(self, request: Request) -> Response:
        return Response(self.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    async def _healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})


async def _unless_gone(request: Request, work: Awaitable[T]) -> T:
    """``work``'s result, or :class:`_ClientGone` (and ``work`` cancelled) as soon as the
    client disconnects."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((task, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, gone):
            pending.cancel()
        await asyncio.gather(task, gone, return_exceptions=True)
    if gone.done() and not gone.cancelled():  # gone, or its channel broke
        if task.done() and not task.cancelled() and task.exception() is None:
            result = task.result()
            if isinstance(result, aiohttp.ClientResponse):
                result.close()
        raise _ClientGone
    return task.result()  # its answer, or what it raised


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (its body was read already: what comes next on
    the ASGI channel is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _relay(upstream: aiohttp.ClientResponse, receive: Receive, send: Send) -> None:
    """The pod's answer as it arrives, straight onto the ASGI channel: its status, its
    end-to-end headers (repeated ones, set-cookie, kept), then whatever each read from the
    pod brings, sent on at once, bytes untouched (compression included; vLLM writes one
    server-sent event at a time, so events read apart go apart). No response object and
    no task group per answer: on a streamed completion this loop is the activator's cost
    per token.

    A client that disconnects cancels the relay: a watcher waits for the disconnect on
    the ASGI channel, as Starlette's StreamingResponse does. The upstream connection is
    then closed (the answer was not read to the end), and the pod sees its client go
    (vLLM aborts the request)."""
    relay = asyncio.current_task()
    assert relay is not None
    streaming, left = True, False

    async def watch() -> None:
        nonlocal left
        while (await receive())["type"] != "http.disconnect":
            pass
        if streaming:  # not once the whole answer was sent (that ends the channel too)
            left = True
            relay.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        headers = forward_headers((key.decode("latin-1"), value.decode("latin-1"))
                                  for key, value in upstream.raw_headers)
        await send({"type": "http.response.start", "status": upstream.status,
                    "headers": [(key.encode("latin-1"), value.encode("latin-1"))
                                for key, value in headers]})
        async for chunk in upstream.content.iter_any():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        streaming = False
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    except asyncio.CancelledError:
        if not left:
            raise
        relay.uncancel()  # the client left: nobody to answer, nothing went wrong
    finally:
        streaming = False
        watcher.cancel()
        if upstream.content.at_eof():
            upstream.release()  # the connection goes back to the pool
        else:
            upstream.close()  # cut: the pod sees its client go
        await asyncio.gather(watcher, return_exceptions=True)

"""The activator: holds requests for a model scaled to zero until a replica is ready.

While a ModelDeployment has no ready replica the operator points its stable Service at
the activator's pods (a selector-less Service and a managed EndpointSlice). Each request
arriving here names its model by the Host header, the Service's DNS name
(``NAME.NAMESPACE``, ``NAME.NAMESPACE.svc`` or ``NAME.NAMESPACE.svc.cluster.local``, any
port). The activator then:

1. looks up the model's ready runtime pods (label ``modelyard.dev/model-deployment=NAME``,
   Ready, not terminating, with an IP; port: the container port named ``http``);
2. if there is none, *holds* the request. Held requests are the
   ``modelyard_activator_waiting_requests`` gauge, which the operator's autoscaler reads as
   the signal to wake the model. The activator itself never scales anything. While
   requests wait for a model, one poll per model (every ``poll_seconds``, shared by all
   its waiters) lists the pods again;
3. forwards the request (method, path, query, buffered body, end-to-end headers) to one
   ready pod, round robin, and streams the answer back unchanged, status included. A pod
   that refuses the connection (it just went away) is dropped and another one tried, or
   the request waits again, within the same deadline;
4. answers ``503 {"error": "model NS/NAME has no ready replica after N s"}`` with
   ``Retry-After`` when a request has waited ``timeout_seconds``, ``404`` for a Host that
   names no Service or a ModelDeployment that does not exist, ``413`` for a body above
   ``max_body_bytes`` and ``502`` when a pod fails after the request reached it (it is not
   retried: the model may have run it).

Two listeners: the proxy port (every path, routed by Host) and an admin port with
``/metrics`` (Prometheus text from the activator's own registry) and ``/healthz``, so no
model path is ever shadowed.

Run by ``python -m modelyard.operator.activator`` (:func:`main`); flags mirror
``MODELYARD_ACTIVATOR_*`` variables (:func:`parse_settings`). It needs ``list`` on pods
and ``get`` on ``modeldeployments.modelyard.dev`` in the model namespaces. Imports no kopf.

Module map: pure helpers (:func:`parse_host`, :func:`forward_headers`,
:func:`ready_endpoints`, :func:`choose`) → :class:`KubePods` (the only Kubernetes calls,
in a worker thread) → :class:`Discovery` (per-model cache, shared polls, holding) →
:class:`Activator` (the two ASGI apps).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import re
import signal
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

import httpx
import uvicorn
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from . import api
from .render import MODEL_LABEL

__all__ = [
    "Activator",
    "Discovery",
    "Endpoint",
    "KubePods",
    "ModelRef",
    "Settings",
    "choose",
    "forward_headers",
    "main",
    "parse_host",
    "parse_settings",
    "ready_endpoints",
]

log = logging.getLogger(__name__)

DEFAULT_PORT = 8080

# --------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class Settings:
    """Every knob; each is a flag ``--name-with-dashes`` and ``MODELYARD_ACTIVATOR_NAME``."""

    host: str = "0.0.0.0"
    port: int = 8080
    admin_port: int = 9090
    timeout_seconds: float = 120.0
    max_body_bytes: int = 64 * 1024 * 1024
    poll_seconds: float = 0.5
    cache_seconds: float = 1.0
    retry_after_seconds: int = 5
    connect_timeout_seconds: float = 2.0
    upstream_timeout_seconds: float = 600.0
    cluster_domain: str = "cluster.local"
    check_model_deployment: bool = True
    log_level: str = "info"


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {raw!r}")


_CONVERT: dict[type | str, Any] = {"int": int, "float": float, "bool": _bool, "str": str}


def parse_settings(argv: Sequence[str] | None = None,
                   environ: Mapping[str, str] | None = None) -> Settings:
    """Flags over ``MODELYARD_ACTIVATOR_*`` variables over the defaults."""
    env = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="python -m modelyard.operator.activator",
        description="Hold requests for models scaled to zero; forward them once a "
                    "replica is ready.",
        epilog="Every flag mirrors MODELYARD_ACTIVATOR_<NAME>; the flag wins.")
    for item in fields(Settings):
        parser.add_argument("--" + item.name.replace("_", "-"), dest=item.name, default=None,
                            help=f"MODELYARD_ACTIVATOR_{item.name.upper()} "
                                 f"(default {item.default})")
    flags = vars(parser.parse_args(argv))
    values: dict[str, Any] = {}
    for item in fields(Settings):
        raw = flags[item.name]
        if raw is None:
            raw = env.get(f"MODELYARD_ACTIVATOR_{item.name.upper()}")
        if raw is None:
            continue
        try:
            values[item.name] = _CONVERT[str(item.type)](raw)
        except ValueError as error:
            parser.error(f"--{item.name.replace('_', '-')}: {error}")
    settings = Settings(**values)
    if settings.timeout_seconds <= 0 or settings.poll_seconds <= 0:
        parser.error("--timeout-seconds and --poll-seconds must be positive")
    return settings


# --------------------------------------------------------------------------------------
# Pure helpers


@dataclass(frozen=True, order=True)
class ModelRef:
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, order=True)
class Endpoint:
    ip: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        return f"http://{host}:{self.port}"


_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


def parse_host(host: str | None, cluster_domain: str = "cluster.local") -> ModelRef | None:
    """The model a Host header names, or None when it names no Service.

    ``NAME.NAMESPACE``, ``NAME.NAMESPACE.svc`` and ``NAME.NAMESPACE.svc.<cluster domain>``,
    case-insensitive, with or without a port or a final dot. IP addresses name nothing.
    """
    if not host:
        return None
    value = host.strip().lower()
    if value.startswith("["):  # an IPv6 literal
        return None
    name_part, _, port = value.partition(":")
    if port and not port.isdigit():
        return None
    labels = name_part.rstrip(".").split(".")
    domain = cluster_domain.lower().strip(".").split(".")
    suffixes: tuple[list[str], ...] = ([], ["svc"], ["svc", *domain])
    if labels[2:] not in suffixes:
        return None
    if len(labels) < 2 or not all(_LABEL.fullmatch(label) for label in labels[:2]):
        return None
    name, namespace = labels[0], labels[1]
    if name.isdigit() and namespace.isdigit():  # the first half of an IPv4 address
        return None
    return ModelRef(namespace=namespace, name=name)


# RFC 9110 7.6.1: these describe one connection, not the message; a proxy drops them.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "trailers", "transfer-encoding", "upgrade",
})


def forward_headers(headers: Iterable[tuple[str, str]],
                    drop: Iterable[str] = ()) -> list[tuple[str, str]]:
    """End-to-end headers only: hop-by-hop ones, those the Connection header names, and
    ``drop`` (lower-case names) removed; order and repeated headers kept."""
    pairs = list(headers)
    named = {token.strip().lower() for key, value in pairs if key.lower() == "connection"
             for token in value.split(",")}
    gone = HOP_BY_HOP | named | set(drop)
    return [(key, value) for key, value in pairs if key.lower() not in gone]


def _is_ready(pod: Mapping[str, Any]) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def _http_port(pod: Mapping[str, Any]) -> int:
    for container in (pod.get("spec") or {}).get("containers") or []:
        for port in container.get("ports") or []:
            if port.get("name") == "http" and port.get("containerPort"):
                return int(port["containerPort"])
    return DEFAULT_PORT


def ready_endpoints(pods: Iterable[Mapping[str, Any]]) -> list[Endpoint]:
    """Where the ready runtime pods among ``pods`` (API JSON) listen, sorted.

    Ready (the runtime's own readiness probe passed: a loading model is not Ready), not
    being deleted, and with an IP; the port is the container port named ``http``."""
    found = {Endpoint(str(pod["status"]["podIP"]), _http_port(pod)) for pod in pods
             if _is_ready(pod) and not (pod.get("metadata") or {}).get("deletionTimestamp")
             and (pod.get("status") or {}).get("podIP")}
    return sorted(found)


def choose(endpoints: Sequence[Endpoint], turn: int,
           exclude: Iterable[Endpoint] = ()) -> Endpoint | None:
    """Round robin over ``endpoints`` less ``exclude``; None when nothing is left."""
    skipped = set(exclude)
    candidates = [e for e in endpoints if e not in skipped]
    if not candidates:
        return None
    return candidates[turn % len(candidates)]


# --------------------------------------------------------------------------------------
# Kubernetes: the ready pods of a model


@dataclass(frozen=True)
class Lookup:
    """What the API said about a model at one moment."""

    ready: list[Endpoint]
    exists: bool = True


class PodSource(Protocol):
    async def lookup(self, ref: ModelRef) -> Lookup: ...


class KubePods:
    """Lists a model's pods (and, when none is ready, checks its ModelDeployment exists)
    with the official client, in a worker thread."""

    def __init__(self, api_client: Any, check_model_deployment: bool = True,
                 request_timeout_s: float = 5.0) -> None:
        from kubernetes import client

        self._core = client.CoreV1Api(api_client)
        self._custom = client.CustomObjectsApi(api_client)
        self._check = check_model_deployment
        self._timeout = request_timeout_s

    async def lookup(self, ref: ModelRef) -> Lookup:
        return await asyncio.to_thread(self._lookup, ref)

    def _lookup(self, ref: ModelRef) -> Lookup:
        from kubernetes.client.exceptions import ApiException

        response: Any = self._core.list_namespaced_pod(  # raw: urllib3's response
            ref.namespace, label_selector=f"{MODEL_LABEL}={ref.name}",
            _preload_content=False, _request_timeout=self._timeout)
        ready = ready_endpoints(json.loads(response.data)["items"])
        if ready or not self._check:
            return Lookup(ready)
        try:
            self._custom.get_namespaced_custom_object(
                api.GROUP, api.VERSION, ref.namespace, api.PLURAL, ref.name,
                _request_timeout=self._timeout)
        except ApiException as error:
            if error.status == 404:
                return Lookup([], exists=False)
            raise
        return Lookup([])


# --------------------------------------------------------------------------------------
# Discovery and holding


class NoReadyReplica(Exception):
    """The deadline passed with no ready replica."""


class ModelNotFound(Exception):
    """No ModelDeployment of that name exists."""


class ShuttingDown(Exception):
    """The activator is stopping: held requests are let go (503) rather than cut off."""


@dataclass(eq=False)
class _Model:
    ready: list[Endpoint] = field(default_factory=list)
    exists: bool = True
    fetched: float = -math.inf  # monotonic time of the last successful lookup
    waiters: int = 0
    turn: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    poller: asyncio.Task[None] | None = None


class Discovery:
    """The ready endpoints of each model, looked up at most once per ``poll_s`` per model
    and only while someone asks: one poller task per model serves all its requests."""

    MAX_MODELS = 1024

    def __init__(self, source: PodSource, metrics: Metrics, *, poll_s: float = 0.5,
                 cache_s: float = 1.0) -> None:
        self._source = source
        self._metrics = metrics
        self._poll_s = poll_s
        self._cache_s = cache_s
        self._models: dict[ModelRef, _Model] = {}
        self.closing = False

    async def endpoints(self, ref: ModelRef, deadline: float) -> tuple[list[Endpoint], bool]:
        """Ready endpoints of ``ref`` (non-empty) and whether the request had to be held.

        Raises :class:`NoReadyReplica` at ``deadline`` (monotonic) and
        :class:`ModelNotFound` when the ModelDeployment does not exist."""
        model = self._model(ref)
        if time.monotonic() - model.fetched > self._cache_s:
            # Stale: look again first (shared with every request of this model). A pod
            # gone meanwhile may still be draining and answer, but no longer counts.
            await self._next_lookup(ref, model, deadline)
        if model.ready:
            return model.ready, False
        if not model.exists:
            raise ModelNotFound(str(ref))
        model.waiters += 1
        gauge = self._metrics.waiting.labels(ref.namespace, ref.name)
        gauge.inc()
        try:
            while not model.ready:
                if not model.exists:
                    raise ModelNotFound(str(ref))
                if self.closing:
                    raise ShuttingDown(str(ref))
                await self._next_lookup(ref, model, deadline)
            return model.ready, True
        finally:
            model.waiters -= 1
            gauge.dec()

    def turn(self, ref: ModelRef) -> int:
        model = self._model(ref)
        model.turn += 1
        return model.turn

    def forget(self, ref: ModelRef, gone: Endpoint) -> None:
        """``gone`` refused a connection: stop sending there until a lookup lists it again."""
        model = self._model(ref)
        model.ready = [e for e in model.ready if e != gone]

    def shut(self) -> None:
        """Stop holding: every held request wakes and gives up."""
        self.closing = True
        for model in self._models.values():
            model.changed.set()
            model.changed = asyncio.Event()

    async def close(self) -> None:
        tasks = [m.poller for m in self._models.values() if m.poller is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _model(self, ref: ModelRef) -> _Model:
        model = self._models.get(ref)
        if model is None:
            if len(self._models) >= self.MAX_MODELS:
                self._prune()
            model = self._models[ref] = _Model()
        return model

    def _prune(self) -> None:
        """Forget idle models (no waiter, no poll running), oldest lookup first."""
        idle = sorted((m.fetched, ref) for ref, m in self._models.items()
                      if m.waiters == 0 and (m.poller is None or m.poller.done()))
        for _, ref in idle[: max(1, len(idle) // 2)]:
            del self._models[ref]

    async def _next_lookup(self, ref: ModelRef, model: _Model, deadline: float) -> None:
        changed = model.changed
        self._poll(ref, model)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise NoReadyReplica(str(ref))
        try:
            await asyncio.wait_for(changed.wait(), remaining)
        except TimeoutError:
            raise NoReadyReplica(str(ref)) from None

    def _poll(self, ref: ModelRef, model: _Model) -> None:
        if model.poller is None or model.poller.done():
            model.poller = asyncio.create_task(self._poll_loop(ref, model),
                                               name=f"activator-poll-{ref}")

    async def _poll_loop(self, ref: ModelRef, model: _Model) -> None:
        """Look up now, then every ``poll_s`` while requests wait (the sleep comes after
        each lookup, so lookups of one model are never closer than ``poll_s``)."""
        while True:
            try:
                found = await self._source.lookup(ref)
            except Exception as error:  # the API is down or refuses: keep trying
                log.warning("looking up the pods of %s failed: %s", ref, error)
                self._metrics.lookup_errors.inc()
            else:
                model.ready, model.exists = found.ready, found.exists
                model.fetched = time.monotonic()
                model.changed.set()
                model.changed = asyncio.Event()
            await asyncio.sleep(self._poll_s)
            if model.waiters == 0:
                return


# --------------------------------------------------------------------------------------
# Metrics


WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                120.0, 300.0, 600.0)


class Metrics:
    """The activator's own Prometheus metrics, in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ("namespace", "model_deployment")
        self.waiting = Gauge(
            "modelyard_activator_waiting_requests",
            "Requests held right now because the model has no ready replica.",
            labels, registry=self.registry)
        self.requests = Counter(
            "modelyard_activator_requests",
            "Requests for a known model by outcome: forwarded (an answer came back, whatever "
            "its status), timeout (503 after the wait), shutdown (503: held when the "
            "activator stopped), error (502: the pod failed it).",
            (*labels, "outcome"), registry=self.registry)
        self.held = Counter(
            "modelyard_activator_held_requests",
            "Requests that found no ready replica and were held (cold starts).",
            labels, registry=self.registry)
        self.wait = Histogram(
            "modelyard_activator_wait_seconds",
            "Time from arrival (body read) until forwarded or timed out; 0-ish when a "
            "replica was ready.", labels, buckets=WAIT_BUCKETS, registry=self.registry)
        self.lookup_errors = Counter(
            "modelyard_activator_lookup_errors",
            "Failed lookups of a model's pods in the Kubernetes API.", registry=self.registry)
        self.rejected = Counter(
            "modelyard_activator_rejected_requests",
            "Requests answered without forwarding: Host names no Service (unknown_host), "
            "no such ModelDeployment (not_found), body too large (too_large).",
            ("reason",), registry=self.registry)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


# --------------------------------------------------------------------------------------
# The ASGI apps


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


# --------------------------------------------------------------------------------------
# Process


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: :func:`serve` stops both listeners."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve(settings: Settings, source: PodSource) -> None:
    """Run the proxy and admin listeners until SIGTERM / SIGINT.

    On the signal, held requests are let go at once (503 with Retry-After: the client
    retries and reaches a live replica, of the activator or of the model) while forwarded
    ones finish within the graceful shutdown; then the process exits 0."""
    activator = Activator(settings, source)
    level = settings.log_level.lower()
    proxy = _Server(uvicorn.Config(
        activator, host=settings.host, port=settings.port, log_level=level, access_log=False,
        server_header=False, date_header=False, proxy_headers=False, lifespan="off",
        timeout_graceful_shutdown=25))
    admin = _Server(uvicorn.Config(
        activator.admin, host=settings.host, port=settings.admin_port, log_level=level,
        access_log=False, lifespan="off"))
    servers = (proxy, admin)

    def stop() -> None:
        if any(server.should_exit for server in servers):  # a second signal: now
            for server in servers:
                server.force_exit = True
        activator.discovery.shut()
        for server in servers:
            server.should_exit = True

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    tasks = [asyncio.create_task(server.serve()) for server in servers]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for server in servers:
            server.should_exit = True
        await asyncio.gather(*tasks, return_exceptions=True)
        await activator.aclose()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m modelyard.operator.activator``; returns the exit status."""
    settings = parse_settings(argv)
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .kube import load_api_client

    source = KubePods(load_api_client(), settings.check_model_deployment)
    log.info("activator on %s:%d (metrics on :%d/metrics), timeout %g s",
             settings.host, settings.port, settings.admin_port, settings.timeout_seconds)
    asyncio.run(serve(settings, source))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

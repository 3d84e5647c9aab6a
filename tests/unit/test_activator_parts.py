"""The activator's pure parts: which model a Host names, which headers travel, which pods
are ready and where they listen, round robin, its settings and each engine's hold; then
the proxy itself on loopback (real uvicorn listeners, a pod played by a small SSE server,
the Kubernetes lookups by a stand-in): answers relayed as they come, clients that leave,
and the per-engine hold deadline."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
import types
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from support import wait_for

from modelyard.activator import discovery
from modelyard.activator.discovery import Discovery, Lookup, engine_of
from modelyard.activator.metrics import Metrics
from modelyard.activator.proxy import Activator
from modelyard.activator.routing import (
    Endpoint,
    ModelRef,
    choose,
    forward_headers,
    parse_host,
    ready_endpoints,
)
from modelyard.activator.settings import Settings, parse_settings


@pytest.mark.parametrize("host", [
    "resnet.vision", "resnet.vision.svc", "resnet.vision.svc.cluster.local",
    "resnet.vision:80", "resnet.vision.svc:8080", "resnet.vision.svc.cluster.local:80",
    "ResNet.Vision.SVC", "resnet.vision.svc.cluster.local.",
])
def test_service_names_name_their_model(host: str) -> None:
    assert parse_host(host) == ModelRef(namespace="vision", name="resnet")


@pytest.mark.parametrize("host", [
    None, "", "resnet", "localhost:8080", "10.200.0.7:8080", "10.200.0.7", "10.96",
    "[::1]:8080", "resnet.vision.svc.example.com", "resnet.vision.cluster.local",
    "resnet.vision.pod", "a.b.c", "resnet.vision:http", "-bad.vision", "res_net.vision",
    "resnet..svc", f"{'x' * 64}.vision",
])
def test_other_hosts_name_nothing(host: str | None) -> None:
    assert parse_host(host) is None


def test_another_cluster_domain() -> None:
    assert parse_host("m.ns.svc.corp.internal", "corp.internal") == ModelRef("ns", "m")
    assert parse_host("m.ns.svc.cluster.local", "corp.internal") is None


def test_hop_by_hop_headers_stay_behind() -> None:
    headers = [
        ("Host", "m.ns.svc"), ("Connection", "keep-alive, X-Session"), ("Keep-Alive", "5"),
        ("X-Session", "abc"), ("Transfer-Encoding", "chunked"), ("TE", "trailers"),
        ("Upgrade", "h2c"), ("Proxy-Authorization", "Basic x"), ("Content-Length", "12"),
        ("Content-Type", "application/json"), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"),
        ("Authorization", "Bearer t"),
    ]
    assert forward_headers(headers, drop=("content-length",)) == [
        ("Host", "m.ns.svc"), ("Content-Type", "application/json"), ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"), ("Authorization", "Bearer t"),
    ]
    assert ("Content-Length", "12") in forward_headers(headers)


def _pod(ip: str | None, ready: bool = True, deleting: bool = False,
         ports: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    pod: dict[str, Any] = {
        "metadata": {"name": f"pod-{ip}"},
        "spec": {"containers": [{"name": "runtime", "ports": ports if ports is not None
                                 else [{"name": "http", "containerPort": 8080}]}]},
        "status": {"phase": "Running",
                   "conditions": [{"type": "PodScheduled", "status": "True"},
                                  {"type": "Ready", "status": "True" if ready else "False"}]},
    }
    if ip:
        pod["status"]["podIP"] = ip
    if deleting:
        pod["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return pod


def test_only_ready_live_pods_with_an_address_are_endpoints() -> None:
    pods = [
        _pod("10.0.0.3"),
        _pod("10.0.0.1", ports=[{"name": "metrics", "containerPort": 9090},
                                {"name": "http", "containerPort": 9000}]),
        _pod("10.0.0.2", ready=False),  # still loading its model
        _pod("10.0.0.4", deleting=True),  # terminating: draining, no new work
        _pod(None),  # not yet given an address
        _pod("10.0.0.5", ports=[]),  # no port named http: the runtime's default
        {"metadata": {"name": "pending"}, "spec": {"containers": []}, "status": {}},
    ]
    assert ready_endpoints(pods) == [
        Endpoint("10.0.0.1", 9000), Endpoint("10.0.0.3", 8080), Endpoint("10.0.0.5", 8080),
    ]


def test_endpoint_urls() -> None:
    assert Endpoint("10.0.0.1", 8080).url == "http://10.0.0.1:8080"
    assert Endpoint("fd00::1", 8080).url == "http://[fd00::1]:8080"


def test_round_robin_skips_pods_that_refused() -> None:
    pods = [Endpoint("10.0.0.1", 8080), Endpoint("10.0.0.2", 8080), Endpoint("10.0.0.3", 8080)]
    assert [choose(pods, turn) for turn in range(4)] == [pods[0], pods[1], pods[2], pods[0]]
    assert {choose(pods, turn, exclude={pods[1]}) for turn in range(4)} == {pods[0], pods[2]}
    assert choose(pods, 7, exclude=pods) is None
    assert choose([], 0) is None


def test_settings_flags_win_over_environment() -> None:
    environ = {"MODELYARD_ACTIVATOR_TIMEOUT_SECONDS": "30", "MODELYARD_ACTIVATOR_PORT": "8081",
               "MODELYARD_ACTIVATOR_CHECK_MODEL_DEPLOYMENT": "false"}
    settings = parse_settings(["--timeout-seconds", "3", "--max-body-bytes", "1024"], environ)
    assert settings == Settings(port=8081, timeout_seconds=3.0, max_body_bytes=1024,
                                check_model_deployment=False)
    assert parse_settings([], {}) == Settings()
    assert parse_settings(["--generative-timeout-seconds", "1800"], {}) == Settings(
        generative_timeout_seconds=1800.0)


def test_a_generative_engine_is_held_longer() -> None:
    settings = Settings(timeout_seconds=120, generative_timeout_seconds=600)
    assert settings.hold_seconds("vllm") == 600
    assert settings.hold_seconds("modelyard") == 120
    assert settings.hold_seconds(None) == 120  # the ModelDeployment not read (yet)
    assert Settings().hold_seconds("vllm") > Settings().hold_seconds("modelyard")


def test_the_engine_is_read_from_the_model_deployment() -> None:
    assert engine_of({"spec": {"runtime": {"engine": "vllm"}}}) == "vllm"
    assert engine_of({"spec": {"model": {}}}) == "modelyard"  # the API's default
    assert engine_of({"spec": {"runtime": {"engine": None}}}) == "modelyard"
    assert engine_of({}) == "modelyard"


@pytest.mark.parametrize("argv", [["--timeout-seconds", "soon"], ["--timeout-seconds", "0"],
                                  ["--generative-timeout-seconds", "-1"],
                                  ["--check-model-deployment", "maybe"]])
def test_bad_settings_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        parse_settings(argv, {})


class _GatedPods:
    """Lookups that finish only when the test lets them: one ready pod each time."""

    def __init__(self) -> None:
        self.calls = 0
        self.release = asyncio.Event()

    async def lookup(self, ref: ModelRef) -> Lookup:
        self.calls += 1
        await self.release.wait()
        self.release.clear()
        return Lookup([Endpoint("10.0.0.1", 8080)])


def test_a_busy_model_s_requests_never_wait_on_a_lookup(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Past --cache-seconds the list serves while one lookup refreshes it behind the
    requests; past 3 x that (nobody asked), requests wait for a lookup again."""
    now = [1000.0]
    # Discovery's clock only (the event loop keeps its own).
    monkeypatch.setattr(discovery, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    ref = ModelRef("ns", "chat")

    async def play() -> None:
        pods = _GatedPods()
        found = Discovery(pods, Metrics(), poll_s=0.0, cache_s=1.0)
        first = asyncio.create_task(found.endpoints(ref, since=now[0]))
        await asyncio.sleep(0)
        assert found.fresh(ref) is None  # nothing known: the request waits
        assert not first.done()
        pods.release.set()
        assert (await first)[0] == [Endpoint("10.0.0.1", 8080)]
        assert pods.calls == 1

        now[0] += 0.5  # trusted: no lookup at all
        assert found.fresh(ref) == [Endpoint("10.0.0.1", 8080)]
        await asyncio.sleep(0)
        assert pods.calls == 1

        now[0] += 1.5  # stale: answered at once while a single lookup runs behind it
        for _ in range(5):
            assert found.fresh(ref) == [Endpoint("10.0.0.1", 8080)]
            await asyncio.sleep(0)
        assert pods.calls == 2
        pods.release.set()
        await asyncio.sleep(0.01)  # the lookup stamps the list again
        now[0] += 0.5
        assert found.fresh(ref) is not None
        await asyncio.sleep(0)
        assert pods.calls == 2  # the refreshed list is trusted again

        now[0] += 3.5  # idle past 3 x cache_s: not trusted, the request looks up first
        assert found.fresh(ref) is None
        await found.close()

    asyncio.run(play())


# ------------------------------------------------------------------ the proxy, on loopback


class _Served:
    """An ASGI app on a loopback port, served by uvicorn in a thread of its own; ``close``
    runs in its loop once uvicorn has stopped (the activator's client to the pods)."""

    def __init__(self, app: Any, close: Callable[[], Awaitable[None]] | None = None) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(
            app, log_level="warning", lifespan="off", access_log=False,
            timeout_graceful_shutdown=1))
        self.close = close
        self.thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)

    async def _serve(self) -> None:
        try:
            await self.server.serve(sockets=[self.sock])
        finally:
            if self.close is not None:
                await self.close()

    def __enter__(self) -> _Served:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


class _Pod:
    """A generative model's pod, as far as the proxy can tell: ``/v1/completions``
    streams ``n`` server-sent events like vLLM, and before each next one waits until the
    client says it has the previous (so a proxy that gathers the answer stalls it)."""

    def __init__(self) -> None:
        self.acks: list[threading.Event] = [threading.Event() for _ in range(64)]
        self.sent = 0
        self.closed = threading.Event()  # the stream ended before its last event
        self.app = Starlette(routes=[Route("/v1/completions", self._complete,
                                           methods=["POST"])])
        self.abandoned = threading.Event()  # a non-streamed answer's client left

    async def _complete(self, request: Request) -> Response:
        body = await request.json()
        if not body.get("stream"):  # a long non-streamed completion: watch its client
            for _ in range(1000):
                if await request.is_disconnected():
                    self.abandoned.set()
                    return Response(status_code=499)
                await asyncio.sleep(0.01)
            return Response(b'{"choices": []}', media_type="application/json")
        n = int(body["max_tokens"])
        return StreamingResponse(self._events(n), media_type="text/event-stream")

    async def _events(self, n: int) -> AsyncIterator[bytes]:
        finished = False
        try:
            for i in range(n):
                if i and not await _acknowledged(self.acks[i - 1], 10):
                    yield b'data: {"error": "the previous event never reached the client"}\n\n'
                    return
                self.sent = i + 1
                chunk = {"choices": [{"index": 0, "text": f" t{i}", "finish_reason": None}]}
                yield f"data: {json.dumps(chunk)}\n\n".encode()
            yield b"data: [DONE]\n\n"
            finished = True
        finally:
            if not finished:
                self.closed.set()


async def _acknowledged(ack: threading.Event, timeout_s: float) -> bool:
    """``ack.wait(timeout_s)`` without a thread (the server's loop must not block, and a
    thread left waiting would hold up its shutdown)."""
    for _ in range(int(timeout_s / 0.002)):
        if ack.is_set():
            return True
        await asyncio.sleep(0.002)
    return ack.is_set()


class _Pods:
    """The Kubernetes lookups, played: a model's ready pods and its engine, as set."""

    def __init__(self, engine: str = "vllm") -> None:
        self.ready: list[Endpoint] = []
        self.engine = engine

    async def lookup(self, ref: ModelRef) -> Lookup:
        return Lookup(list(self.ready), engine=None if self.ready else self.engine)


HOST = {"Host": "chat.ns.svc"}


@contextlib.contextmanager
def _proxy(pods: _Pods, **settings: Any) -> Iterator[tuple[Activator, str]]:
    activator = Activator(Settings(poll_seconds=0.05, cache_seconds=0.2, **settings), pods)
    with _Served(activator, close=activator.aclose) as served:
        yield activator, served.url


@pytest.fixture
def pod() -> Iterator[tuple[_Pod, Endpoint]]:
    fake = _Pod()
    with _Served(fake.app) as served:
        yield fake, Endpoint("127.0.0.1", served.port)


def _count(activator: Activator, name: str, **labels: str) -> float:
    value = activator.metrics.registry.get_sample_value(
        name, {"namespace": "ns", "model_deployment": "chat", **labels})
    return value or 0.0


def _stream(url: str, n: int, *, stop_after: int | None = None,
            pod: _Pod | None = None) -> tuple[httpx.Headers, list[str]]:
    """Stream a completion; acknowledge each event to ``pod``; stop after ``stop_after``."""
    events: list[str] = []
    with httpx.stream("POST", f"{url}/v1/completions", headers=HOST, timeout=30,
                      json={"model": "chat", "prompt": "Hi", "max_tokens": n,
                            "stream": True}) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            events.append(line.removeprefix("data: "))
            if pod is not None and len(events) <= len(pod.acks):
                pod.acks[len(events) - 1].set()
            if stop_after is not None and len(events) == stop_after:
                break
        return response.headers, events


def test_a_streamed_answer_passes_event_by_event(pod: tuple[_Pod, Endpoint]) -> None:
    fake, endpoint = pod
    pods = _Pods()
    pods.ready = [endpoint]
    with _proxy(pods) as (_, url):
        headers, events = _stream(url, 12, pod=fake)
    # Each event reached the client before the pod sent the next: nothing gathered it.
    assert len(events) == 13, events
    assert events[-1] == "[DONE]"
    assert all("never reached" not in e for e in events), events
    assert [json.loads(e)["choices"][0]["text"] for e in events[:-1]] == [
        f" t{i}" for i in range(12)]
    assert headers["content-type"] == "text/event-stream; charset=utf-8"
    assert "content-length" not in headers


def test_a_client_that_leaves_mid_stream_ends_the_pods_request(
        pod: tuple[_Pod, Endpoint]) -> None:
    fake, endpoint = pod
    pods = _Pods()
    pods.ready = [endpoint]
    with _proxy(pods) as (_, url):
        _, events = _stream(url, 40, stop_after=3, pod=fake)
        assert len(events) == 3
        assert fake.closed.wait(10), "the pod's stream went on after its client left"
    assert fake.sent < 40


def test_a_request_held_at_zero_is_answered_streaming_once_a_pod_is_ready(
        pod: tuple[_Pod, Endpoint]) -> None:
    fake, endpoint = pod
    pods = _Pods(engine="vllm")
    with _proxy(pods, timeout_seconds=0.2, generative_timeout_seconds=30) as (activator, url):
        answer: dict[str, Any] = {}
        thread = threading.Thread(target=lambda: answer.update(
            result=_stream(url, 5, pod=fake)), daemon=True)
        thread.start()
        deadline = time.monotonic() + 10
        while _count(activator, "modelyard_activator_waiting_requests") != 1:
            assert time.monotonic() < deadline, "the request was not held"
            time.sleep(0.02)
        time.sleep(0.5)  # past a tensor model's hold (0.2 s): a generative one waits on
        assert thread.is_alive()
        pods.ready = [endpoint]
        thread.join(20)
        _, events = answer["result"]
    assert len(events) == 6
    assert _count(activator, "modelyard_activator_held_requests_total") == 1


@pytest.mark.parametrize(("engine", "hold_s"), [("modelyard", 0.3), ("vllm", 1.2)])
def test_the_hold_deadline_is_the_engines_and_its_503_says_so(engine: str,
                                                              hold_s: float) -> None:
    pods = _Pods(engine=engine)
    with _proxy(pods, timeout_seconds=0.3, generative_timeout_seconds=1.2) as (activator, url):
        started = time.monotonic()
        response = httpx.post(f"{url}/v1/completions", headers=HOST, timeout=30,
                              json={"model": "chat", "prompt": "Hi"})
        waited = time.monotonic() - started
    assert response.status_code == 503
    assert response.json() == {"error": f"model ns/chat has no ready replica after {hold_s:g} s"}
    assert response.headers["content-type"] == "application/json"
    assert int(response.headers["Retry-After"]) > 0
    assert hold_s <= waited < hold_s + 5
    assert _count(activator, "modelyard_activator_requests_total", outcome="timeout") == 1


def test_a_client_that_leaves_while_held_is_no_longer_held() -> None:
    pods = _Pods(engine="vllm")
    with _proxy(pods, generative_timeout_seconds=60) as (activator, url):
        # A raw connection, closed only once the activator holds the request: a client
        # timeout could fire before the request was even read on a busy machine.
        address = httpx.URL(url)
        body = json.dumps({"model": "chat", "prompt": "Hi"}).encode()
        client = socket.create_connection((address.host, address.port))
        client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: " + HOST["Host"].encode()
                       + b"\r\nContent-Type: application/json\r\nContent-Length: "
                       + str(len(body)).encode() + b"\r\n\r\n" + body)
        wait_for(lambda: _count(activator, "modelyard_activator_waiting_requests") == 1,
                 timeout=30, what="the request held")
        client.close()
        wait_for(lambda: _count(activator, "modelyard_activator_requests_total",
                                outcome="abandoned") == 1,
                 timeout=30, what="the request let go after its client left")
        assert _count(activator, "modelyard_activator_waiting_requests") == 0


def test_a_client_that_leaves_before_the_pods_answer_ends_the_pods_request(
        pod: tuple[_Pod, Endpoint]) -> None:
    fake, endpoint = pod
    pods = _Pods()
    pods.ready = [endpoint]
    with _proxy(pods) as (activator, url):
        with pytest.raises(httpx.ReadTimeout):  # a non-streamed completion: no headers yet
            httpx.post(f"{url}/v1/completions", headers=HOST, timeout=httpx.Timeout(
                30, read=0.5), json={"model": "chat", "prompt": "Hi", "max_tokens": 400})
        assert fake.abandoned.wait(10), "the pod went on working for a client that left"
        assert _count(activator, "modelyard_activator_requests_total",
                      outcome="abandoned") == 1

"""Closed-loop load of streamed completions against an OpenAI-compatible server (vLLM, or
anything in front of it), run as its own process by ``bench/llm_cluster.py``.

    python -m bench.llm_load CONFIG_JSON

CONFIG_JSON: ``{"url": "http://IP:PORT/v1/completions", "host": "Host header",
"model": ..., "prompt": ..., "max_tokens": 64, "concurrency": 8, "warmup_s": 2,
"duration_s": 8}``. Each of ``concurrency`` keep-alive connections sends the same
streamed completion (``temperature 0``, ``ignore_eos``), reads every server-sent event as
it arrives and sends again; in-flight requests are cut when the window ends (the server
aborts them). A minimal client on raw asyncio streams (uvloop when present), as
``bench/loadgen.py``, so that the client costs as little of the shared cores as it can.

Tokens are counted from the usage vLLM puts in every event (``stream_options``
``continuous_usage_stats``): an engine that falls behind merges several tokens into one
event, so events are not tokens. Prints one JSON line. ``tokens``: tokens whose events
arrived inside the measured window (throughput counts arrivals, not whole requests, so
long requests at the window's edges count for what arrived inside it). ``ttft_ms``: for
each request sent inside the window, request written -> its first token read (those
still waiting at the end are ``ttft_censored``). ``tpot_ms``: for each request sent and
finished inside the window, (last token - first token) / (tokens - 1), the time per
output token after the first. ``tokens_per_event`` and ``events_per_read`` (token events
per socket read that carried any): 1.0 when each token reached the client on its own.
"""

from __future__ import annotations

import asyncio
import sys
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

import orjson


@dataclass
class Window:
    start: float  # measured from here (after the warm-up)
    end: float
    tokens: int = 0
    tokens_all: int = 0  # warm-up and cut requests included
    events: int = 0
    ttft: list[float] = field(default_factory=list)
    tpot: list[float] = field(default_factory=list)
    sent: int = 0
    completed: int = 0
    censored: int = 0
    errors: int = 0
    first_error: str = ""
    reads: int = 0
    read_events: int = 0

    def inside(self, t: float) -> bool:
        return self.start <= t <= self.end

    def error(self, message: str) -> None:
        self.errors += 1
        self.first_error = self.first_error or message


class _Stream:
    """One keep-alive HTTP/1.1 connection that streams a chunked (or sized) answer."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> asyncio.StreamReader:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        return self.reader

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def _body(reader: asyncio.StreamReader, headers: dict[str, str]) -> Any:
    """The answer's body, one piece per chunk (or per read) as it arrives."""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return
            data = await reader.readexactly(size)
            await reader.readexactly(2)
            yield data
    elif "content-length" in headers:
        yield await reader.readexactly(int(headers["content-length"]))
    else:
        while data := await reader.read(65536):
            yield data


@dataclass
class _Answer:
    """The token events of one streamed answer, as they arrive."""

    sent: float
    counted: bool  # sent inside the window
    first: float | None = None
    last: float = 0.0
    seen: int = 0  # tokens so far
    pending: bytes = b""

    def feed(self, data: bytes, now: float, window: Window) -> None:
        self.pending += data
        events = 0
        while b"\n\n" in self.pending:
            event, self.pending = self.pending.split(b"\n\n", 1)
            if not event.startswith(b"data: ") or event == b"data: [DONE]":
                continue
            answer = orjson.loads(event[6:])
            if not answer.get("choices"):
                continue  # the closing usage-only event
            total = (answer.get("usage") or {}).get("completion_tokens")
            new = total - self.seen if isinstance(total, int) else 1
            if new <= 0:
                continue
            self.seen += new
            window.tokens_all += new
            events += 1
            if window.inside(now):
                window.tokens += new
                window.events += 1
            if self.first is None:
                self.first = now
                if self.counted and window.inside(now):
                    window.ttft.append(now - self.sent)
            self.last = now
        if events:
            window.reads += 1
            window.read_events += events

    def done(self, window: Window) -> None:
        if self.first is None:
            if self.counted:
                window.error("an answer with no token")
            return
        if self.counted and window.inside(self.last):
            window.completed += 1
            if self.seen > 1:
                window.tpot.append((self.last - self.first) / (self.seen - 1))


async def _one(stream: _Stream, payload: bytes, window: Window) -> bool:
    """One streamed completion; False when the connection must not be reused."""
    reader = await stream.open()
    assert stream.writer is not None
    sent = time.perf_counter()
    stream.writer.write(payload)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in
               (line.partition(":") for line in lines[1:] if ":" in line)}
    answer = _Answer(sent, window.inside(sent))
    window.sent += answer.counted
    errors = b""
    async for data in _body(reader, headers):
        if status == 200:
            answer.feed(data, time.perf_counter(), window)
        else:
            errors += data
    if status != 200:
        if answer.counted:
            window.error(f"HTTP {status}: {errors[:300]!r}")
    else:
        answer.done(window)
    return headers.get("connection", "").lower() != "close"


async def _worker(target: tuple[str, int], payload: bytes, window: Window) -> None:
    stream = _Stream(*target)
    try:
        while time.perf_counter() < window.end:
            try:
                if not await _one(stream, payload, window):
                    stream.close()
            except (OSError, asyncio.IncompleteReadError, ValueError) as error:
                stream.close()
                if window.inside(time.perf_counter()):
                    window.error(f"{type(error).__name__}: {error}")
                await asyncio.sleep(0.05)
    finally:
        stream.close()


async def run(config: dict[str, Any]) -> dict[str, Any]:
    url = urllib.parse.urlsplit(config["url"])
    host, port = url.hostname or "127.0.0.1", url.port or 80
    body = orjson.dumps({"model": config["model"], "prompt": config["prompt"],
                         "max_tokens": config["max_tokens"], "temperature": 0,
                         "ignore_eos": True, "stream": True,
                         "stream_options": {"include_usage": True,
                                            "continuous_usage_stats": True}})
    head = [f"POST {url.path} HTTP/1.1", f"Host: {config.get('host') or url.netloc}",
            "Content-Type: application/json", f"Content-Length: {len(body)}",
            "Accept: text/event-stream", "Connection: keep-alive"]
    payload = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
    now = time.perf_counter()
    window = Window(now + config["warmup_s"], now + config["warmup_s"] + config["duration_s"])
    tasks = [asyncio.create_task(_worker((host, port), payload, window))
             for _ in range(config["concurrency"])]
    await asyncio.sleep(max(0.0, window.end - time.perf_counter()))
    for task in tasks:  # cut what is in flight: the server aborts those requests
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    window.censored = max(0, window.sent - len(window.ttft) - window.errors)
    seconds = window.end - window.start
    return {
        "concurrency": config["concurrency"], "duration_s": seconds,
        "tokens": window.tokens, "tokens_per_s": window.tokens / seconds,
        "tokens_all": window.tokens_all,
        "sent": window.sent, "completed": window.completed,
        "ttft_censored": window.censored, "errors": window.errors,
        "first_error": window.first_error,
        "ttft_ms": [round(v * 1000, 3) for v in window.ttft],
        "tpot_ms": [round(v * 1000, 3) for v in window.tpot],
        "tokens_per_event": window.tokens / window.events if window.events else None,
        "events_per_read": window.read_events / window.reads if window.reads else None,
    }


def main() -> None:
    config = orjson.loads(sys.argv[1])
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    print(orjson.dumps(asyncio.run(run(config))).decode(), flush=True)


if __name__ == "__main__":
    main()

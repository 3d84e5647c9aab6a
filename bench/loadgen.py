"""Closed-loop HTTP/1.1 load generator (run pinned to its own core by ``bench/runtime.py``).

    python -m bench.loadgen URL BODY_FILE CONCURRENCY WARMUP_S DURATION_S [HEADER=VALUE ...]

Each of CONCURRENCY keep-alive connections sends the same pre-built request,
reads the whole answer, sends again. A minimal client on raw asyncio streams
(uvloop when present), so that the client core is never the bottleneck (httpx
tops out near 300 requests/s at concurrency 32 on one core). Requests finishing
during the warm-up are not counted. Prints one JSON line: requests, errors,
items/s, p50/p99 latency in ms, the first error.
"""

from __future__ import annotations

import asyncio
import sys
import time
import urllib.parse

import orjson


class _Connection:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, payload: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(payload)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                key, value = line.split(":", 1)
                headers[key.strip().lower()] = value.strip()
        if "content-length" in headers:
            body = await self.reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await self.reader.readuntil(b"\r\n")
                    break
                parts.append(await self.reader.readexactly(size))
                await self.reader.readexactly(2)
            body = b"".join(parts)
        else:
            body = await self.reader.read()
            self.close()
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, body

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def _run(  # noqa: PLR0917
    url: str, body: bytes, concurrency: int, warmup: float, duration: float, headers: dict[str, str]
) -> dict[str, object]:
    parsed = urllib.parse.urlsplit(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 80
    head = [
        f"POST {parsed.path} HTTP/1.1",
        f"Host: {host}:{port}",
        f"Content-Length: {len(body)}",
        "Connection: keep-alive",
    ]
    head += [f"{k}: {v}" for k, v in headers.items()]
    payload = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
    latencies: list[float] = []
    errors = 0
    first_error = ""
    start = time.perf_counter()
    measure_from = start + warmup
    stop_at = measure_from + duration

    async def worker() -> None:
        nonlocal errors, first_error
        connection = _Connection(host, port)
        while True:
            sent = time.perf_counter()
            if sent >= stop_at:
                connection.close()
                return
            try:
                status, answer = await connection.request(payload)
                ok = status == 200
                if not ok and not first_error:
                    first_error = f"HTTP {status}: {answer[:200]!r}"
            except (OSError, asyncio.IncompleteReadError, ValueError) as error:
                connection.close()
                ok = False
                if not first_error:
                    first_error = f"{type(error).__name__}: {error}"
            done = time.perf_counter()
            if sent >= measure_from and done <= stop_at:
                if ok:
                    latencies.append(done - sent)
                else:
                    errors += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    latencies.sort()

    def pct(q: float) -> float:
        if not latencies:
            return float("nan")
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000

    return {
        "requests": len(latencies),
        "errors": errors,
        "items_per_s": len(latencies) / duration,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "first_error": first_error,
    }


def main() -> None:
    url, body_file, concurrency, warmup, duration, *pairs = sys.argv[1:]
    headers = dict(pair.split("=", 1) for pair in pairs)
    with open(body_file, "rb") as file:
        body = file.read()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    result = asyncio.run(_run(url, body, int(concurrency), float(warmup), float(duration), headers))
    print(orjson.dumps(result).decode(), flush=True)


if __name__ == "__main__":
    main()

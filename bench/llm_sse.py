"""A synthetic streaming-completion server: the activator's own cost, without an engine.

    python -m bench.llm_sse HOST PORT [FIRST_MS [INTERVAL_MS]]

Answers every ``POST`` with a server-sent event stream shaped like vLLM's
``/v1/completions`` (``stream: true``, continuous usage): the first token after
``FIRST_MS`` (default 20), then one token every ``INTERVAL_MS`` (default 10), up to the
request's ``max_tokens``, then ``data: [DONE]``; one HTTP chunk per event, keep-alive.
Its limits are exact (TTFT = FIRST_MS, tokens/s = concurrency x max_tokens / (FIRST_MS +
(max_tokens - 1) x INTERVAL_MS)), and it costs little CPU (raw asyncio, uvloop when
present), so what a proxy in front of it adds is the proxy's. ``bench/llm_cluster.py``
runs it on a pod address of the local cluster, behind the real activator.
"""

from __future__ import annotations

import asyncio
import sys

import orjson

_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
         b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n")


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _event(index: int, count: int) -> bytes:
    return b"data: " + orjson.dumps({
        "id": "cmpl-synthetic", "object": "text_completion", "model": "synthetic",
        "choices": [{"index": 0, "text": " tok",
                     "finish_reason": "length" if index == count - 1 else None}],
        "usage": {"prompt_tokens": 16, "completion_tokens": index + 1,
                  "total_tokens": 17 + index}}) + b"\n\n"


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 first_s: float, interval_s: float) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            body = orjson.loads(await reader.readexactly(length)) if length else {}
            count = max(1, int(body.get("max_tokens") or 16))
            writer.write(_HEAD)
            await asyncio.sleep(first_s)
            for index in range(count):
                writer.write(_chunk(_event(index, count)))
                await writer.drain()
                if index < count - 1:
                    await asyncio.sleep(interval_s)
            writer.write(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, ValueError, RuntimeError):
        pass  # the client went away (uvloop says so with a RuntimeError on write)
    finally:
        writer.close()


async def main(host: str, port: int, first_ms: float, interval_ms: float) -> None:
    server = await asyncio.start_server(
        lambda r, w: _serve(r, w, first_ms / 1000, interval_ms / 1000), host, port,
        backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    args = sys.argv[1:]
    asyncio.run(main(args[0], int(args[1]), float(args[2]) if len(args) > 2 else 20.0,
                     float(args[3]) if len(args) > 3 else 10.0))

"""``modelyard chat NAME``: a conversation with a generative model, in the terminal.

:func:`.usercli.chat` finds the model (its ModelDeployment: the served name, the URL, that
its engine is a generative one) and hands over here. Each line read is one user turn: the
whole conversation so far goes to the OpenAI-compatible ``/v1/chat/completions`` with
``"stream": true``, and the reply is printed token by token as its server-sent events
arrive, then kept in the history for the next turn. End of input (Ctrl-D) ends the
conversation; Ctrl-C during a reply stops that reply (the connection closes, so the engine
stops generating) and keeps what arrived; Ctrl-C at the prompt ends it too.

A request to a model at zero replicas goes through the activator, which holds it while
the model wakes (minutes for a big generative model): the read timeout is longer than the
activator's hold for generative models.

Only :mod:`httpx`; the transport is a parameter of the client the caller builds, so tests
can play the server (``httpx.MockTransport``) or use a real one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any, TextIO

import httpx

__all__ = ["ChatError", "Options", "converse", "parse_event", "stream_reply"]

# Longer than the activator's default hold for a generative model (600 s): a model at zero
# answers the first message only once it has woken.
READ_TIMEOUT_S = 900.0


class ChatError(Exception):
    """One turn failed: the server refused it, or its stream broke."""


class Unreachable(ChatError):
    """Nothing answers at the URL: no turn can succeed."""


@dataclass(frozen=True)
class Options:
    model: str  # the served model name
    system: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    params: dict[str, Any] = field(default_factory=dict)  # further request fields


_DONE = object()


def parse_event(line: str) -> str | object | None:
    """The text one server-sent event line carries: the delta's content, :data:`_DONE` at
    the end of the stream, or None (a comment, a role header, the usage). An error event
    raises :class:`ChatError` with the server's message."""
    if not line.startswith("data:"):
        return None
    data = line.removeprefix("data:").strip()
    if data == "[DONE]":
        return _DONE
    try:
        event = json.loads(data)
    except ValueError:
        raise ChatError(f"the server sent an event that is not JSON: {data[:200]!r}") from None
    if not isinstance(event, dict):
        return None
    if "error" in event or event.get("object") == "error":
        raise ChatError(_message(event))
    choices = event.get("choices") or []
    if not choices:
        return None
    content = (choices[0].get("delta") or {}).get("content")
    return content if isinstance(content, str) and content else None


def stream_reply(client: httpx.Client, options: Options,
                 messages: list[dict[str, str]]) -> Generator[str, None, None]:
    """The reply to ``messages``, piece by piece as the server streams it."""
    body: dict[str, Any] = {"model": options.model, "messages": messages, "stream": True}
    if options.max_tokens is not None:
        body["max_tokens"] = options.max_tokens
    if options.temperature is not None:
        body["temperature"] = options.temperature
    body.update(options.params)
    try:
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                response.read()
                raise ChatError(_refusal(response))
            for line in response.iter_lines():
                piece = parse_event(line)
                if piece is _DONE:
                    return
                if isinstance(piece, str):
                    yield piece
    except (httpx.ConnectError, httpx.ConnectTimeout) as error:
        raise Unreachable(f"cannot reach {client.base_url}: {error}") from None
    except httpx.HTTPError as error:
        raise ChatError(f"{type(error).__name__}: {error}") from None


def converse(client: httpx.Client, options: Options, read_line: Callable[[], str],
             out: TextIO, err: TextIO, *, before_first: str | None = None) -> int:
    """Turns until end of input: ``read_line`` returns a line or raises EOFError (or
    KeyboardInterrupt). Returns 0, or 1 when a turn failed."""
    messages: list[dict[str, str]] = []
    if options.system:
        messages.append({"role": "system", "content": options.system})
    failed = False
    while True:
        try:
            line = read_line()
        except (EOFError, KeyboardInterrupt):
            return 1 if failed else 0
        text = line.strip()
        if not text:
            continue
        if before_first:
            print(before_first, file=err, flush=True)
            before_first = None
        messages.append({"role": "user", "content": text})
        pieces: list[str] = []
        reply = stream_reply(client, options, messages)
        try:
            for piece in reply:
                pieces.append(piece)
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            reply.close()  # closes the connection: the engine stops this reply
            print(" [stopped]", file=out, flush=True)
        except Unreachable:
            raise
        except ChatError as error:
            if pieces:  # the stream broke midway: end its line
                print(file=out, flush=True)
            print(f"modelyard: {error}", file=err, flush=True)
            messages.pop()  # the turn did not happen: the next one starts from before it
            failed = True
            continue
        else:
            print(file=out, flush=True)
        messages.append({"role": "assistant", "content": "".join(pieces)})


def _refusal(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        body = None
    message = _message(body) if isinstance(body, dict) else response.text[:500].strip()
    text = f"{response.status_code}: {message or response.reason_phrase}"
    if retry := response.headers.get("retry-after"):
        text += f" (try again in {retry} s)"
    return text


def _message(body: dict[str, Any]) -> str:
    """The message of an OpenAI-style error (``{"error": {"message": ...}}``), of vLLM's
    older form (``{"object": "error", "message": ...}``) or of the activator's
    (``{"error": "..."}``)."""
    error = body.get("error")
    if isinstance(error, dict):
        return str(error.get("message") or error)
    if isinstance(error, str):
        return error
    return str(body.get("message") or body)

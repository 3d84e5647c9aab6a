"""``modelyard chat``: the conversation against a played OpenAI-compatible server
(``httpx.MockTransport``), and how the command finds and refuses models. The same command
against real vLLM, through the activator, is in tests/cluster/test_llm.py."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from modelyard.operator import cli, usercli
from modelyard.operator.chat import ChatError, Options, converse, parse_event


def _lines(*lines: str) -> Callable[[], str]:
    pending: Iterator[str] = iter(lines)

    def read() -> str:
        try:
            return next(pending)
        except StopIteration:
            raise EOFError from None

    return read


def _sse(*pieces: str) -> bytes:
    events = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}]
    events += [{"choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]}
               for p in pieces]
    events.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
    return b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in events) + \
        b"data: [DONE]\n\n"


class _Server:
    """Answers each chat completion with the next reply; keeps the requests."""

    def __init__(self, *replies: httpx.Response) -> None:
        self.replies = list(replies)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.replies.pop(0)

    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(r.content) for r in self.requests]


def _stream(*pieces: str) -> httpx.Response:
    return httpx.Response(200, content=_sse(*pieces),
                          headers={"content-type": "text/event-stream"})


def _run(server: _Server, *lines: str, **options: Any) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with httpx.Client(base_url="http://chat.ns.svc.cluster.local",
                      transport=httpx.MockTransport(server)) as client:
        code = converse(client, Options(model="chat", **options), _lines(*lines), out, err)
    return code, out.getvalue(), err.getvalue()


def test_parse_event() -> None:
    assert parse_event('data: {"choices": [{"delta": {"content": "Hi"}}]}') == "Hi"
    assert parse_event('data: {"choices": [{"delta": {"role": "assistant"}}]}') is None
    assert parse_event('data: {"choices": [], "usage": {"total_tokens": 3}}') is None
    assert parse_event(": keep-alive") is None
    assert parse_event("") is None
    assert parse_event("data: [DONE]") not in (None, "")
    with pytest.raises(ChatError, match="out of KV cache"):
        parse_event('data: {"error": {"message": "out of KV cache", "code": 500}}')
    with pytest.raises(ChatError, match="not JSON"):
        parse_event("data: {oops")


def test_turns_stream_and_keep_the_conversation() -> None:
    server = _Server(_stream("Hel", "lo", "!"), _stream(" Fine", "."))
    code, out, _ = _run(server, "Hi there\n", "\n", "How are you?\n", system="Be brief.",
                        max_tokens=8, temperature=0.0, params={"top_p": 0.5})
    assert code == 0
    assert out == "Hello!\n Fine.\n"
    first, second = server.bodies()  # the empty line was no turn
    assert first == {"model": "chat", "stream": True, "max_tokens": 8, "temperature": 0.0,
                     "top_p": 0.5, "messages": [
                         {"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "Hi there"}]}
    assert second["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "How are you?"}]
    assert all(r.url.path == "/v1/chat/completions" for r in server.requests)


def test_a_refused_turn_is_reported_and_left_out_of_the_history() -> None:
    held_too_long = httpx.Response(
        503, json={"error": "model ns/chat has no ready replica after 600 s"},
        headers={"Retry-After": "5"})
    bad = httpx.Response(400, json={"error": {"message": "max_tokens is too large",
                                              "type": "BadRequestError", "code": 400}})
    server = _Server(held_too_long, bad, _stream("ok"))
    code, out, err = _run(server, "one", "two", "three")
    assert code == 1  # a turn failed
    assert "503: model ns/chat has no ready replica after 600 s (try again in 5 s)" in err
    assert "400: max_tokens is too large" in err
    assert out == "ok\n"  # nothing printed for the refused turns
    assert server.bodies()[-1]["messages"] == [{"role": "user", "content": "three"}]


def test_the_api_key_travels_as_a_bearer_token(monkeypatch: pytest.MonkeyPatch) -> None:
    server = _Server(_stream("a"), _stream("b"))
    md = {"metadata": {"name": "chat"},
          "spec": {"model": {"name": "tiny"}, "runtime": {"engine": "vllm"}},
          "status": {"url": "http://chat.ns.svc.cluster.local", "readyReplicas": 1}}
    monkeypatch.setattr(usercli, "fetch", lambda name, namespace: md)
    monkeypatch.setenv("MODELYARD_API_KEY", "from-env")
    for api_key, expected in ((None, "Bearer from-env"), ("flag", "Bearer flag")):
        out, err = io.StringIO(), io.StringIO()
        assert usercli.chat("chat", "ns", api_key=api_key, read_line=_lines("hi"), out=out,
                            err=err, transport=httpx.MockTransport(server)) == 0
        assert server.requests[-1].headers["authorization"] == expected
        assert server.requests[-1].url == "http://chat.ns.svc.cluster.local/v1/chat/completions"
        assert json.loads(server.requests[-1].content)["model"] == "tiny"  # the served name


def test_a_model_at_zero_is_announced_and_url_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    server = _Server(_stream("a"))
    md = {"spec": {"runtime": {"engine": "vllm"}}, "status": {"readyReplicas": 0}}
    monkeypatch.setattr(usercli, "fetch", lambda name, namespace: md)
    monkeypatch.delenv("MODELYARD_API_KEY", raising=False)
    err = io.StringIO()
    assert usercli.chat("chat", "ns", url="http://127.0.0.1:8080/", read_line=_lines("hi"),
                        out=io.StringIO(), err=err, transport=httpx.MockTransport(server)) == 0
    assert "no ready replica now" in err.getvalue()
    assert str(server.requests[0].url) == "http://127.0.0.1:8080/v1/chat/completions"
    assert "authorization" not in server.requests[0].headers


def test_a_tensor_model_is_refused_with_what_to_use_instead(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    md = {"spec": {"model": {"version": "1"}},
          "status": {"url": "http://resnet.vision.svc.cluster.local"}}
    monkeypatch.setattr(usercli, "fetch", lambda name, namespace: md)
    assert cli.main(["chat", "resnet", "-n", "vision"]) == 1
    err = capsys.readouterr().err
    assert "serves a tensor model (runtime.engine modelyard), not a generative one" in err
    assert "Open Inference Protocol" in err


def test_an_unreachable_url_says_how_to_reach_it(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("Name or service not known", request=request)

    md = {"spec": {"runtime": {"engine": "vllm"}}, "status": {"readyReplicas": 1}}
    monkeypatch.setattr(usercli, "fetch", lambda name, namespace: md)
    with pytest.raises(usercli.CommandError, match="kubectl port-forward -n ns svc/chat"):
        usercli.chat("chat", "ns", read_line=_lines("hi"), out=io.StringIO(),
                     err=io.StringIO(), transport=httpx.MockTransport(refuse))


@pytest.mark.parametrize("param", ["top_p", "=1"])
def test_bad_params_are_refused(param: str) -> None:
    with pytest.raises(SystemExit):
        cli.main(["chat", "chat", "--param", param])

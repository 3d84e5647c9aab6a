"""A generative model behind the operator, one user's journey: real vLLM (CPU build) under
modelyard's launcher, as pods of a kwok GPU node (real processes on the pods' own IPs, see
``devcluster/pods.py``), serving tiny Llamas built here. The activator runs beside it as
its pods run it, with its defaults.

1. Version 1 is Ready only after vLLM answered a real completion; tokens stream through
   the stable Service's endpoints, an event each.
2. Version 2, whose directory does not match its digest, is rolled back with the
   launcher's reason in status and ledger; the stable version fails no request.
3. Version 3 answers the same but with 32 layers of width 512 instead of 2 of 128, so its
   time to first token is several times version 1's: rolled back by itself on its TTFT
   against the stable version's over the same window, both versions' figures in the
   ledger, the stable version failing no request.
4. Scaled to zero, the model's Service leads to the activator; a streamed chat sent there
   is held while vLLM starts (longer than a tensor model's hold), then streams every token.
5. Through the activator tokens stream as from vLLM directly; a client that leaves
   mid-stream makes vLLM stop; ``modelyard chat`` holds a conversation.

Three engine starts in all (versions 1 and 3, and 1 woken from zero); the tests run in
order and each starts from where the previous one left the model.

The requests of steps 4 and 5 ask for ``return_token_ids``, so every event names its
tokens: the tiny model's random tokens are often a part of a character, which vLLM holds
back from the event's text.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from llmsupport import CPU_ARGS, CPU_ENV, ENGINE_START_S, build_model, stream_completion
from prometheus_client.parser import text_string_to_metric_families
from support import (
    Kube,
    activator_service,
    as_operator,
    fresh_namespace,
    ready_endpoint_pods,
    wait_for,
)
from test_real_pods import real_cluster  # noqa: F401 - the module's own real cluster

from modelyard.operator.devcluster.ports import reserve_port

NAME = "chat"
MAX_TOKENS = 16
# About 170 tokens: long enough that the slow version's prefill is most of its time to first
# token, even when a busy machine adds its own delays to both versions' requests.
PROMPT = " ".join(["The quick brown fox jumps over the lazy dog. A canary goes first, and the "
                   "stable version keeps serving while it is judged. Tokens stream one at a "
                   "time. Hello, how are you today?"] * 4)
SLOW = ("--layers", "32", "--hidden", "512")


def manifest(version: str, sha256: str, *, rollout: dict[str, Any] | None = None,
             autoscaling: dict[str, Any] | None = None) -> str:
    spec: dict[str, Any] = {
        "model": {"version": version, "uri": f"file:///models/{NAME}/{version}/",
                  "format": "hf", "sha256": sha256},
        "runtime": {"engine": "vllm", "env": CPU_ENV,
                    "vllm": {"dtype": "float32", "maxModelLen": 512,
                             "extraArgs": list(CPU_ARGS)}},
        "resources": {"gpu": {"count": 1}},
        "replicas": 1,
        "rollout": rollout or {"strategy": "RollingUpdate"},
    }
    if autoscaling:
        spec["autoscaling"] = autoscaling
    return yaml.safe_dump({"apiVersion": "modelyard.dev/v1alpha1", "kind": "ModelDeployment",
                           "metadata": {"name": NAME}, "spec": spec})


@dataclass
class Setup:
    kube: Kube
    cluster: Any
    activator: str  # the activator's proxy URL
    admin: str  # its admin URL
    log: Path

    @property
    def host(self) -> str:  # what a client of the model's Service sends
        return f"{NAME}.{self.kube.namespace}.svc"

    def activator_value(self, name: str, **labels: str) -> float:
        return _value(httpx.get(f"{self.admin}/metrics", timeout=10).text, name, **labels)

    def ready_pod_ip(self) -> str | None:
        for pod in self.kube.get("pods", selector=f"modelyard.dev/model-deployment={NAME}") \
                or []:
            conditions = (pod.get("status") or {}).get("conditions") or []
            if any(c["type"] == "Ready" and c["status"] == "True" for c in conditions):
                return str(pod["status"]["podIP"])
        return None

    def ready(self) -> bool:
        condition = self.kube.condition(NAME, "Ready")
        return bool(condition and condition["status"] == "True")

    def version_entry(self, version: str) -> dict[str, Any] | None:
        versions = (self.kube.get("md", NAME) or {}).get("status", {}).get("versions", [])
        return next((v for v in versions if v["version"] == version), None)

    def pod_logs(self, version: str) -> str:
        return "".join(p.read_text(errors="replace")[-3000:] for p in sorted(
            self.cluster.pods.log_dir.glob(f"{self.kube.namespace}_{NAME}-v{version}-*.log")))

    def publish(self, version: str, source: Path) -> None:
        """The model directory where the manifest's ``file:///models/...`` points."""
        shutil.copytree(source, self.cluster.models_dir / NAME / version)


def _value(text: str, name: str, **labels: str) -> float:
    return sum(s.value for family in text_string_to_metric_families(text)
               for s in family.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def _up(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def setup(real_cluster: Any,  # noqa: F811
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    """The activator as its pods run it (defaults: no hold set here), at the pod network's
    host address behind its Service; the operator told where it is."""
    from modelyard.operator.runner import OperatorThread

    host = real_cluster.pod_network.host_address
    port, admin = reserve_port(), reserve_port()
    log = tmp_path_factory.mktemp("llm-activator") / "activator.log"
    with fresh_namespace(real_cluster, "llm") as namespace, as_operator(real_cluster), \
            pytest.MonkeyPatch.context() as patch:
        kube = Kube(real_cluster, namespace)
        env = {**os.environ, "KUBECONFIG": str(real_cluster.operator_kubeconfig)}
        env.pop("KUBERNETES_SERVICE_HOST", None)
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "modelyard.activator", "--host", host,
                 "--port", str(port), "--admin-port", str(admin)],
                env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            wait_for(lambda: _up(f"http://{host}:{admin}/healthz"), timeout=60,
                     what="the activator")
            activator_service(kube, host, port, admin)
            patch.setenv("MODELYARD_ACTIVATOR_SERVICE", f"{namespace}/activator")
            with OperatorThread():
                yield Setup(kube, real_cluster, f"http://{host}:{port}",
                            f"http://{host}:{admin}", log)
        finally:
            process.terminate()
            process.wait(30)


@pytest.fixture(scope="module")
def slow_llm(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("slow-llm") / "model"
    return path, build_model(path, *SLOW)


class _Traffic(threading.Thread):
    """Streamed completions, one after another, to each ready endpoint of the stable
    Service (as kube-proxy would pick them), each prompt starting with a new number so
    vLLM's prefix cache never answers: answered, failed and time to first token by
    version."""

    def __init__(self, kube: Kube) -> None:
        super().__init__(daemon=True)
        self.kube = kube
        self.ok: dict[str, int] = {}
        self.failed: dict[str, list[str]] = {}
        self.first_token_s: dict[str, list[float]] = {}
        self.stop = threading.Event()

    def __enter__(self) -> _Traffic:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.join(90)

    def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            for ip, pod in ready_endpoint_pods(self.kube, NAME).items():
                version = pod.removeprefix(f"{NAME}-v").split("-")[0]
                n += 1
                try:
                    first = self.complete(ip, f"{n} {PROMPT}")
                    self.ok[version] = self.ok.get(version, 0) + 1
                    self.first_token_s.setdefault(version, []).append(first)
                except (httpx.HTTPError, AssertionError) as error:
                    self.failed.setdefault(version, []).append(repr(error)[:300])
            # About one request a second to each version: enough to judge, little enough
            # that the stable engine leaves the 2 cores to the canary's start.
            self.stop.wait(1.0)

    @staticmethod
    def complete(ip: str, prompt: str) -> float:
        """A streamed completion from the pod at ``ip``: seconds to its first token."""
        start = time.monotonic()
        with httpx.stream("POST", f"http://{ip}:8080/v1/completions", timeout=60, json={
                "model": NAME, "prompt": prompt, "max_tokens": 4, "stream": True,
                "temperature": 0, "ignore_eos": True}) as answer:
            assert answer.status_code == 200, answer.read()[:200]
            first = None
            for line in answer.iter_lines():
                if first is None and line.startswith("data: ") and line != "data: [DONE]":
                    first = time.monotonic() - start
            assert first is not None, "no token came"
            return first


def _rolled_back(setup: Setup, version: str, timeout: float) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        entry = setup.version_entry(version)
        return entry if entry and entry["phase"] in ("RolledBack", "Failed") else None

    try:
        return wait_for(done, timeout=timeout, interval=1, what=f"v{version} rolled back")
    except AssertionError as error:
        raise AssertionError(f"{error}\nits pods' logs:\n{setup.pod_logs(version)}") from None


@pytest.mark.timeout(ENGINE_START_S + 480)  # an engine start, then its judging
def test_1_ready_follows_a_real_completion_and_tokens_stream(
        setup: Setup, tiny_llm: tuple[Path, str]) -> None:
    kube = setup.kube
    source, digest = tiny_llm
    setup.publish("1", source)
    kube.apply(manifest("1", digest))
    ready = wait_for(lambda: (c := kube.condition(NAME, "Ready")) and c["status"] == "True"
                     and c, timeout=ENGINE_START_S + 60, what="Ready")
    assert ready["reason"] == "Serving"
    assert "vLLM answered a completion: ready" in setup.pod_logs("1")
    status = kube.get("md", NAME)["status"]
    assert status["versions"][0]["version"] == "1"
    assert status["versions"][0]["sha256"] == digest  # the manifest digest, verified

    [ip] = ready_endpoint_pods(kube, NAME)
    base = f"http://{ip}:8080"
    events = stream_completion(base, NAME, "Hello world", 16)
    assert len(events) == 16  # one server-sent event per token
    assert [m["id"] for m in httpx.get(base + "/v1/models").json()["data"]] == [NAME]


def test_2_a_version_that_does_not_match_its_digest_is_rolled_back_with_the_reason(
        setup: Setup, tiny_llm: tuple[Path, str]) -> None:
    kube = setup.kube
    wait_for(setup.ready, timeout=ENGINE_START_S, what="v1 Ready")
    source, digest = tiny_llm
    setup.publish("2", source)
    wrong = "0" * 64
    with _Traffic(kube) as traffic:
        kube.apply(manifest("2", wrong, rollout={
            "strategy": "Canary", "steps": [{"weight": 50, "pauseSeconds": 30}]}))
        entry = _rolled_back(setup, "2", ENGINE_START_S)
    # The pod's own reason, from its termination log, not only "CrashLoopBackOff".
    assert "CrashLoopBackOff" in entry["reason"], entry
    assert f"its manifest digest is {digest}, but {wrong} was expected" in entry["reason"], entry
    degraded = kube.condition(NAME, "Degraded")
    assert degraded is not None
    assert degraded["reason"] == "RolledBack"
    assert kube.get("md", NAME)["status"]["stableVersion"] == "1"
    assert traffic.ok.get("1", 0) > 0
    assert traffic.failed == {}, traffic.failed


@pytest.mark.timeout(ENGINE_START_S + 480)  # an engine start, then its judging
def test_3_a_canary_slow_to_its_first_token_is_rolled_back_on_its_figures(
        setup: Setup, slow_llm: tuple[Path, str],
        record_property: Callable[[str, object], None]) -> None:
    kube = setup.kube
    wait_for(setup.ready, timeout=ENGINE_START_S, what="v1 Ready")
    started = time.monotonic()
    source, digest = slow_llm
    setup.publish("3", source)
    with _Traffic(kube) as traffic:
        kube.apply(manifest("3", digest, rollout={
            "strategy": "Canary", "steps": [{"weight": 50, "pauseSeconds": 600}],
            "analysis": {"maxTtftP95Ratio": 2, "minRequests": 5}}))
        entry = _rolled_back(setup, "3", ENGINE_START_S + 300)

    assert entry["phase"] == "RolledBack", entry
    assert "TTFT p95" in entry["reason"], entry
    assert "above 2x the stable version's" in entry["reason"], entry
    figures = entry["analysis"]
    stable = figures["stable"]
    assert figures["requests"] >= 5, figures
    assert stable["requests"] >= 5, figures
    assert figures["ttftP95Ms"] > 2 * stable["ttftP95Ms"], figures
    assert figures["errorRate"] == 0.0, figures
    assert stable["errorRate"] == 0.0, figures
    assert figures["itlP95Ms"] > 0
    assert stable["itlP95Ms"] > 0
    assert kube.get("md", NAME)["status"]["stableVersion"] == "1"
    degraded = kube.condition(NAME, "Degraded")
    assert degraded is not None
    assert degraded["reason"] == "RolledBack"
    assert traffic.ok.get("1", 0) > 0
    assert traffic.failed.get("1", []) == [], traffic.failed["1"][:5]
    # In the run's summary (tests/conftest.py), so CI's log shows what the canary cost.
    record_property("summary", ("the generative canary and its rollback", {
        "rolled back after (s)": round(time.monotonic() - started),
        "reason": entry["reason"],
        **{f"v{v} answered, failed": [traffic.ok.get(v, 0), len(traffic.failed.get(v, []))]
           for v in sorted({*traffic.ok, *traffic.failed})}}))
    print(f"\nrolled back after {time.monotonic() - started:.0f} s: {entry['reason']}\n"
          f"ledger figures: {figures}\n" + "".join(
              f"v{v}: {len(s)} answered, time to first token (client) median "
              f"{statistics.median(s) * 1000:.0f} ms, max {max(s) * 1000:.0f} ms\n"
              for v, s in sorted(traffic.first_token_s.items())))


@dataclass
class Streamed:
    status: int
    headers: httpx.Headers
    events: list[tuple[float, dict[str, Any]]]  # arrival (monotonic), event
    started: float

    def tokens(self) -> list[tuple[float, list[int]]]:
        """The events that carry generated tokens, with their ids."""
        return [(at, choice["token_ids"]) for at, event in self.events
                for choice in event.get("choices") or [] if choice.get("token_ids")]

    def token_count(self) -> int:
        return sum(len(ids) for _, ids in self.tokens())

    def gaps_ms(self) -> list[float]:
        times = [at for at, _ in self.tokens()]
        return [(b - a) * 1000 for a, b in itertools.pairwise(times)]


def stream_chat(url: str, host: str | None, max_tokens: int, *, timeout: float = 60,
                stop_after: int | None = None) -> Streamed:
    """A streamed chat completion; with ``stop_after``, hang up after that many tokens."""
    headers = {"Host": host} if host else {}
    body = {"model": NAME, "messages": [{"role": "user", "content": "Hello there"}],
            "max_tokens": max_tokens, "stream": True, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    started = time.monotonic()
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers,
                      timeout=timeout) as response:
        result = Streamed(response.status_code, response.headers, [], started)
        if response.status_code != 200:
            response.read()
            result.events.append((time.monotonic(), {"body": response.text}))
            return result
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            result.events.append((time.monotonic(), json.loads(line.removeprefix("data: "))))
            if stop_after is not None and result.token_count() >= stop_after:
                break
    return result


def _at_zero(kube: Kube) -> bool:
    deployment = kube.get("deployment", f"{NAME}-v1") or {}
    service = kube.get("service", NAME) or {}
    return deployment.get("spec", {}).get("replicas") == 0 \
        and "selector" not in service.get("spec", {}) \
        and bool(kube.get("endpointslice", f"{NAME}-activator"))


def _gaps(label: str, streamed: Streamed) -> None:
    """Print (no assertion: timings on a shared 2-core machine are notes, not facts) the
    first token's wait, the mean gap between tokens (vLLM's inter-token latency, as the
    client sees it) and the gaps between events."""
    tokens = streamed.tokens()
    gaps = sorted(streamed.gaps_ms()) or [0.0]
    ttft = (tokens[0][0] - streamed.started) * 1000
    itl = (tokens[-1][0] - tokens[0][0]) * 1000 / max(1, streamed.token_count() - 1)
    print(f"{label}: first token {ttft:.1f} ms, then {itl:.2f} ms per token; "
          f"{streamed.token_count()} tokens in {len(tokens)} events, gaps between events "
          f"median {statistics.median(gaps):.2f} ms, p90 {gaps[int(len(gaps) * 0.9)]:.2f} "
          f"ms, max {gaps[-1]:.2f} ms")


def _autoscaling(idle_s: int) -> dict[str, Any]:
    return {"minReplicas": 0, "maxReplicas": 1, "metric": "concurrency", "target": 1,
            "stableWindowSeconds": 6, "scaleToZeroDelaySeconds": idle_s}


@pytest.fixture(scope="module")
def awake(setup: Setup) -> Setup:
    """The model with its one ready replica (woken by the test before)."""
    wait_for(setup.ready_pod_ip, timeout=ENGINE_START_S, what="a ready vLLM pod")
    return setup


@pytest.mark.timeout(ENGINE_START_S + 480)  # an engine start, then its judging
def test_4_a_chat_sent_at_zero_is_held_until_vllm_is_up_then_streams(
        setup: Setup, tiny_llm: tuple[Path, str]) -> None:
    kube = setup.kube
    _, digest = tiny_llm
    # Back to version 1 (the stable one: no rollout), idle, so it goes to zero at once...
    kube.apply(manifest("1", digest, autoscaling=_autoscaling(0)))
    wait_for(lambda: _at_zero(kube), timeout=120, what="the model at zero, behind the activator")
    # ...and, woken, stays up for the module's later tests.
    kube.apply(manifest("1", digest, autoscaling=_autoscaling(3600)))
    wait_for(lambda: not kube.get("pods", selector=f"modelyard.dev/model-deployment={NAME}"),
             timeout=120, what="no pod left")
    assert not kube.get("md", NAME)["status"].get("readyReplicas")

    # Sent as a client of the model's Service would, where the Service now leads.
    answer = stream_chat(setup.activator, setup.host, MAX_TOKENS, timeout=ENGINE_START_S + 120)
    cold_start_s = answer.tokens()[0][0] - answer.started if answer.tokens() else -1.0
    print(f"cold start of vLLM through the activator (first token): {cold_start_s:.1f} s")
    assert answer.status == 200, answer.events
    assert answer.headers["content-type"].startswith("text/event-stream")
    # Every token arrived, streamed: in events as vLLM sent them. (vLLM sends one event
    # per token, but puts two or more in one event when its API server falls behind its
    # engine, as it does on 2 busy cores. The activator passes events on as they are:
    # tests/unit's test_a_streamed_answer_passes_event_by_event proves it without timing.)
    assert answer.token_count() == MAX_TOKENS
    assert len(answer.tokens()) > 1
    _gaps("the held request's tokens", answer)

    # It was held (not refused, not timed out) for the model, which woke: 0 -> 1 ready.
    labels = {"namespace": kube.namespace, "model_deployment": NAME}
    assert setup.activator_value("modelyard_activator_held_requests_total", **labels) == 1
    assert setup.activator_value("modelyard_activator_requests_total", outcome="forwarded",
                                 **labels) == 1
    assert setup.activator_value("modelyard_activator_waiting_requests", **labels) == 0
    assert "(engine vllm) up to 600 s" in setup.log.read_text()  # not a tensor model's 120
    wait_for(lambda: (kube.get("md", NAME) or {}).get("status", {}).get("readyReplicas") == 1,
             timeout=60, what="the ModelDeployment's readyReplicas at 1")


def test_5_through_the_activator_tokens_stream_as_from_vllm_directly(awake: Setup) -> None:
    direct_url = f"http://{awake.ready_pod_ip()}:8080"
    n = 128
    for round_ in range(3):  # alternating, so both see the same machine
        direct = stream_chat(direct_url, None, n)
        through = stream_chat(awake.activator, awake.host, n)
        _gaps(f"round {round_ + 1}, direct to vLLM       ", direct)
        _gaps(f"round {round_ + 1}, through the activator", through)
        assert direct.status == through.status == 200
        assert direct.token_count() == through.token_count() == n
        assert len(through.tokens()) > 1
        assert through.headers["content-type"] == direct.headers["content-type"]
        assert "content-length" not in through.headers


def test_6_a_client_that_leaves_mid_stream_ends_vllms_request(awake: Setup) -> None:
    """A client that leaves after two tokens of 480 (ignore_eos: vLLM generates them all,
    ~2.5 s here, unless the request is aborted): vLLM stops.

    On this machine vLLM sometimes sends an answer only once its engine has generated all
    of it (its server starved while the engine works: seen straight from vLLM too, the
    tokens arriving within a millisecond after ~0.6 s of silence). Then there is nothing
    left to stop when the first tokens arrive, and the try says nothing; it is tried
    again. A live stream (tokens milliseconds apart) that vLLM finishes anyway fails."""
    pod_metrics = f"http://{awake.ready_pod_ip()}:8080/metrics"

    def engine(name: str) -> float:
        return _value(httpx.get(pod_metrics, timeout=10).text, name)

    asked = 480
    for attempt in range(1, 6):
        before = engine("vllm:generation_tokens_total")
        left = stream_chat(awake.activator, awake.host, asked, stop_after=2)
        assert left.token_count() >= 2
        gap_ms = left.gaps_ms()[0] if left.gaps_ms() else 0.0
        wait_for(lambda: engine("vllm:num_requests_running") == 0, timeout=30,
                 what="nothing left running in vLLM")
        generated = engine("vllm:generation_tokens_total") - before
        print(f"try {attempt}: the client left after {left.token_count()} of {asked} "
              f"tokens ({gap_ms:.2f} ms apart): vLLM generated {generated:.0f}")
        if generated < asked:
            return  # stopped
        assert gap_ms < 1.0, "vLLM generated the whole answer for a client that had left"
    pytest.skip("vLLM sent every answer only once it was complete: nothing to stop")


def _word_tokens(model_dir: Path) -> list[int]:
    """The ids of the tiny tokenizer's whole lower-case words (`` the``, `` you``...): a
    random model that may only pick these prints words, not stray bytes that vLLM holds
    back as part of a character to come."""
    vocab = json.loads((model_dir / "tokenizer.json").read_text())["model"]["vocab"]
    return sorted(i for piece, i in vocab.items() if re.fullmatch(r"\u0120[a-z]{3,}", piece))


def test_7_modelyard_chat_holds_a_conversation(awake: Setup,
                                               tiny_llm: tuple[Path, str]) -> None:
    url = f"http://{awake.ready_pod_ip()}:8080"  # as a port-forward would give it
    words = _word_tokens(tiny_llm[0])
    assert len(words) > 5

    def engine(name: str, **labels: str) -> float:
        return _value(httpx.get(f"{url}/metrics", timeout=10).text, name, **labels)

    def answered() -> float:
        return engine("vllm:request_success_total", finished_reason="length")

    # The first turn's prompt alone, to compare with what the command sends.
    before, tokens_before = answered(), engine("vllm:prompt_tokens_total")
    single = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
        "model": NAME, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 1})
    assert single.status_code == 200
    wait_for(lambda: answered() == before + 1, timeout=30, what="vLLM counting the request")
    first_prompt = engine("vllm:prompt_tokens_total") - tokens_before

    before, tokens_before = answered(), engine("vllm:prompt_tokens_total")
    command = Path(sys.executable).with_name("modelyard")  # the installed entry point
    started = time.monotonic()
    done = subprocess.run(
        [str(command), "chat", NAME, "-n", awake.kube.namespace, "--url", url,
         "--max-tokens", "8", "--temperature", "0", "--param", "ignore_eos=true",
         "--param", f"allowed_token_ids={json.dumps(words)}"],
        input="Hello\n\nAnd then?\n", capture_output=True, text=True, timeout=120,
        env=awake.cluster.env(), check=False)
    print(f"modelyard chat: two turns in {time.monotonic() - started:.1f} s: "
          f"{done.stdout!r}")
    assert done.returncode == 0, done.stderr
    replies = done.stdout.splitlines()  # a reply a line, 8 words each
    assert len(replies) == 2, done.stdout
    assert all(re.fullmatch(r" ?[a-z]{3,}( [a-z]{3,}){7}", reply) for reply in replies), replies
    assert f"chatting with {NAME} at {url}" in done.stderr
    # Two turns (the empty line is none), each answered with its 8 tokens...
    wait_for(lambda: answered() == before + 2, timeout=30, what="two turns answered")
    # ...and the second one carried the first and its reply.
    second_prompt = engine("vllm:prompt_tokens_total") - tokens_before - first_prompt
    assert second_prompt >= first_prompt + 8, (first_prompt, second_prompt)

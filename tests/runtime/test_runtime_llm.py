"""The generative launcher (``python -m modelyard.runtime.llm``) with real vLLM (CPU build)
serving a tiny Llama built here: what a pod of ``runtime.engine: vllm`` does, on loopback.

Ready follows a real completion; tokens stream one event each; a directory that does not
match its digest never reaches the engine; an engine that cannot load the weights exits
with vLLM's own error in the termination log; SIGTERM drains."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from llmsupport import (
    CPU_ARGS,
    CPU_ENV,
    ENGINE_START_S,
    stream_completion,
    vllm_python,
)
from runtime_support import free_port

from modelyard.operator.devcluster import llm
from modelyard.runtime.llmdemo import corrupted_copy


@dataclass
class Launched:
    process: subprocess.Popen[bytes]
    url: str
    health: str
    log: Path
    termination: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)


def launch(tmp: Path, uri: str, sha256: str | None, *, name: str = "tiny",
           drain_s: float = 0, cache: Path | None = None) -> Launched:
    port, health = free_port("127.0.0.1"), free_port("127.0.0.1")
    tmp.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **CPU_ENV,
           "PYTHONPATH": str(llm.IMPORT_ROOT), "HOME": str(tmp / "home"),
           "MODELYARD_MODEL_NAME": name, "MODELYARD_MODEL_URI": uri,
           "MODELYARD_HOST": "127.0.0.1", "MODELYARD_PORT": str(port),
           "MODELYARD_HEALTH_PORT": str(health), "MODELYARD_CACHE_DIR": str(cache or tmp / "cache"),
           "MODELYARD_DRAIN_SECONDS": str(drain_s),
           "MODELYARD_TERMINATION_LOG": str(tmp / "termination-log")}
    if sha256:
        env["MODELYARD_MODEL_SHA256"] = sha256
    log = tmp / "launcher.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(vllm_python()), "-m", "modelyard.runtime.llm", "--dtype", "float32",
             "--max-model-len", "256", *CPU_ARGS],
            env=env, stdout=out, stderr=subprocess.STDOUT)
    return Launched(process, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{health}", log,
                    tmp / "termination-log")


def _status(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return None


@pytest.fixture(scope="module")
def node_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the module's launches, as the pods of one node share theirs."""
    return tmp_path_factory.mktemp("node-cache")


@pytest.fixture(scope="module")
def models(tiny_llm: tuple[Path, str],
           tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    corrupt = tmp_path_factory.mktemp("llm-models") / "corrupt"
    return {"good": tiny_llm, "corrupt": (corrupt, corrupted_copy(tiny_llm[0], corrupt))}


class _Watch(threading.Thread):
    """Every distinct (/ready, engine /health) pair a launch's probes see from its start
    until the launcher says ready, in order."""

    def __init__(self, launched: Launched) -> None:
        super().__init__(daemon=True)
        self.launched = launched
        self.seen: list[str] = []
        self.done = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + ENGINE_START_S
        while time.monotonic() < deadline and self.launched.process.poll() is None:
            pair = f"ready={_status(self.launched.health + '/ready')} " \
                   f"engine={_status(self.launched.url + '/health')}"
            if not self.seen or self.seen[-1] != pair:
                self.seen.append(pair)
            if pair.startswith("ready=200"):
                break
            time.sleep(0.2)
        self.done.set()


@pytest.fixture(scope="module")
def launches(models: dict[str, tuple[Path, str]], node_cache: Path,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, _Watch]]:
    """The good model, and the one whose weights only the engine can refuse, started
    together: a vLLM start is mostly imports, one process after another, so two starts
    share 2 cores about as fast as one runs alone. Each is watched from its start."""
    good_path, good_digest = models["good"]
    bad_path, bad_digest = models["corrupt"]  # its manifest matches
    watches = {
        "good": _Watch(launch(tmp_path_factory.mktemp("served"), good_path.as_uri(),
                              good_digest, drain_s=3, cache=node_cache)),
        "bad": _Watch(launch(tmp_path_factory.mktemp("corrupt"), bad_path.as_uri(),
                             bad_digest, cache=node_cache)),
    }
    for watch in watches.values():
        watch.start()
    try:
        yield watches
    finally:
        for watch in watches.values():
            watch.launched.stop()


@pytest.fixture(scope="module")
def served(launches: dict[str, _Watch]) -> tuple[Launched, list[str]]:
    """The good model, ready: what its probes saw before."""
    watch = launches["good"]
    watch.done.wait(ENGINE_START_S + 5)
    launched = watch.launched
    assert launched.process.poll() is None, launched.text()[-5000:]
    if not watch.seen or not watch.seen[-1].startswith("ready=200"):
        pytest.fail(f"not ready after {ENGINE_START_S} s:\n{launched.text()[-5000:]}")
    return launched, watch.seen


def test_a_directory_that_does_not_match_its_digest_never_reaches_the_engine(
        models: dict[str, tuple[Path, str]], tmp_path: Path) -> None:
    path, digest = models["good"]
    launched = launch(tmp_path, path.as_uri(), "0" * 64)
    try:
        assert launched.process.wait(120) == 1
    finally:
        launched.stop()
    message = launched.termination.read_text()
    assert "manifest digest" in message, message
    assert digest in message, message
    assert "starting vLLM" not in launched.text()


def test_an_engine_that_cannot_load_the_weights_reports_its_own_error(
        launches: dict[str, _Watch]) -> None:
    watch = launches["bad"]
    launched = watch.launched
    code = launched.process.wait(ENGINE_START_S)
    assert code != 0
    assert not any(s.startswith("ready=200") for s in watch.seen), watch.seen
    message = launched.termination.read_text()
    assert message.startswith("vLLM exited with code"), message
    assert "safetensor" in message.lower() or "shape" in message.lower(), message


def test_ready_follows_a_real_completion(served: tuple[Launched, list[str]]) -> None:
    launched, seen = served
    # Never ready before the engine was; ready only after the launcher's completion.
    assert seen[-1] == "ready=200 engine=200", seen
    assert all(s.startswith("ready=503") or s.startswith("ready=None") for s in seen[:-1]), seen
    metrics = httpx.get(launched.url + "/metrics", timeout=5).text
    answered = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                   if line.startswith("vllm:request_success_total{"))
    assert answered >= 1, "ready, but vLLM has answered no completion"
    live = httpx.get(launched.health + "/live", timeout=5).json()
    assert live["phase"] == "serving"
    assert live["fetch"]["source"] == "in-place"
    assert set(live["timings"]) >= {"fetch_s", "engine_start_s", "first_completion_s"}


def test_tokens_stream_one_event_each(served: tuple[Launched, list[str]]) -> None:
    launched, _ = served
    events = stream_completion(launched.url, "tiny", "Hello world", 24)
    assert len(events) == 24
    chat = stream_completion(launched.url, "tiny", "Hi", 12, chat=True)
    assert len(chat) >= 12  # a role header may come first
    models = httpx.get(launched.url + "/v1/models", timeout=5).json()
    assert [m["id"] for m in models["data"]] == ["tiny"]


def test_the_engine_metrics_the_operator_reads_are_served(
        served: tuple[Launched, list[str]]) -> None:
    launched, _ = served
    metrics = httpx.get(launched.url + "/metrics", timeout=5).text
    for name in ("vllm:time_to_first_token_seconds_bucket",
                 "vllm:inter_token_latency_seconds_bucket", "vllm:num_requests_running",
                 "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:request_success_total"):
        assert name in metrics, name


def test_sigterm_unreadies_at_once_and_drains(served: tuple[Launched, list[str]]) -> None:
    launched, _ = served
    launched.process.send_signal(signal.SIGTERM)
    assert _status(launched.health + "/ready") == 503
    # The engine keeps answering while requests arrive (an endpoint slow to leave the
    # Service): here for 7 s, past two drain periods (3 s), then it stops once idle.
    began, codes = time.monotonic(), []
    while time.monotonic() < began + 7:
        codes.append(httpx.post(launched.url + "/v1/completions", timeout=30, json={
            "model": "tiny", "prompt": "Hello", "max_tokens": 4}).status_code)
        time.sleep(1)
    assert set(codes) == {200}, codes
    assert launched.process.wait(60) == 0

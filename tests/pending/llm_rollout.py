"""A generative canary judged on its tokens, behind the operator: real vLLM (CPU build)
under modelyard's launcher, as pods of a kwok GPU node (real processes on the pods' own
IPs, see ``devcluster/pods.py``).

Version 1 is the tiny demo Llama; version 2 answers the same but with 32 layers of width
512 instead of 2 of 128, so its time to first token is several times longer on these CPUs
(tests/unit/data/vllm_metrics.txt records both under the same traffic). Rolled out as a
canary with ``analysis: {maxTtftP95Ratio: 2, minRequests: 10}`` while completions go where
the stable Service's endpoints point, version 2 is rolled back by itself on its time to
first token against version 1's over the same window, with both versions' figures in the
ledger, and the stable version fails no request. Two engine starts in all: the model goes
from one replica to two with version 2, so version 1 keeps its one pod and the canary
(weight 50) gets the other.
"""

from __future__ import annotations

import shutil
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from llmsupport import CPU_ARGS, CPU_ENV, ENGINE_START_S, build_model
from support import Kube, as_operator, fresh_namespace, ready_endpoint_pods, wait_for
from test_real_pods import real_cluster  # noqa: F401 - the module's own real cluster

SLOW = ("--layers", "32", "--hidden", "512")
# About 43 tokens: long enough that prefill is most of the time to first token.
PROMPT = ("The quick brown fox jumps over the lazy dog. A canary goes first, and the stable "
          "version keeps serving while it is judged. Tokens stream one at a time. Hello, how "
          "are you today?")
ANALYSIS = {"maxTtftP95Ratio": 2, "minRequests": 10}


@pytest.fixture(scope="module")
def chat(real_cluster: Any) -> Iterator[Kube]:  # noqa: F811
    from modelyard.operator.runner import OperatorThread

    with fresh_namespace(real_cluster, "llmroll") as namespace, as_operator(real_cluster), \
            OperatorThread():
        yield Kube(real_cluster, namespace)


@pytest.fixture(scope="module")
def slow_llm(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("slow-llm") / "model"
    return path, build_model(path, *SLOW)


def manifest(version: str, sha256: str, replicas: int) -> str:
    return yaml.safe_dump({
        "apiVersion": "modelyard.dev/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": "chat"},
        "spec": {
            "model": {"version": version, "uri": f"file:///models/chat/{version}/",
                      "format": "hf", "sha256": sha256},
            "runtime": {"engine": "vllm", "env": CPU_ENV,
                        "vllm": {"dtype": "float32", "maxModelLen": 256,
                                 "extraArgs": list(CPU_ARGS)}},
            "resources": {"gpu": {"count": 1}},
            "replicas": replicas,
            "rollout": {"strategy": "Canary", "steps": [{"weight": 50, "pauseSeconds": 600}],
                        "analysis": ANALYSIS},
        },
    })


class _Completions(threading.Thread):
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

    def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            endpoints = ready_endpoint_pods(self.kube, "chat")
            for ip, pod in endpoints.items():
                version = pod.removeprefix("chat-v").split("-")[0]
                n += 1
                try:
                    first = self.complete(ip, f"{n} {PROMPT}")
                    self.ok[version] = self.ok.get(version, 0) + 1
                    self.first_token_s.setdefault(version, []).append(first)
                except (httpx.HTTPError, AssertionError) as error:
                    self.failed.setdefault(version, []).append(repr(error)[:300])
            time.sleep(0.2)

    @staticmethod
    def complete(ip: str, prompt: str) -> float:
        """A streamed completion from the pod at ``ip``: seconds to its first token."""
        start = time.monotonic()
        with httpx.stream("POST", f"http://{ip}:8080/v1/completions", timeout=60, json={
                "model": "chat", "prompt": prompt, "max_tokens": 4, "stream": True,
                "temperature": 0, "ignore_eos": True}) as answer:
            assert answer.status_code == 200, answer.read()[:200]
            first = None
            for line in answer.iter_lines():
                if first is None and line.startswith("data: ") and line != "data: [DONE]":
                    first = time.monotonic() - start
            assert first is not None, "no token came"
            return first


def test_the_stable_version_serves(chat: Kube, real_cluster: Any,  # noqa: F811
                                   tiny_llm: tuple[Path, str]) -> None:
    source, digest = tiny_llm
    shutil.copytree(source, real_cluster.models_dir / "chat" / "1")
    chat.apply(manifest("1", digest, replicas=1))
    wait_for(lambda: (c := chat.condition("chat", "Ready")) and c["status"] == "True",
             timeout=ENGINE_START_S + 60, what="v1 Ready")
    [ip] = ready_endpoint_pods(chat, "chat")
    assert _Completions.complete(ip, PROMPT) > 0


def test_a_canary_slow_to_its_first_token_is_rolled_back_on_its_figures(
        chat: Kube, real_cluster: Any, slow_llm: tuple[Path, str]) -> None:  # noqa: F811
    wait_for(lambda: (c := chat.condition("chat", "Ready")) and c["status"] == "True",
             timeout=ENGINE_START_S, what="v1 Ready")
    started = time.monotonic()
    source, digest = slow_llm
    shutil.copytree(source, real_cluster.models_dir / "chat" / "2")
    traffic = _Completions(chat)
    traffic.start()
    try:
        chat.apply(manifest("2", digest, replicas=2))

        def rolled_back() -> dict[str, Any] | None:
            versions = (chat.get("md", "chat") or {}).get("status", {}).get("versions", [])
            entry = next((v for v in versions if v["version"] == "2"), None)
            return entry if entry and entry["phase"] in ("RolledBack", "Failed") else None

        entry = wait_for(rolled_back, timeout=ENGINE_START_S + 120, interval=1,
                         what="v2 rolled back")
    finally:
        traffic.stop.set()
        traffic.join(90)

    assert entry["phase"] == "RolledBack", entry
    assert "TTFT p95" in entry["reason"], entry
    assert "above 2x the stable version's" in entry["reason"], entry
    figures = entry["analysis"]
    stable = figures["stable"]
    assert figures["requests"] >= 10, figures
    assert stable["requests"] >= 10, figures
    assert figures["ttftP95Ms"] > 2 * stable["ttftP95Ms"], figures
    assert figures["errorRate"] == 0.0, figures
    assert stable["errorRate"] == 0.0, figures
    assert figures["itlP95Ms"] > 0
    assert stable["itlP95Ms"] > 0
    status = chat.get("md", "chat")["status"]
    assert status["stableVersion"] == "1"
    degraded = chat.condition("chat", "Degraded")
    assert degraded is not None
    assert degraded["reason"] == "RolledBack"
    assert traffic.ok.get("1", 0) > 0
    assert traffic.failed.get("1", []) == [], traffic.failed["1"][:5]
    print(f"\nrolled back after {time.monotonic() - started:.0f} s: {entry['reason']}\n"
          f"ledger figures: {figures}\n" + "".join(
              f"v{v}: {len(s)} answered, time to first token (client) median "
              f"{statistics.median(s) * 1000:.0f} ms, max {max(s) * 1000:.0f} ms\n"
              for v, s in sorted(traffic.first_token_s.items())))

"""A generative model behind the operator: real vLLM (CPU build) under modelyard's launcher,
as the pod of a kwok GPU node (a real process on the pod's own IP, see
``devcluster/pods.py``), serving a tiny Llama built here.

Ready follows a real completion; tokens stream through the stable Service's endpoints; a
new version whose directory does not match its digest is rolled back with the launcher's
reason in status and ledger, while the stable version answers every request. (The
engine's own errors take the same path, the termination log: tests/runtime/test_runtime_llm.py
shows vLLM's reason reaching it.)"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import yaml
from llmsupport import CPU_ARGS, CPU_ENV, ENGINE_START_S, stream_completion
from support import Kube, as_operator, fresh_namespace, ready_endpoint_pods, wait_for
from test_real_pods import real_cluster  # noqa: F401 - the module's own real cluster


@pytest.fixture(scope="module")
def chat(real_cluster: Any) -> Iterator[Kube]:  # noqa: F811
    from modelyard.operator.runner import OperatorThread

    with fresh_namespace(real_cluster, "llm") as namespace, as_operator(real_cluster), \
            OperatorThread():
        yield Kube(real_cluster, namespace)


def manifest(version: str, sha256: str, rollout: dict[str, Any] | None = None) -> str:
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
            "replicas": 1,
            "rollout": rollout or {"strategy": "RollingUpdate"},
        },
    })


def _endpoint(kube: Kube) -> str:
    [ip] = ready_endpoint_pods(kube, "chat")
    return f"http://{ip}:8080"


class _Completions(threading.Thread):
    """Completions through the stable Service's ready endpoints (as kube-proxy would pick
    them), counted by answered and failed."""

    def __init__(self, kube: Kube) -> None:
        super().__init__(daemon=True)
        self.kube = kube
        self.ok = 0
        self.failed: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            endpoints = ready_endpoint_pods(self.kube, "chat")
            if not endpoints:
                time.sleep(0.2)
                continue
            for ip in endpoints:
                try:
                    answer = httpx.post(f"http://{ip}:8080/v1/completions", timeout=30, json={
                        "model": "chat", "prompt": "Hello", "max_tokens": 4})
                    if answer.status_code == 200:
                        self.ok += 1
                    else:
                        self.failed.append(f"{answer.status_code} {answer.text[:200]}")
                except httpx.HTTPError as error:
                    self.failed.append(repr(error))
            time.sleep(0.2)


def test_ready_follows_a_real_completion_and_tokens_stream(
        chat: Kube, real_cluster: Any, tiny_llm: tuple[Any, str]) -> None:  # noqa: F811
    source, digest = tiny_llm
    shutil.copytree(source, real_cluster.models_dir / "chat" / "1")
    chat.apply(manifest("1", digest))
    ready = wait_for(lambda: (c := chat.condition("chat", "Ready")) and c["status"] == "True"
                     and c, timeout=ENGINE_START_S + 60, what="Ready")
    assert ready["reason"] == "Serving"
    logs = "".join(p.read_text(errors="replace")
                   for p in real_cluster.pods.log_dir.glob(f"{chat.namespace}_chat-*.log"))
    assert "vLLM answered a completion: ready" in logs
    status = chat.get("md", "chat")["status"]
    assert status["versions"][0]["version"] == "1"
    assert status["versions"][0]["sha256"] == digest  # the manifest digest, verified

    base = _endpoint(chat)
    events = stream_completion(base, "chat", "Hello world", 16)
    assert len(events) == 16  # one server-sent event per token
    assert [m["id"] for m in httpx.get(base + "/v1/models").json()["data"]] == ["chat"]


def test_a_version_that_does_not_match_its_digest_is_rolled_back_with_the_reason(
        chat: Kube, real_cluster: Any, tiny_llm: tuple[Any, str]) -> None:  # noqa: F811
    wait_for(lambda: (c := chat.condition("chat", "Ready")) and c["status"] == "True",
             timeout=ENGINE_START_S, what="v1 Ready")
    source, digest = tiny_llm
    shutil.copytree(source, real_cluster.models_dir / "chat" / "2")
    wrong = "0" * 64
    traffic = _Completions(chat)
    traffic.start()
    try:
        chat.apply(manifest("2", wrong, {"strategy": "Canary",
                                          "steps": [{"weight": 50, "pauseSeconds": 30}]}))

        def rolled_back() -> dict[str, Any] | None:
            versions = (chat.get("md", "chat") or {}).get("status", {}).get("versions", [])
            entry = next((v for v in versions if v["version"] == "2"), None)
            return entry if entry and entry["phase"] in ("RolledBack", "Failed") else None

        entry = wait_for(rolled_back, timeout=ENGINE_START_S, what="v2 rolled back")
    finally:
        traffic.stop.set()
        traffic.join(60)
    # The pod's own reason, from its termination log, not only "CrashLoopBackOff".
    assert "CrashLoopBackOff" in entry["reason"], entry
    assert f"its manifest digest is {digest}, but {wrong} was expected" in entry["reason"], entry
    degraded = chat.condition("chat", "Degraded")
    assert degraded is not None
    assert degraded["reason"] == "RolledBack"
    status = chat.get("md", "chat")["status"]
    assert status["stableVersion"] == "1"
    assert traffic.ok > 0
    assert traffic.failed == [], traffic.failed[:5]

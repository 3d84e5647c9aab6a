"""Generative models for the tests: vLLM's environment, tiny models built in the test.

The models are :mod:`modelyard.runtime.llmdemo`'s (a random-weight Llama, a tokenizer
trained on the spot), built under vLLM's own Python (it has transformers and
tokenizers). Nothing is downloaded from a hub.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from modelyard.operator.devcluster import llm

# vLLM on 2 CPU cores: the engine and its workers start in about 1.5 min on a quiet
# machine (mostly imports), more while the rest of the suite runs.
ENGINE_START_S = 420
# Settings that make sense for a tiny model on a CPU: no torch.compile (minutes of
# compiling for a model that runs in microseconds), float32, a short context; and no
# pinning of the engine's worker to a core (``auto`` pins every engine on this node to the
# same first core: a canary's engine then starts in the shadow of the stable one's).
CPU_ARGS = ("--enforce-eager", "--max-num-seqs", "32")
CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}


def vllm_python() -> Path:
    return llm.ensure_vllm()


def build_model(dest: Path, *extra: str) -> str:
    """Build the demo model at ``dest`` (``--corrupt``, ``--layers N``...); its digest."""
    proc = subprocess.run(
        [str(vllm_python()), "-m", "modelyard.runtime.llmdemo", str(dest), *extra],
        env={**os.environ, "PYTHONPATH": str(llm.IMPORT_ROOT)},
        capture_output=True, text=True, check=False, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


def stream_completion(base: str, model: str, prompt: str, max_tokens: int,
                      *, chat: bool = False, timeout: float = 60) -> list[tuple[float, str]]:
    """A streamed completion: (arrival time, text) of each server-sent event with text."""
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "stream": True,
                            "temperature": 0, "ignore_eos": True}
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    events: list[tuple[float, str]] = []
    with httpx.stream("POST", base + path, json=body, timeout=timeout) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line.removeprefix("data: "))["choices"][0]
            text = choice.get("text") if not chat else (choice.get("delta") or {}).get(
                "content")
            if choice.get("finish_reason") is None and text is None:
                continue
            events.append((time.monotonic(), text or ""))
    return events


def sse_lines(response: httpx.Response) -> Iterator[str]:
    for line in response.iter_lines():
        if line.startswith("data: "):
            yield line.removeprefix("data: ")

"""Make ``vllm_metrics.txt``: real scrapes of vLLM's ``/metrics`` for the unit tests.

Starts modelyard's launcher (real vLLM, CPU build) twice, on the two demo models the
rollout test uses: v1, the tiny Llama, and v2, a slow variant (``--layers 32 --hidden
512``). Each gets the same traffic: a dozen streamed completions with a 43-token prompt
(a different number first each time, so the prefix cache never answers), one plain
completion, one chat completion and one completion for a model it does not serve (404);
``/metrics`` is saved before and after. v1 then gets 40 long completions at once (more
than ``--max-num-seqs 32``, so some wait) and is scraped while they run and once they
are done. Prints each version's time to first token as a client sees it.

    flock /tmp/modelyard-vllm.lock .venv/bin/python tests/unit/data/make_vllm_metrics.py \\
        tests/unit/data/vllm_metrics.txt

Takes about 6 minutes on 2 quiet cores (two engine starts).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

from modelyard.operator.devcluster import llm

MODELS = {"v1": (), "v2": ("--layers", "32", "--hidden", "512")}
PROMPT = ("The quick brown fox jumps over the lazy dog. A canary goes first, and the stable "
          "version keeps serving while it is judged. Tokens stream one at a time. Hello, how "
          "are you today?")
ARGS = ("--dtype", "float32", "--max-model-len", "256", "--enforce-eager",
        "--max-num-seqs", "32")


def build(dest: Path, *extra: str) -> None:
    subprocess.run([str(llm.ensure_vllm()), "-m", "modelyard.runtime.llmdemo", str(dest),
                    *extra], env={**os.environ, "PYTHONPATH": str(llm.IMPORT_ROOT)},
                   check=True, capture_output=True, timeout=300)


def launch(model: Path, work: Path, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": str(llm.IMPORT_ROOT),
           "HOME": str(work / "home"), "MODELYARD_MODEL_NAME": "chat",
           "MODELYARD_MODEL_URI": model.as_uri(), "MODELYARD_HOST": "127.0.0.1",
           "MODELYARD_PORT": str(port), "MODELYARD_HEALTH_PORT": str(port + 1),
           "MODELYARD_CACHE_DIR": str(work / "cache"), "MODELYARD_DRAIN_SECONDS": "0",
           "MODELYARD_TERMINATION_LOG": str(work / "termination-log")}
    with (work / "launcher.log").open("wb") as log:
        return subprocess.Popen([str(llm.ensure_vllm()), "-m", "modelyard.runtime.llm", *ARGS],
                                env=env, stdout=log, stderr=subprocess.STDOUT)


def first_token_s(base: str, prompt: str) -> float:
    start = time.monotonic()
    with httpx.stream("POST", base + "/v1/completions", timeout=300, json={
            "model": "chat", "prompt": prompt, "max_tokens": 4, "stream": True,
            "temperature": 0, "ignore_eos": True}) as response:
        assert response.status_code == 200, response.read()
        lines = response.iter_lines()
        for line in lines:
            if line.startswith("data: ") and line != "data: [DONE]":
                first = time.monotonic() - start
                for _ in lines:
                    pass
                return first
    raise AssertionError("no token came")


def gauge(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{"))


def serve(version: str, model: Path, work: Path, port: int, *, busy: bool,
          notes: list[str]) -> dict[str, str]:
    process = launch(model, work, port)
    base, scrapes = f"http://127.0.0.1:{port}", {}
    try:
        while True:
            assert process.poll() is None, (work / "launcher.log").read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port + 1}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        scrapes["before"] = httpx.get(base + "/metrics").text
        firsts = [first_token_s(base, f"{n} {PROMPT}") for n in range(12)]
        notes.append(f"{version}: time to first token (client) median "
                     f"{statistics.median(firsts) * 1000:.0f} ms, max "
                     f"{max(firsts) * 1000:.0f} ms")
        print(notes[-1], flush=True)
        for path, body in (
                ("/v1/completions", {"prompt": f"100 {PROMPT}", "max_tokens": 4}),
                ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                          "max_tokens": 4})):
            assert httpx.post(base + path, json={"model": "chat", **body},
                              timeout=300).status_code == 200
        assert httpx.post(base + "/v1/completions", timeout=60, json={
            "model": "nosuch", "prompt": "Hello", "max_tokens": 4}).status_code == 404
        scrapes["after"] = httpx.get(base + "/metrics").text
        if busy:
            scrapes.update(crowd(base))
    finally:
        process.terminate()
        process.wait(60)
    return scrapes


def crowd(base: str) -> dict[str, str]:
    def one() -> None:
        httpx.post(base + "/v1/completions", timeout=600, json={
            "model": "chat", "prompt": "Hello", "max_tokens": 200, "ignore_eos": True})

    threads = [threading.Thread(target=one) for _ in range(40)]
    for thread in threads:
        thread.start()
    seen = None
    while seen is None:
        text = httpx.get(base + "/metrics").text
        if gauge(text, "vllm:num_requests_waiting") and gauge(text, "vllm:num_requests_running"):
            seen = text
        time.sleep(0.05)
    for thread in threads:
        thread.join()
    return {"busy": seen, "idle": httpx.get(base + "/metrics").text}


def main(out: Path) -> None:
    sections: list[str] = []
    notes = [f"Made {datetime.now(UTC):%Y-%m-%d} with vllm-cpu {vllm_version()}."]
    with tempfile.TemporaryDirectory() as tmp:
        for i, (version, extra) in enumerate(MODELS.items()):
            model, work = Path(tmp) / version / "model", Path(tmp) / version / "work"
            work.mkdir(parents=True)
            build(model, *extra)
            scrapes = serve(version, model, work, 18180 + 10 * i, busy=version == "v1",
                            notes=notes)
            sections += [f"# ==== scrape {version} {moment}\n{text}"
                         for moment, text in scrapes.items()]
    lines = [*(__doc__ or "").strip().splitlines(), "", *notes]
    header = "".join(f"# {line}".rstrip() + "\n" for line in lines)
    out.write_text(header + "".join(sections))


def vllm_version() -> str:
    found = subprocess.run([str(llm.ensure_vllm()), "-c",
                            "from importlib import metadata; print(metadata.version('vllm-cpu'))"],
                           capture_output=True, text=True, check=False)
    return found.stdout.strip() or "(unknown version)"


if __name__ == "__main__":
    main(Path(sys.argv[1]))

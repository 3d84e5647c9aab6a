"""The generative model on the local cluster (parts ``coldstart`` and ``overhead`` of
``bench.llm``): the real operator (in-process), the real activator (``python -m
modelyard.activator``, at the pod network's host address, as its pod would run), and one
ModelDeployment of engine vllm whose pod is real vLLM (CPU build) under modelyard's
launcher (``PodProcesses`` with vLLM's Python, on the pod's own IP).

The model is the demo Llama, served over HTTP by ``python -m http.server`` at the pod
network's host address, so the launcher downloads it into the node's cache. It scales to
zero (``minReplicas 0``, ``maxReplicas 1``); its idle delay is an hour while it is
measured and zero when the benchmark wants it gone.

* ``cold_start``: a streamed completion sent to the activator with the model at zero,
  until its first and last token; watches (``kubectl get -w``) stamp the Deployment's
  scale, the pod's creation, scheduling, Running and Ready; a poller of the launcher's
  ``/live`` (every 50 ms) stamps the launcher's start and the moment it serves, and
  gives its own timings (fetch, engine start, first completion).
* ``overhead``: the same vLLM process hit directly (the pod's IP and port: what the
  model's Service leads to) and through the activator (``Host: chat.NS.svc``),
  interleaved: per round and concurrency both paths, alternating which goes first, each
  a window of ``bench/llm_load.py`` (a process of its own); the activator's CPU time is
  read from ``/proc`` and its wait histogram from its ``/metrics`` over each window. Then
  the same against ``bench/llm_sse.py`` (a synthetic stream server with exact limits) on
  a pod address of its own, a pod labelled as model ``synthetic``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from bench.cluster import Kube, Watch, install_crd, metric_samples, path_fields, wait_for
from modelyard import contract
from modelyard.operator import api, render
from modelyard.operator.devcluster.ports import reserve_port

NAME = "chat"
PROMPT = "The quick brown fox jumps over the lazy dog. A canary goes first."
COLD_MAX_TOKENS = 16
HOLD_S = 600.0  # the activator's hold for a generative model (the OpenAI SDKs' timeout)
DEADLINE = float(os.environ.get("BENCH_DEADLINE", "420"))  # a bound on waiting
# What tests/llmsupport.py gives vLLM for a tiny model on a CPU (the benchmarks never
# import the tests): no torch.compile, 32 sequences at once, 1 GiB of KV cache.
CPU_ARGS = ("--enforce-eager", "--max-num-seqs", "32")
CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
TICK = os.sysconf("SC_CLK_TCK")


# ============================================================================ the session


def manifest(uri: str, sha256: str, zero_delay_s: int) -> str:
    spec = {
        "model": {"version": "1", "uri": uri, "format": "hf", "sha256": sha256},
        "runtime": {"engine": "vllm", "env": CPU_ENV,
                    "vllm": {"dtype": "float32", "maxModelLen": 256,
                             "extraArgs": list(CPU_ARGS)}},
        "resources": {"gpu": {"count": 1}},
        "autoscaling": {"minReplicas": 0, "maxReplicas": 1, "metric": "concurrency",
                        "target": 64, "stableWindowSeconds": 6,
                        "scaleToZeroDelaySeconds": zero_delay_s},
    }
    return yaml.safe_dump({"apiVersion": api.API_VERSION, "kind": api.KIND,
                           "metadata": {"name": NAME}, "spec": spec})


def llm_pod_fields(pod: dict[str, Any]) -> tuple[str, ...]:
    """(node, phase, Ready, deletionTimestamp, pod IP) of a pod."""
    status = pod.get("status") or {}
    ready = next((c.get("status", "") for c in status.get("conditions") or []
                  if c.get("type") == "Ready"), "")
    return ((pod.get("spec") or {}).get("nodeName", ""), status.get("phase", ""), ready,
            (pod.get("metadata") or {}).get("deletionTimestamp", ""),
            status.get("podIP", ""))


def _replicas(objects: dict[str, tuple[str, ...]]) -> int:
    return sum(int(f[0] or 0) for f in objects.values())


@dataclass
class ActivatorProcess:
    address: str
    port: int
    admin_port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.port}"

    def waiting(self, namespace: str) -> float:
        text = httpx.get(f"http://{self.address}:{self.admin_port}/metrics", timeout=10).text
        labels = frozenset({("namespace", namespace), ("model_deployment", NAME)})
        return metric_samples(text).get(("modelyard_activator_waiting_requests", labels), 0.0)

    def wait_totals(self, namespace: str, model: str) -> tuple[float, float]:
        """(sum, count) of its wait histogram for ``model``: arrival until forwarded (the
        pod's answer headers back) or timed out."""
        text = httpx.get(f"http://{self.address}:{self.admin_port}/metrics", timeout=10).text
        labels = frozenset({("namespace", namespace), ("model_deployment", model)})
        samples = metric_samples(text)
        return (samples.get(("modelyard_activator_wait_seconds_sum", labels), 0.0),
                samples.get(("modelyard_activator_wait_seconds_count", labels), 0.0))

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK

    def service(self) -> str:
        """Its Service and EndpointSlice, as the activator's Deployment would have them."""
        return yaml.safe_dump_all([
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "activator"},
             "spec": {"ports": [{"name": "http", "port": 80}, {"name": "admin", "port": 9090}]}},
            {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
             "metadata": {"name": "activator-1", "labels": {
                 "kubernetes.io/service-name": "activator",
                 "endpointslice.kubernetes.io/managed-by": "bench"}},
             "addressType": "IPv4",
             "endpoints": [{"addresses": [self.address], "conditions": {"ready": True}}],
             "ports": [{"name": "http", "port": self.port},
                       {"name": "admin", "port": self.admin_port}]},
        ])


@contextlib.contextmanager
def running_activator(cluster: Any, log_path: Path) -> Iterator[ActivatorProcess]:
    env = {**os.environ, "KUBECONFIG": str(cluster.operator_kubeconfig)}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    with activator_process([sys.executable, "-m", "modelyard.activator"],
                           cluster.pod_network.host_address, log_path, env) as activator:
        yield activator


@contextlib.contextmanager
def activator_process(command: Sequence[str], address: str, log_path: Path,
                      env: dict[str, str], cwd: Path | None = None
                      ) -> Iterator[ActivatorProcess]:
    """``command`` (the activator's ``main``) with its listeners on ``address``, until its
    ``/healthz`` answers; terminated at the end."""
    port, admin = reserve_port(), reserve_port()
    with log_path.open("wb") as out:
        process = subprocess.Popen(
            [*command, "--host", address, "--port", str(port), "--admin-port", str(admin),
             "--timeout-seconds", f"{HOLD_S:g}", "--log-level", "warning"],
            env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL)
    activator = ActivatorProcess(address, port, admin, process)
    try:
        wait_for(lambda: _ok(f"http://{address}:{admin}/healthz"), 60, "activator /healthz")
        yield activator
    finally:
        process.terminate()
        process.wait(60)


def _listening(ip: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((ip, port), timeout=1):
        return True
    return False


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@dataclass
class Session:
    kube: Kube
    activator: ActivatorProcess
    pods: Any  # PodProcesses
    uri: str
    digest: str
    model: Watch
    deployments: Watch
    podwatch: Watch
    slices: Watch

    @property
    def host(self) -> str:
        return f"{NAME}.{self.kube.namespace}.svc"

    def at_zero(self) -> bool:
        """No replica, no pod, no pod process, and the Service leading to the activator."""
        return (_replicas(self.deployments.state()) == 0 and not self.podwatch.state()
                and render.activator_slice_name(NAME) in self.slices.state()
                and not self.pods.endpoints())

    def ready_ip(self) -> str | None:
        return next((f[4] for f in self.podwatch.state().values()
                     if f[2] == "True" and not f[3] and f[4]), None)

    def set_zero_delay(self, seconds: int) -> None:
        self.kube.run("patch", "md", NAME, "--type", "merge", "-p", json.dumps(
            {"spec": {"autoscaling": {"scaleToZeroDelaySeconds": seconds}}}))

    def to_zero(self) -> float:
        """Let the model go to zero (idle delay 0) and its launcher end (it drains for a
        few seconds after its pod is gone), then give it back its hour; seconds."""
        began = time.monotonic()
        ip = self.ready_ip()
        self.set_zero_delay(0)
        wait_for(self.at_zero, DEADLINE, "the model at zero behind the activator", 0.2)
        if ip:
            wait_for(lambda: not _listening(ip, contract.LLM_HEALTH_PORT), DEADLINE,
                     "the old launcher gone", 0.2)
        self.set_zero_delay(3600)
        return time.monotonic() - began


@contextlib.contextmanager
def session(cluster: Any, pods: Any, workdir: Path, model_dir: Path,
            digest: str) -> Iterator[Session]:
    """The namespace, the origin, the activator, the operator and the model at zero."""
    from bench.llm_weights import origin
    from modelyard.operator.runner import OperatorThread

    served = workdir / "origin"
    (served / NAME).mkdir(parents=True, exist_ok=True)
    if not (served / NAME / "1").exists():
        (served / NAME / "1").symlink_to(model_dir, target_is_directory=True)
    with contextlib.ExitStack() as stack:
        namespace = stack.enter_context(cluster.fresh_namespace("llm"))
        stack.enter_context(cluster.as_operator())
        base = stack.enter_context(origin(served, cluster.pod_network.host_address))
        activator = stack.enter_context(running_activator(cluster, workdir / "activator.log"))
        kube = Kube(cluster, namespace)
        kube.apply(activator.service())
        stack.enter_context(_environ(MODELYARD_ACTIVATOR_SERVICE=f"{namespace}/activator"))
        operator = OperatorThread(namespaces=[namespace])
        operator.start()
        stack.callback(operator.stop)
        selector = f"{render.MODEL_LABEL}={NAME}"
        watches = {
            "model": kube.watch("md", path_fields("status", "autoscaler", "desiredReplicas"),
                                name=NAME),
            "deployments": kube.watch("deployments", path_fields("spec", "replicas"),
                                      selector=selector),
            "podwatch": kube.watch("pods", llm_pod_fields, selector=selector),
            "slices": kube.watch("endpointslices", slice_names,
                                 selector=f"kubernetes.io/service-name={NAME}"),
        }
        for watch in watches.values():
            stack.callback(watch.stop)
        uri = f"{base}{NAME}/1/"
        kube.apply(manifest(uri, digest, 3600))
        out = Session(kube, activator, pods, uri, digest, model=watches["model"],
                      deployments=watches["deployments"], podwatch=watches["podwatch"],
                      slices=watches["slices"])
        wait_for(out.at_zero, DEADLINE, "the new model at zero behind the activator", 0.2)
        yield out


def slice_names(piece: dict[str, Any]) -> tuple[str, ...]:
    return ((piece.get("metadata") or {}).get("name", ""),)


# ============================================================================= cold start

_LAUNCHED = re.compile(r"^(\d{4})-(\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) \S+ "
                       r"modelyard\.runtime\.llm: starting vLLM", re.MULTILINE)
_STAMP = r"(?:DEBUG|INFO|WARNING|ERROR) (\d\d-\d\d \d\d:\d\d:\d\d) \[[^\]]*\] "
# The engine's start, split at lines vLLM logs (its stamps have 1 s resolution): each key
# is the time from the previous marker found to this one.
ENGINE_MARKERS = (
    ("engine_imports_s", r"\(APIServer pid=\d+\) " + _STAMP),
    ("engine_config_s", _STAMP + r"Resolved architecture"),
    ("engine_core_s", _STAMP + r"Initializing a V1 LLM engine"),
    ("engine_worker_s", _STAMP + r"Starting to load model"),
    ("engine_weights_s", _STAMP + r"Loading weights took"),
    ("engine_kv_warmup_s", _STAMP + r"init engine \(profile"),
    ("engine_http_s", _STAMP + r"Starting vLLM server on"),
)


def engine_phases(log: str, engine_start_s: float) -> dict[str, float]:
    """The engine's start from a pod's log, between the launcher's "starting vLLM" and
    the markers above; ``engine_health_s``: the last marker to the launcher's first 200
    from vLLM's /health (what the launcher's ``engine_start_s`` ends with)."""
    import datetime as dt

    launched = _LAUNCHED.search(log)
    if launched is None:
        return {}
    year = launched.group(1)
    at = dt.datetime.strptime(f"{year}-{launched.group(2)}", "%Y-%m-%d %H:%M:%S") \
        + dt.timedelta(milliseconds=int(launched.group(3)))
    began, out = at, {}
    for key, pattern in ENGINE_MARKERS:
        found = re.search(pattern, log[launched.end():])
        if found is None:
            continue
        stamp = dt.datetime.strptime(f"{year}-{found.group(1)}", "%Y-%m-%d %H:%M:%S")
        out[key] = max(0.0, (stamp - at).total_seconds())
        at = max(at, stamp)
    out["engine_health_s"] = engine_start_s - (at - began).total_seconds()
    if weights := re.search(r"Loading weights took ([0-9.]+) seconds", log):
        out["vllm_load_weights_s"] = float(weights.group(1))
    return out



class LivePoller(threading.Thread):
    """The launcher's ``/live`` of the model's pod, every 50 ms from the moment the pod has
    an IP: when it first answered, when it first said ``serving``, and what it said."""

    def __init__(self, session: Session):
        super().__init__(daemon=True)
        self.session = session
        self.first: float | None = None
        self.serving: float | None = None
        self.pod = ""
        self.live: dict[str, Any] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        ip = None
        with httpx.Client(timeout=1) as http:
            while not self.stop.is_set() and self.serving is None:
                if ip is None:
                    self.pod, ip = next(((name, f[4]) for name, f
                                         in self.session.podwatch.state().items()
                                         if f[4] and not f[3]), ("", None))
                if ip:
                    with contextlib.suppress(httpx.HTTPError, ValueError):
                        live = http.get(f"http://{ip}:{contract.LLM_HEALTH_PORT}/live").json()
                        now = time.monotonic()
                        self.first = self.first or now
                        self.live = live
                        if live.get("phase") == "serving":
                            self.serving = now
                self.stop.wait(0.05)


def stream_once(url: str, host: str | None, max_tokens: int,
                timeout: float) -> dict[str, Any]:
    """One streamed completion: status, first and last token arrival (monotonic), tokens."""
    body = {"model": NAME, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    headers = {"Host": host} if host else {}
    out: dict[str, Any] = {"tokens": 0, "first": None, "last": None}
    with httpx.stream("POST", url + "/v1/completions", json=body, headers=headers,
                      timeout=timeout) as response:
        out["status"] = response.status_code
        if response.status_code != 200:
            out["error"] = response.read().decode(errors="replace")[:500]
            return out
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line.removeprefix("data: "))
            total = (event.get("usage") or {}).get("completion_tokens")
            if not event.get("choices") or (total or 1) <= out["tokens"]:
                continue
            now = time.monotonic()
            out["first"] = out["first"] or now
            out["last"] = now
            out["tokens"] = total or out["tokens"] + 1
            out["events"] = out.get("events", 0) + 1
    return out


def cold_start(session: Session, label: str) -> dict[str, Any]:
    """From zero to the first token of a streamed completion sent to the activator."""
    wait_for(session.at_zero, DEADLINE, "the model at zero behind the activator", 0.2)
    namespace = session.kube.namespace
    sent = time.monotonic()
    poller = LivePoller(session)
    poller.start()
    answer: dict[str, Any] = {}

    def send() -> None:
        try:
            answer.update(stream_once(session.activator.url, session.host, COLD_MAX_TOKENS,
                                      HOLD_S))
        except httpx.HTTPError as error:
            answer["error"] = repr(error)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    wait_for(lambda: session.activator.waiting(namespace) >= 1 or answer, 30,
             "the request held", 0.05)
    held = time.monotonic()
    sender.join(HOLD_S + 30)
    poller.stop.set()
    poller.join(5)
    if answer.get("status") != 200 or answer.get("first") is None:
        raise RuntimeError(f"the cold start's request failed: {answer}")
    pods, deployments = session.podwatch, session.deployments
    stamps = {
        "scaled": deployments.first(sent, lambda o: _replicas(o) >= 1),
        "created": pods.first(sent, bool),
        "scheduled": pods.first(sent, lambda o: any(f[0] for f in o.values())),
        "running": pods.first(sent, lambda o: any(f[1] == "Running" for f in o.values())),
        "ready": pods.first(sent, lambda o: any(f[2] == "True" for f in o.values())),
    }
    missing = [k for k, v in stamps.items() if v is None]
    if missing or poller.serving is None:
        raise RuntimeError(f"missed {missing or 'the launcher serving'}: {poller.live}")
    at = {k: float(v or 0.0) for k, v in stamps.items()}
    timings = poller.live.get("timings") or {}
    fetch = poller.live.get("fetch") or {}
    launcher_start = poller.serving - float(timings.get("total_s", math.nan))
    fetch_s = float(timings.get("fetch_s", math.nan))
    engine_s = float(timings.get("engine_start_s", math.nan))
    first_s = float(timings.get("first_completion_s", math.nan))
    first, last = float(answer["first"]), float(answer["last"])
    # Its health server answers first thing; until then the launcher has fetched nothing.
    health_up = (poller.first or math.nan) - launcher_start
    log = session.pods.log_dir / f"{namespace}_{poller.pod}.log"
    engine = engine_phases(log.read_text(errors="replace") if log.is_file() else "", engine_s)
    return engine | {
        "label": label, "fetch_source": fetch.get("source"), "fetch_bytes": fetch.get("bytes"),
        "fetch_downloaded": fetch.get("downloaded"),
        "sent_to_held_s": held - sent,
        "sent_to_scaled_s": at["scaled"] - sent,
        "scaled_to_created_s": at["created"] - at["scaled"],
        "created_to_scheduled_s": at["scheduled"] - at["created"],
        "scheduled_to_running_s": at["running"] - at["scheduled"],
        "running_to_launcher_s": launcher_start - at["running"],
        "launcher_to_live_s": health_up,
        "fetch_s": fetch_s, "engine_start_s": engine_s, "first_completion_s": first_s,
        "launcher_other_s": float(timings.get("total_s", math.nan)) - health_up - fetch_s
        - engine_s - first_s,
        "launcher_total_s": float(timings.get("total_s", math.nan)),
        "serving_to_pod_ready_s": at["ready"] - poller.serving,
        "pod_ready_to_first_token_s": first - at["ready"],
        "request_to_first_token_s": first - sent,
        "first_to_last_token_s": last - first, "tokens": answer["tokens"],
        "token_events": answer.get("events"),
    }


# =============================================================================== overhead


def run_load(url: str, host: str | None, *, concurrency: int, warmup_s: float,
             duration_s: float, max_tokens: int) -> dict[str, Any]:
    config = {"url": url + "/v1/completions", "host": host, "model": NAME, "prompt": PROMPT,
              "max_tokens": max_tokens, "concurrency": concurrency, "warmup_s": warmup_s,
              "duration_s": duration_s}
    proc = subprocess.run([sys.executable, "-m", "bench.llm_load", json.dumps(config)],
                          capture_output=True, text=True, check=False,
                          timeout=warmup_s + duration_s + 120)
    if proc.returncode != 0:
        raise RuntimeError(f"bench.llm_load failed: {proc.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def pct(values: Sequence[float], q: float) -> float:
    """Nearest rank, as bench/loadgen.py."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def pooled(windows: list[dict[str, Any]]) -> dict[str, Any]:
    seconds = sum(w["duration_s"] for w in windows)
    ttft = [v for w in windows for v in w["ttft_ms"]]
    tpot = [v for w in windows for v in w["tpot_ms"]]

    def mean(key: str) -> float | None:
        values = [w[key] for w in windows if w[key] is not None]
        return sum(values) / len(values) if values else None

    return {
        "tokens_per_s": sum(w["tokens"] for w in windows) / seconds,
        "ttft_p50_ms": pct(ttft, 0.5), "ttft_p99_ms": pct(ttft, 0.99), "ttft_n": len(ttft),
        "tpot_p50_ms": pct(tpot, 0.5), "tpot_p99_ms": pct(tpot, 0.99),
        "sent": sum(w["sent"] for w in windows),
        "completed": sum(w["completed"] for w in windows),
        "errors": sum(w["errors"] for w in windows),
        "first_error": next((w["first_error"] for w in windows if w["first_error"]), ""),
        "ttft_censored": sum(w["ttft_censored"] for w in windows),
        "tokens_per_event": mean("tokens_per_event"),
        "events_per_read": mean("events_per_read"),
        # the activator's own wait histogram: arrival until the pod's headers came back
        "activator_wait_mean_ms": 1000 * sum(w["activator_wait_s"] for w in windows)
        / max(1, sum(w["activator_forwarded"] for w in windows)),
        "activator_cpu_share": sum(w["activator_cpu_s"] for w in windows)
        / sum(w["wall_s"] for w in windows),
        # warm-up tokens included, as the CPU time is the whole window's
        "activator_cpu_us_per_token": 1e6 * sum(w["activator_cpu_s"] for w in windows)
        / max(1, sum(w["tokens_all"] for w in windows)),
        "seconds": seconds,
    }


@dataclass(frozen=True)
class LoadPlan:
    concurrencies: tuple[int, ...]
    rounds: int
    warmup_s: float
    duration_s: float
    max_tokens: int


SYNTHETIC = "synthetic"  # the model name the synthetic server's pod is labelled with
SYNTHETIC_FIRST_MS, SYNTHETIC_INTERVAL_MS = 20.0, 10.0


def overhead(session: Session, *, concurrencies: Sequence[int], rounds: int,
             warmup_s: float, duration_s: float, max_tokens: int,
             progress: Callable[[str], None] = print) -> dict[str, Any]:
    """vLLM directly and through the activator; then the same against the synthetic
    stream server (``bench/llm_sse.py``) on a pod address of its own."""
    ip = session.ready_ip()
    if ip is None:
        raise RuntimeError("no ready pod to measure")
    port = contract.RUNTIME_PORT  # the manifest leaves runtime.port at its default
    paths: dict[str, tuple[str, str | None]] = {
        "direct": (f"http://{ip}:{port}", None),
        "activator": (session.activator.url, session.host),
    }
    progress(f"overhead: vLLM at {ip}:{port} directly and through the activator at "
             f"{session.activator.address}:{session.activator.port}; warming up")
    top = max(concurrencies)
    for name, seconds in (("direct", 4.0), ("activator", 3.0)):
        run_load(*paths[name], concurrency=top, warmup_s=0, duration_s=seconds,
                 max_tokens=max_tokens)
    plan = LoadPlan(tuple(concurrencies), rounds, warmup_s, duration_s, max_tokens)
    rows, windows = compare({"activator": session.activator}, session.kube.namespace,
                            paths, plan, progress)
    out: dict[str, Any] = {
        "pod": f"{ip}:{port}", "activator": f"{session.activator.address}:"
        f"{session.activator.port}", "prompt": PROMPT, **dataclasses.asdict(plan),
        "rows": rows, "windows": windows}
    with synthetic_pod(session) as address:
        progress(f"overhead: the synthetic stream server at {address} (first token "
                 f"{SYNTHETIC_FIRST_MS:g} ms, then one every {SYNTHETIC_INTERVAL_MS:g} ms)")
        host = f"{SYNTHETIC}.{session.kube.namespace}.svc"
        paths = {"direct": (f"http://{address}", None),
                 "activator": (session.activator.url, host)}
        # Its limits are exact and its cost small: shorter windows suffice.
        short = dataclasses.replace(plan, warmup_s=min(plan.warmup_s, 1.0),
                                    duration_s=min(plan.duration_s, 5.0))
        rows, windows = compare({"activator": session.activator}, session.kube.namespace,
                                paths, short, progress)
    for row in rows:
        row["limit_tokens_per_s"] = synthetic_limit(row["concurrency"], max_tokens)
    out["synthetic"] = {"first_ms": SYNTHETIC_FIRST_MS, "interval_ms": SYNTHETIC_INTERVAL_MS,
                        **dataclasses.asdict(short), "rows": rows, "windows": windows}
    return out


def synthetic_limit(concurrency: int, max_tokens: int) -> float:
    """The synthetic server's exact tokens/s: ``concurrency`` streams of ``max_tokens``."""
    step_s = (SYNTHETIC_FIRST_MS + (max_tokens - 1) * SYNTHETIC_INTERVAL_MS) / 1000
    return concurrency * max_tokens / step_s


def compare(activators: dict[str, ActivatorProcess], namespace: str,
            paths: dict[str, tuple[str, str | None]], plan: LoadPlan,
            progress: Callable[[str], None]
            ) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """Every path (``direct`` first in ``paths``) at each concurrency, ``rounds`` times,
    rotating which goes first; pooled per path and concurrency, and each path through an
    activator (``activators``, by path) against ``direct``. A window through an activator
    reads its CPU time and wait histogram; a direct one the CPU time of all (idle)."""
    windows: dict[str, list[dict[str, Any]]] = {}
    names = list(paths)
    for index in range(plan.rounds):
        for turn, concurrency in enumerate(plan.concurrencies):
            first = (index + turn) % len(names)
            for name in names[first:] + names[:first]:
                host = paths[name][1]
                model = host.split(".")[0] if host else ""
                own = activators.get(name)
                watched = [own] if own else list(activators.values())
                waits = own.wait_totals(namespace, model) if own else (0.0, 0.0)
                cpu, began = sum(a.cpu_seconds() for a in watched), time.monotonic()
                window = run_load(*paths[name], concurrency=concurrency,
                                  warmup_s=plan.warmup_s, duration_s=plan.duration_s,
                                  max_tokens=plan.max_tokens)
                window["activator_cpu_s"] = sum(a.cpu_seconds() for a in watched) - cpu
                after = own.wait_totals(namespace, model) if own else (0.0, 0.0)
                window["activator_wait_s"] = after[0] - waits[0]
                window["activator_forwarded"] = after[1] - waits[1]
                window["wall_s"] = time.monotonic() - began  # the CPU's time: warm-up too
                window["round"], window["path"] = index, name
                windows.setdefault(f"{name}/{concurrency}", []).append(window)
                progress(f"  round {index + 1} c={concurrency:<2} {name:<9} "
                         f"{window['tokens_per_s']:7.1f} tokens/s, TTFT p50 "
                         f"{pct(window['ttft_ms'], 0.5):7.1f} ms, errors {window['errors']}")
                time.sleep(0.5)  # cut requests: let the server abort them
    rows = []
    for concurrency in plan.concurrencies:
        direct_windows = windows[f"direct/{concurrency}"]
        direct = pooled(direct_windows)
        for name in activators:
            through_windows = windows[f"{name}/{concurrency}"]
            through = pooled(through_windows)
            per_round = [a["tokens_per_s"] / d["tokens_per_s"] for d, a in zip(
                direct_windows, through_windows, strict=True) if d["tokens_per_s"]]
            rows.append({
                "concurrency": concurrency, "path": name, "direct": direct,
                "activator": through,
                "tokens_ratio": through["tokens_per_s"] / direct["tokens_per_s"],
                "tokens_ratio_rounds": per_round,
                "ttft_p50_added_ms": through["ttft_p50_ms"] - direct["ttft_p50_ms"],
                "ttft_p99_added_ms": through["ttft_p99_ms"] - direct["ttft_p99_ms"],
                "tpot_p50_added_ms": through["tpot_p50_ms"] - direct["tpot_p50_ms"],
            })
    return rows, windows


@contextlib.contextmanager
def synthetic_pod(session: Session) -> Iterator[str]:
    """A pod labelled as model ``synthetic`` (no ModelDeployment: the activator asks for
    one only when no pod is ready), its stream server on the pod's address in the pod
    network, and the pod made Ready as a kubelet would once it answers; ``ip:port``."""
    kube, port = session.kube, contract.RUNTIME_PORT
    kube.apply(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "synthetic-sse", "labels": {contract.MODEL_LABEL: SYNTHETIC}},
        "spec": {"tolerations": [{"operator": "Exists"}],
                 "containers": [{"name": "sse", "image": "bench/llm-sse",
                                 "ports": [{"name": "http", "containerPort": port}]}]}}))
    ip = wait_for(lambda: kube.run("get", "pod", "synthetic-sse", "-o",
                                   "jsonpath={.status.podIP}").strip(), 60, "its pod IP")
    network = kube.cluster.pod_network
    assert network is not None, "the cluster is not running"
    root = Path(__file__).resolve().parent.parent
    server = subprocess.Popen(
        network.command([sys.executable, "-m", "bench.llm_sse", ip, str(port),
                         f"{SYNTHETIC_FIRST_MS:g}", f"{SYNTHETIC_INTERVAL_MS:g}"]),
        cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    try:
        wait_for(lambda: _listening(ip, port), 30, "the synthetic server")
        kube.run("patch", "pod", "synthetic-sse", "--subresource=status", "--type=strategic",
                 "-p", json.dumps({"status": {"conditions": [
                     {"type": t, "status": "True"} for t in ("Ready", "ContainersReady")]}}))
        yield f"{ip}:{port}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, 15)
        server.wait(10)
        kube.run("delete", "pod", "synthetic-sse", "--wait=false")


@contextlib.contextmanager
def local_cluster(workdir: Path, llm_python: Path) -> Iterator[tuple[Any, Any]]:
    """A local cluster with one kwok GPU node and real pod processes (vLLM's Python for
    generative pods)."""
    from modelyard.operator.devcluster import ClusterConfig, LocalCluster, NodePool
    from modelyard.operator.devcluster.pods import PodProcesses

    pools = (NodePool("gpu-h100", count=1, gpus=8, gpu_product="NVIDIA-H100-80GB-HBM3"),)
    with LocalCluster(ClusterConfig(topology=pools, real_pods=True)) as cluster:
        install_crd(cluster)
        pods = PodProcesses(cluster, models_dir=workdir / "models", log_dir=workdir / "pods",
                            max_backoff_s=2, llm_python=str(llm_python))
        pods.start()
        try:
            yield cluster, pods
        finally:
            pods.stop()

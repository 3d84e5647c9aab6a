"""The autoscaling benchmark (issue #5): how closely and how fast replicas follow the
load, and how long a model takes to come back from zero.

    .venv/bin/python -m bench.autoscale                       # all three parts, ~5.5 min on 2 cores
    .venv/bin/python -m bench.autoscale --part trace --ready-delay 20
    .venv/bin/python -m bench.autoscale --part step --repeats 3
    .venv/bin/python -m bench.autoscale --part coldstart --device cuda

Parts (``--part``, repeatable; default all):

* ``coldstart``: the benchmark model (``bench/model.py``) from nothing to its first
  answer. (1) The runtime alone: ``python -m modelyard.runtime`` spawned on loopback, as
  ``PodProcesses`` spawns a pod's; stamped when the port answers, when the model is ready
  and when the first inference is answered; the runtime's own log gives load and warm-up.
  (2) End to end on the local cluster: a request sent to the activator
  (``modelyard.activator``) for a model at zero pods, until its answer, with the
  Deployment scaled 0 -> 1 as soon as the activator reports the request held; a watch
  stamps the pod's creation, scheduling, Running and Ready on the way.
* ``step``: the real operator (in-process, its own namespace), real runtime pods and a
  paced load stepped from 1x to 4x the per-replica target (``rps``, short windows); a
  watch stamps (a) the autoscaler's decision (``status.autoscaler.desiredReplicas``)
  and the Deployment's replicas, (b) the new pods Ready, (c) the new pods in the Service's
  EndpointSlices. Then the load goes back to 1x and the way down is stamped too.
* ``trace``: load traces (step, spike, ramp, sawtooth, diurnal, silence; deterministic,
  as in ``tests/unit/test_autoscale.py``) replayed through ``autoscale.decide`` with the
  default policy in a small simulator where a new replica is ready ``--ready-delay``
  seconds after the decision (default: the cold start measured by ``coldstart`` in this
  run, else in the newest ``bench/results/autoscale-*.json``, else 20 s): over- and
  under-provisioning in replica-seconds and as a share of the ideal, direction changes,
  and time to follow each load step.

Nothing here asserts a timing: it prints a table and writes JSON and markdown to
``bench/results/``. The cluster parts run on whatever this machine is; on a shared
machine their wall-clock figures are indicative.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import httpx
import yaml

from bench import model as bench_model
from bench import write_results
from bench.cluster import (
    Kube,
    PacedLoad,
    Watch,
    as_operator,
    fresh_namespace,
    inference_body,
    install_crd,
    metric_samples,
    path_fields,
    pod_fields,
    ready_pods,
    serving,
    slice_fields,
    wait_for,
)
from modelyard.operator import api, autoscale, render
from modelyard.operator.autoscale import Policy, Sample, State
from modelyard.operator.devcluster.ports import reserve_port

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PARTS = ("coldstart", "step", "trace")
SIZE = 64  # the benchmark model's input: 1x3x64x64, as in bench/runtime.py
NAME = "resnet"
DEADLINE = float(os.environ.get("BENCH_DEADLINE", "240"))  # a bound on waiting, not a measurement

# ==================================================================================== trace

TICK = 2.0  # the operator's autoscaler tick
TARGET = 10.0  # per replica, in requests in flight (the concurrency metric)
DEFAULT_READY_DELAY = 20.0
Load = Callable[[float], float]


def _steps(*points: tuple[float, float]) -> Load:
    """``points[i][1]`` replicas' worth of load from ``points[i][0]`` on."""
    def load(t: float) -> float:
        return TARGET * [v for at, v in points if at <= t][-1]
    return load


def _ramp(t: float) -> float:
    return TARGET * (0.9 + 8.6 * min(t, 2400 - t, 1200) / 1200 if t < 2400 else 0.9)


def _sawtooth(t: float) -> float:
    return TARGET * (1.8 + 3.7 * (t % 120) / 120)


def _diurnal(t: float) -> float:
    return TARGET * (5 + 4 * math.sin(2 * math.pi * t / 7200))


@dataclass(frozen=True)
class Trace:
    name: str
    shape: str
    load: Load
    seconds: float
    steps: tuple[float, ...] = ()  # when the load jumps (time to follow is measured)
    min_replicas: int = 1
    noise: float = 0.05


TRACES = (
    Trace("step", "1.8 -> 7.6 at 600 s -> 1.8 at 1800 s",
          _steps((0, 1.8), (600, 7.6), (1800, 1.8)), 2700, (600, 1800)),
    Trace("spike", "1.8, 9.5 for 30 s at 600 s", _steps((0, 1.8), (600, 9.5), (630, 1.8)),
          1500, (600, 630)),
    Trace("ramp", "0.9 -> 9.5 over 20 min -> 0.9", _ramp, 3000),
    Trace("sawtooth", "1.8 -> 5.5, 120 s period", _sawtooth, 1800),
    Trace("diurnal", "5 +- 4, sine over 2 h, +-10 % noise", _diurnal, 7200, noise=0.10),
    Trace("silence", "2.6, 0 from 300 s, 0.7 from 1500 s (minReplicas 0)",
          _steps((0, 2.6), (300, 0), (1500, 0.7)), 1800, (300, 1500), min_replicas=0),
)


@dataclass
class Replay:
    trace: list[tuple[float, float]] = field(default_factory=list)  # (t, load), noise-free
    desired: list[tuple[float, int]] = field(default_factory=list)
    ready: list[tuple[float, int]] = field(default_factory=list)


def replay(trace: Trace, policy: Policy, ready_delay: float, seed: int = 7) -> Replay:
    """Every TICK: what the ready pods see (load with noise; requests waiting while none
    is ready), a decision, and that many pods: new ones ready ``ready_delay`` later,
    removed ones gone at once (those still starting first)."""
    rng = random.Random(seed)
    pods = [0.0]  # the time each pod is (or will be) ready
    samples: list[Sample] = []
    state = State()
    out = Replay()
    t = 0.0
    while t <= trace.seconds:
        demand = trace.load(t) * (1 + trace.noise * rng.uniform(-1, 1))
        ready = sum(1 for at in pods if at <= t)
        sample = Sample(t, ready, demand) if ready else Sample(t, 0, 0.0, waiting=demand)
        samples = [s for s in samples if s.time > t - 2 * policy.stable_window_seconds]
        samples.append(sample)
        decision = autoscale.decide(samples, t, len(pods), state, policy)
        state = decision.state
        if decision.replicas > len(pods):
            pods += [t + ready_delay] * (decision.replicas - len(pods))
        else:
            pods = sorted(pods)[:decision.replicas]
        out.trace.append((t, trace.load(t)))
        out.desired.append((t, decision.replicas))
        out.ready.append((t, sum(1 for at in pods if at <= t)))
        t += TICK
    return out


def _ideal(load: float, policy: Policy) -> int:
    return min(max(math.ceil(load / policy.target - 1e-9), policy.min_replicas),
               policy.max_replicas)


def _follow(run: Replay, trace: Trace, at: float, until: float,
            policy: Policy) -> dict[str, Any]:
    """After the load step at ``at``: when the decision, and then the ready replicas,
    first matched the ideal (before the next step; None if they never did)."""
    before, after = _ideal(trace.load(at - TICK), policy), _ideal(trace.load(at), policy)
    up = after > before

    def reached(series: list[tuple[float, int]]) -> float | None:
        return next((t - at for t, n in series if at <= t < until
                     and (n >= after if up else n <= after)), None)

    return {"at_s": at, "from": before, "to": after, "decided_s": reached(run.desired),
            "ready_s": reached(run.ready)}


def trace_part(ready_delay: float, source: str) -> dict[str, Any]:
    print(f"trace: default policy, a new replica ready {ready_delay:.1f} s after the "
          f"decision ({source})", flush=True)
    rows = []
    for trace in TRACES:
        policy = Policy(target=TARGET, min_replicas=trace.min_replicas, max_replicas=20)
        run = replay(trace, policy, ready_delay)
        over, under = autoscale.provisioning(run.trace, run.ready, TARGET)
        needed = sum(_ideal(load, policy) * TICK for _, load in run.trace[:-1])
        counts = [n for _, n in run.desired]
        signs = [1 if b > a else -1 for a, b in itertools.pairwise(counts) if b != a]
        ends = [*trace.steps[1:], trace.seconds + TICK][:len(trace.steps)]
        rows.append({
            "trace": trace.name, "load_x_target": trace.shape, "seconds": trace.seconds,
            "needed_replica_s": needed, "over_replica_s": over, "under_replica_s": under,
            "over_pct": 100 * over / needed, "under_pct": 100 * under / needed,
            "direction_changes": sum(1 for a, b in itertools.pairwise(signs)
                                     if a != b),
            "max_replicas": max(counts),
            "follow": [_follow(run, trace, at, end, policy)
                       for at, end in zip(trace.steps, ends, strict=True)],
        })
    return {"ready_delay_s": ready_delay, "ready_delay_source": source, "tick_s": TICK,
            "policy": "target 10 in flight per replica, stable window 60 s, panic 6 s at "
                      "200 %, tolerance 10 %, scale-down delay 300 s, to-zero delay 300 s, "
                      "replicas 1..20 (0..20 for silence)",
            "traces": rows}


def measured_ready_delay(results: dict[str, Any]) -> tuple[float, str]:
    """The cold start to use in the simulation: this run's, the newest recorded, or 20 s."""
    found = _ready_delay_of(results)
    if found is not None:
        return found, "measured by coldstart in this run: scale 0 -> 1 until the pod is Ready"
    for path in sorted(RESULTS.glob("autoscale-*.json"), reverse=True):
        with contextlib.suppress(ValueError, OSError):
            found = _ready_delay_of(json.loads(path.read_text()))
            if found is not None:
                return found, f"measured cold start (scale -> pod Ready) from {path.name}"
    return DEFAULT_READY_DELAY, "default; no measured cold start found"


def _ready_delay_of(results: dict[str, Any]) -> float | None:
    cluster = (results.get("coldstart") or {}).get("cluster") or {}
    value = (cluster.get("summary") or {}).get("scale_to_ready_s", {}).get("median")
    return float(value) if value is not None else None


# ================================================================================ coldstart


def _first_ok(method: str, url: str, deadline: float, **kwargs: Any) -> float:
    """Poll until ``url`` answers 200; the time it did."""
    with httpx.Client(timeout=30) as http:
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if http.request(method, url, **kwargs).status_code == 200:
                    return time.monotonic()
            time.sleep(0.02)
    raise TimeoutError(f"{url} never answered 200")


def runtime_cold_start(model_path: Path, device: str, workdir: Path) -> dict[str, float]:
    """One runtime process from spawn to its first answered inference."""
    port = reserve_port()
    base = f"http://127.0.0.1:{port}"
    log_path = workdir / f"runtime-{port}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELYARD_")}
    env |= {"MODELYARD_MODEL_NAME": NAME, "MODELYARD_MODEL_URI": model_path.as_uri(),
            "MODELYARD_HOST": "127.0.0.1", "MODELYARD_PORT": str(port),
            "MODELYARD_CACHE_DIR": str(workdir / "cache"), "MODELYARD_DEVICE": device,
            "MODELYARD_LOG_LEVEL": "info"}
    body, headers = inference_body(SIZE)
    with log_path.open("wb") as log:
        spawned = time.monotonic()
        process = subprocess.Popen([sys.executable, "-m", "modelyard.runtime"], env=env,
                                   stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = spawned + DEADLINE
        live = _first_ok("GET", f"{base}/v2/health/live", deadline)
        ready = _first_ok("GET", f"{base}/v2/health/ready", deadline)
        answered = _first_ok("POST", f"{base}/v2/models/{NAME}/infer", deadline,
                             content=body, headers=headers)
    finally:
        process.terminate()
        process.wait(30)
    text = log_path.read_text(errors="replace")
    loaded = re.search(r"loaded .* on (\S+) in ([0-9.]+)s", text)
    warm = re.search(r"warm-up done in ([0-9.]+)s", text)
    return {"spawn_to_listening_s": live - spawned, "listening_to_ready_s": ready - live,
            "model_load_s": float(loaded.group(2)) if loaded else math.nan,
            "warmup_s": float(warm.group(1)) if warm else math.nan,
            "ready_to_first_answer_s": answered - ready,
            "spawn_to_first_answer_s": answered - spawned}


@dataclass
class Activator:
    address: str  # where its pods would listen: the pod network's host address
    port: int
    admin_port: int
    process: subprocess.Popen[bytes]

    def waiting(self, namespace: str) -> float:
        text = httpx.get(f"http://{self.address}:{self.admin_port}/metrics", timeout=10).text
        labels = frozenset({("namespace", namespace), ("model_deployment", NAME)})
        return metric_samples(text).get(("modelyard_activator_waiting_requests", labels), 0.0)

    def service(self) -> str:
        """The activator's Service and EndpointSlice, as its Deployment would have them."""
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
def running_activator(cluster: Any, log_path: Path) -> Iterator[Activator]:
    """``python -m modelyard.activator`` on this machine at the pod network's
    host address, as its pod would run, with the operator's credentials."""
    address, port, admin = cluster.pod_network.host_address, reserve_port(), reserve_port()
    env = {**os.environ, "KUBECONFIG": str(cluster.operator_kubeconfig)}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    with log_path.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "modelyard.activator", "--host", address,
             "--port", str(port), "--admin-port", str(admin), "--timeout-seconds",
             f"{DEADLINE:g}", "--log-level", "warning"],
            env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    activator = Activator(address, port, admin, process)
    try:
        wait_for(lambda: _ok(f"http://{address}:{admin}/healthz"), 60, "activator /healthz")
        yield activator
    finally:
        process.terminate()
        process.wait(60)


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def zero_manifest() -> str:
    """The benchmark model with scale-to-zero and short delays, so the benchmark need not
    wait five minutes between cold starts."""
    spec = {"model": {"version": "1", "uri": f"file:///models/{NAME}/1/model.pt"},
            "resources": {"gpu": {"count": 1}},
            "autoscaling": {"minReplicas": 0, "maxReplicas": 2, "metric": "concurrency",
                            "target": 1, "stableWindowSeconds": 6, "scaleDownDelaySeconds": 2,
                            "scaleToZeroDelaySeconds": 6}}
    return yaml.safe_dump({"apiVersion": api.API_VERSION, "kind": api.KIND,
                           "metadata": {"name": NAME}, "spec": spec})


@dataclass
class ModelWatches:
    """What the benchmark follows of the model: the autoscaler's decision, the Deployments'
    replicas, the pods, and the model Service's EndpointSlices (the activator's one while
    at zero)."""

    model: Watch
    deployments: Watch
    pods: Watch
    slices: Watch

    @classmethod
    def open(cls, kube: Kube) -> Self:
        selector = f"{render.MODEL_LABEL}={NAME}"
        return cls(
            model=kube.watch("md", path_fields("status", "autoscaler", "desiredReplicas"),
                             name=NAME),
            deployments=kube.watch("deployments", path_fields("spec", "replicas"),
                                   selector=selector),
            pods=kube.watch("pods", pod_fields, selector=selector),
            slices=kube.watch("endpointslices", slice_fields,
                              selector=f"kubernetes.io/service-name={NAME}"))

    def stop(self) -> None:
        for watch in (self.model, self.deployments, self.pods, self.slices):
            watch.stop()


class ZeroWatches(ModelWatches):
    def at_zero(self) -> bool:
        """No replica, no pod, and the Service leading to the activator."""
        return (_replicas(self.deployments.state()) == 0 and not self.pods.state()
                and f"{NAME}-activator" in self.slices.state())


def cluster_cold_start(kube: Kube, activator: Activator, watches: ZeroWatches
                       ) -> dict[str, float]:
    """One request through the model's Service (which leads to the activator while the
    model is at zero) until its answer; the watches stamp each step on the way."""
    wait_for(watches.at_zero, DEADLINE, "the model at zero behind the activator")
    [address] = serving({NAME: watches.slices.state()[f"{NAME}-activator"]})
    body, headers = inference_body(SIZE)
    answer: dict[str, Any] = {}

    def send() -> None:
        response = httpx.post(f"http://{address}/v2/models/{NAME}/infer", content=body,
                              headers={**headers, "Host": f"{NAME}.{kube.namespace}.svc"},
                              timeout=DEADLINE)
        answer.update(status=response.status_code, at=time.monotonic())

    sender = threading.Thread(target=send, daemon=True)
    sent = time.monotonic()
    sender.start()
    wait_for(lambda: activator.waiting(kube.namespace) >= 1 or answer, 30, "the request held",
             0.05)
    held = time.monotonic()
    sender.join(DEADLINE)
    if answer.get("status") != 200:
        raise RuntimeError(f"the request got {answer.get('status')}")
    stamps = {
        "decided": watches.model.first(sent, lambda o: _desired(o) >= 1),
        "scaled": watches.deployments.first(sent, lambda o: _replicas(o) >= 1),
        "created": watches.pods.first(sent, bool),
        "scheduled": watches.pods.first(sent, lambda o: any(f[0] for f in o.values())),
        "running": watches.pods.first(sent, lambda o: any(f[1] == "Running"
                                                          for f in o.values())),
        "ready": watches.pods.first(sent, lambda o: bool(ready_pods(o))),
    }
    missing = [k for k, v in stamps.items() if v is None]
    if missing:
        raise RuntimeError(f"the watches missed {missing}")
    at = {k: float(v or 0.0) for k, v in stamps.items()}
    return {"sent_to_held_s": held - sent, "sent_to_scaled_s": at["scaled"] - sent,
            "sent_to_status_s": at["decided"] - sent,
            "scaled_to_pod_created_s": at["created"] - at["scaled"],
            "created_to_scheduled_s": at["scheduled"] - at["created"],
            "scheduled_to_running_s": at["running"] - at["scheduled"],
            "running_to_ready_s": at["ready"] - at["running"],
            "ready_to_answer_s": answer["at"] - at["ready"],
            "scale_to_ready_s": at["ready"] - at["scaled"],
            "request_to_answer_s": answer["at"] - sent}


def coldstart_part(env: Environment, args: argparse.Namespace) -> dict[str, Any]:
    from modelyard.operator.runner import OperatorThread

    print(f"coldstart: the runtime alone on {args.device}, {args.repeats} times", flush=True)
    local = [runtime_cold_start(env.model_path, args.device, env.workdir)
             for _ in range(args.repeats)]
    for row in local:
        print(f"  spawn -> first answer {row['spawn_to_first_answer_s']:.2f} s", flush=True)
    print(f"coldstart: from zero through the activator and the operator, {args.repeats} times",
          flush=True)
    rows = []
    with fresh_namespace(env.cluster, "cold") as namespace, as_operator(env.cluster), \
            running_activator(env.cluster, env.workdir / "activator.log") as activator, \
            _environ(MODELYARD_ACTIVATOR_SERVICE=f"{namespace}/activator"), \
            contextlib.ExitStack() as stack:
        kube = Kube(env.cluster, namespace)
        kube.apply(activator.service())
        stack.enter_context(OperatorThread(namespaces=[namespace]))
        watches = ZeroWatches.open(kube)
        stack.callback(watches.stop)
        kube.apply(zero_manifest())
        for _ in range(args.repeats):
            rows.append(cluster_cold_start(kube, activator, watches))
            print(f"  request -> answer {rows[-1]['request_to_answer_s']:.2f} s", flush=True)
    return {"device": args.device, "runtime": {"runs": local, "summary": summarize(local)},
            "cluster": {"runs": rows, "summary": summarize(rows),
                        "policy": "minReplicas 0, concurrency target 1, stableWindowSeconds 6, "
                                  "scaleToZeroDelaySeconds 6"}}


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


# ===================================================================================== step

STEP_TARGET_RPS = 4.0
STEP_MAX = 4


def step_manifest(metric: str, target: float) -> str:
    spec = {
        "model": {"version": "1", "uri": f"file:///models/{NAME}/1/model.pt"},
        "resources": {"gpu": {"count": 1}},
        "autoscaling": {"minReplicas": 1, "maxReplicas": STEP_MAX, "metric": metric,
                        "target": target, "stableWindowSeconds": 10,
                        "scaleDownDelaySeconds": 4},
    }
    return yaml.safe_dump({"apiVersion": api.API_VERSION, "kind": api.KIND,
                           "metadata": {"name": NAME}, "spec": spec})


def _desired(objects: dict[str, tuple[str, ...]]) -> int:
    return int((objects.get(NAME) or ("0",))[0] or 0)


def _replicas(objects: dict[str, tuple[str, ...]]) -> int:
    return sum(int(f[0] or 0) for f in objects.values())


class StepWatches(ModelWatches):
    def describe(self) -> str:
        return (f"desired {self.model.state()}, deployments {self.deployments.state()}, "
                f"ready pods {sorted(ready_pods(self.pods.state()))}, "
                f"serving {serving(self.slices.state())}; kubectl: "
                + " ".join(w.errors() for w in (self.model, self.deployments, self.pods,
                                                self.slices)))

    def wait_settled(self, replicas: int, what: str) -> None:
        try:
            wait_for(lambda: self.settled(replicas), DEADLINE, what)
        except TimeoutError as error:
            raise TimeoutError(f"{error}: {self.describe()}") from None

    def settled(self, replicas: int) -> bool:
        return (_desired(self.model.state()) == replicas
                and _replicas(self.deployments.state()) == replicas
                and len(ready_pods(self.pods.state())) == replicas
                and len(serving(self.slices.state())) == replicas)


def one_step(watches: StepWatches, load: PacedLoad, low: float, high: float,
             settle_s: float) -> dict[str, Any]:
    """Load at ``low`` until one replica is settled, then ``high``; back to ``low``."""
    load.rate = low
    watches.wait_settled(1, "one replica settled at 1x")
    time.sleep(settle_s)  # a whole stable window at 1x
    before = _desired(watches.model.state())
    want = min(STEP_MAX, math.ceil(high / STEP_TARGET_RPS))
    stepped = time.monotonic()
    load.rate = high
    watches.wait_settled(want, f"{want} replicas serving")
    up = {
        "replicas_before": before, "replicas_after": want,
        "decision_s": watches.model.first(stepped, lambda o: _desired(o) > before),
        "decision_final_s": watches.model.first(stepped, lambda o: _desired(o) >= want),
        "deployment_s": watches.deployments.first(stepped, lambda o: _replicas(o) > before),
        "first_ready_s": watches.pods.first(stepped, lambda o: len(ready_pods(o)) > before),
        "all_ready_s": watches.pods.first(stepped, lambda o: len(ready_pods(o)) >= want),
        "first_serving_s": watches.slices.first(stepped, lambda o: len(serving(o)) > before),
        "all_serving_s": watches.slices.first(stepped, lambda o: len(serving(o)) >= want),
    }
    dropped = time.monotonic()
    load.rate = low
    watches.wait_settled(1, "back to one replica")
    down = {"down_decision_s": watches.model.first(dropped, lambda o: _desired(o) < want),
            "down_at_one_s": watches.model.first(dropped, lambda o: _desired(o) == 1)}
    out: dict[str, Any] = {}
    for key, value in (up | down).items():
        start = dropped if key.startswith("down") else stepped
        out[key] = value - start if isinstance(value, float) else value
    return out


def step_part(env: Environment, args: argparse.Namespace) -> dict[str, Any]:
    from modelyard.operator.runner import OperatorThread

    low, high = STEP_TARGET_RPS, 4 * STEP_TARGET_RPS
    print(f"step: rps {low:g} -> {high:g} (target {STEP_TARGET_RPS:g} per replica), "
          f"{args.repeats} times", flush=True)
    runs = []
    with fresh_namespace(env.cluster, "step") as namespace, as_operator(env.cluster), \
            OperatorThread(namespaces=[namespace]):
        kube = Kube(env.cluster, namespace)
        watches = StepWatches.open(kube)
        load = PacedLoad(lambda: serving(watches.slices.state()), NAME, SIZE)
        try:
            kube.apply(step_manifest("rps", STEP_TARGET_RPS))
            load.start()
            for index in range(args.repeats):
                runs.append(one_step(watches, load, low, high, settle_s=12))
                print(f"  {index + 1}: decision {runs[-1]['decision_s']:.2f} s, all serving "
                      f"{runs[-1]['all_serving_s']:.2f} s", flush=True)
        finally:
            load.stop.set()
            load.join(30)
            watches.stop()
    tick = os.environ.get("MODELYARD_AUTOSCALE_TICK_SECONDS", "2")
    return {"metric": "rps", "target_per_replica": STEP_TARGET_RPS, "load_rps": [low, high],
            "policy": "stableWindowSeconds 10 (panic window 1 s), scaleDownDelaySeconds 4, "
                      f"replicas 1..{STEP_MAX}, autoscaler tick {tick} s",
            "requests_ok": load.ok, "requests_failed": load.failed, "runs": runs,
            "summary": summarize(runs)}


# ================================================================================== running


@dataclass
class Environment:
    model_path: Path
    workdir: Path
    cluster: Any = None  # a started LocalCluster when a cluster part runs


@contextlib.contextmanager
def local_cluster(models: Path, workdir: Path) -> Iterator[Any]:
    from modelyard.operator.devcluster import ClusterConfig, LocalCluster, NodePool
    from modelyard.operator.devcluster.pods import PodProcesses

    pools = (NodePool("gpu-h100", count=1, gpus=8, gpu_product="NVIDIA-H100-80GB-HBM3"),)
    with LocalCluster(ClusterConfig(topology=pools, real_pods=True)) as cluster:
        install_crd(cluster)
        pods = PodProcesses(cluster, models_dir=models, log_dir=workdir / "pods",
                            max_backoff_s=2)
        pods.start()
        try:
            yield cluster
        finally:
            pods.stop()


def summarize(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Median, min and max of every numeric field over the runs."""
    out: dict[str, dict[str, float]] = {}
    for key in runs[0] if runs else ():
        values = [r[key] for r in runs if isinstance(r.get(key), int | float)
                  and not math.isnan(r[key])]
        if values:
            out[key] = {"median": statistics.median(values), "min": min(values),
                        "max": max(values), "n": len(values)}
    return out


def _cell(summary: dict[str, dict[str, float]], key: str) -> str:
    s = summary.get(key)
    if not s:
        return "—"
    if s["n"] == 1 or s["min"] == s["max"]:
        return f"{s['median']:.2f}"
    return f"{s['median']:.2f} ({s['min']:.2f}..{s['max']:.2f})"


def render_markdown(results: dict[str, Any]) -> str:
    lines = [f"# Autoscaling benchmark, {results['when']}", "",
             f"{results['machine']}. Wall-clock figures on a shared machine are indicative; "
             "cells are median (min..max) over the repeats, in seconds.", ""]
    if "coldstart" in results:
        cold = results["coldstart"]
        local, cluster = cold["runtime"]["summary"], cold["cluster"]["summary"]
        lines += [f"## Cold start of the benchmark model (ResNet-18, 3x{SIZE}x{SIZE}, "
                  f"{cold['device']})", "",
                  "The runtime alone (`python -m modelyard.runtime` on loopback):", "",
                  "| spawn → listening | → model ready | of which load | of which warm-up "
                  "| ready → 1st answer | **spawn → 1st answer** |", "|---|---|---|---|---|---|",
                  "| " + " | ".join(_cell(local, k) for k in (
                      "spawn_to_listening_s", "listening_to_ready_s", "model_load_s",
                      "warmup_s", "ready_to_first_answer_s", "spawn_to_first_answer_s"))
                  + " |", "",
                  "End to end on the local cluster, with the real operator and activator: a "
                  "request to the model's Service while the model is at zero pods (the Service "
                  "then leads to the activator), until its answer. "
                  f"{cold['cluster']['policy']}. The operator writes "
                  "`status.autoscaler` just after it scales the Deployment "
                  f"({_cell(cluster, 'sent_to_status_s')} s after the request was sent).", "",
                  "| sent → held by the activator | → Deployment scaled 0 → 1 by the operator "
                  "| → pod created | → scheduled | → Running | → Ready (runtime start + load) "
                  "| Ready → answer | **request → answer** |",
                  "|---|---|---|---|---|---|---|---|",
                  "| " + " | ".join(_cell(cluster, k) for k in (
                      "sent_to_held_s", "sent_to_scaled_s", "scaled_to_pod_created_s",
                      "created_to_scheduled_s", "scheduled_to_running_s", "running_to_ready_s",
                      "ready_to_answer_s",
                      "request_to_answer_s")) + " |", ""]
    if "step" in results:
        step = results["step"]
        s = step["summary"]
        low, high = step["load_rps"]
        lines += [f"## Load step on the local cluster ({step['metric']} {low:g} → {high:g}/s, "
                  f"target {step['target_per_replica']:g}/s per replica)", "",
                  f"{step['policy']}. Requests answered {step['requests_ok']}, failed "
                  f"{step['requests_failed']}. Seconds from the load step:", "",
                  "| decision | decision at final | Deployment replicas | first new pod Ready "
                  "| all Ready | first new pod serving | **all serving** | load drop → "
                  "scale-down decision | → back at 1 |", "|---|---|---|---|---|---|---|---|---|",
                  "| " + " | ".join(_cell(s, k) for k in (
                      "decision_s", "decision_final_s", "deployment_s", "first_ready_s",
                      "all_ready_s", "first_serving_s", "all_serving_s", "down_decision_s",
                      "down_at_one_s")) + " |", ""]
    if "trace" in results:
        trace = results["trace"]
        lines += ["## Load traces through `autoscale.decide` (simulated)", "",
                  f"Policy: {trace['policy']}; one decision every {trace['tick_s']:g} s; a new "
                  f"replica is ready {trace['ready_delay_s']:.1f} s after the decision "
                  f"({trace['ready_delay_source']}).", "",
                  "| trace | load (x target) | over replica-s (% of ideal) | under replica-s "
                  "(% of ideal) | direction changes | time to follow each step: decided / "
                  "ready |", "|---|---|---|---|---|---|"]
        for row in trace["traces"]:
            follow = "; ".join(
                f"{f['from']}→{f['to']} at {f['at_s']:.0f} s: {_secs(f['decided_s'])} / "
                f"{_secs(f['ready_s'])}" for f in row["follow"]) or "—"
            lines.append(f"| {row['trace']} | {row['load_x_target']} | "
                         f"{row['over_replica_s']:.0f} ({row['over_pct']:.1f} %) | "
                         f"{row['under_replica_s']:.0f} ({row['under_pct']:.1f} %) | "
                         f"{row['direction_changes']} | {follow} |")
        lines.append("")
    if results.get("gpu"):
        lines += [f"GPU: {results['gpu']}", ""]
    return "\n".join(lines)


def _secs(value: float | None) -> str:
    return "never" if value is None else f"{value:.0f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", action="append", choices=PARTS,
                        help="run only this part (repeatable); default: all")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ready-delay", type=float, default=None,
                        help="seconds from decision to a ready replica in the trace "
                             "simulation (default: the measured cold start)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda, for the runtime alone")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    parts = [p for p in PARTS if p in (args.part or PARTS)]
    workdir = Path(tempfile.mkdtemp(prefix="modelyard-bench-autoscale-"))
    models = workdir / "models"
    results: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%d %H:%M"), "parts": parts,
        "machine": f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}",
        "gpu": _gpu_note(args.device),
    }
    env = Environment(models / NAME / "1" / "model.pt", workdir)
    with contextlib.ExitStack() as stack:
        if {"coldstart", "step"} & set(parts):
            bench_model.build(env.model_path, SIZE, format="torchscript")  # legacy, as run
            env.cluster = stack.enter_context(local_cluster(models, workdir))
        if "coldstart" in parts:
            results["coldstart"] = coldstart_part(env, args)
        if "step" in parts:
            results["step"] = step_part(env, args)
    if "trace" in parts:
        delay, source = ((args.ready_delay, "--ready-delay") if args.ready_delay is not None
                         else measured_ready_delay(results))
        results["trace"] = trace_part(delay, source)
    text = render_markdown(results)
    print("\n" + text)
    write_results(args.out, "autoscale", results, text)


def _gpu_note(device: str) -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}; runtime cold start measured on {device}"
    return "no CUDA GPU on this machine: the cold start is CPU only"


if __name__ == "__main__":
    main()

"""The serving-runtime benchmark: modelyard against the raw limit, plain FastAPI and peers.

    .venv/bin/python -m bench.runtime                # everything, ~30 min on 2 cores
    .venv/bin/python -m bench.runtime --servers modelyard,fastapi --duration 10
    .venv/bin/python -m bench.runtime --formats aoti,export,torchscript

Method (so runs are comparable): the same ResNet-18 (plain torch, fixed random
weights, 3xSIZExSIZE, ``modelyard.runtime.demo``) everywhere, in the formats of
``--formats``: ``aoti`` (an AOTInductor package made by ``modelyard convert``, batch
1 to 32, compiled once and cached), ``export`` (the ``torch.export`` program it is
made from) and, on request, the legacy ``torchscript``. modelyard serves each format;
the peers and plain FastAPI serve the first one, loaded the way ``bench/raw.py``
loads it. Each format has its own raw limit (``bench/raw.py``: the model called
directly in-process; an AOTInductor package through its C++ loader, as the runtime
calls it), and each server is measured against the raw limit of the format it
serves. Each server with all its
processes pinned to core 0 (``taskset``; one torch/OMP thread), the load
generator pinned to core 1; closed loop at each concurrency level, warm-up then
the measured window; batching 16 / 5 ms wherever a server has it; the batch
sizes each server actually ran are logged; servers run one after another, and
the sweep is repeated in reverse order (figures are the mean of both passes).
Also reported: the raw in-process limit (core 0, one thread, best batch size),
idle memory and idle CPU of each server's process tree, and the time from
launch to its first successful inference. Peers live in their own venvs
(``bench/peers.py``); one that cannot be installed or started is listed with
the reason. Nothing here asserts: it prints a table and writes it to
``bench/results/``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import torch

from bench import model as bench_model
from bench import write_results
from bench.peers import PEERS, ensure_venv, version_of
from modelyard.operator.devcluster.ports import reserve_port

ROOT = Path(__file__).resolve().parent.parent
SERVERS_DIR = ROOT / "bench" / "servers"
CACHE = Path.home() / ".cache" / "modelyard" / "bench"
SERVER_CORE, CLIENT_CORE = "0", "1"
ALL_SERVERS = ("modelyard", "fastapi", "kserve", "mlserver", "litserve", "torchserve")
FORMATS = ("aoti", "export", "torchscript")
AOTI_MAX_BATCH = 32  # the largest batch bench/raw.py measures
PAYLOADS = {
    "modelyard": ("binary", "json"),
    "fastapi": ("json",),
}


# payloads ---------------------------------------------------------------------------------
def make_bodies(size: int, workdir: Path) -> dict[str, tuple[Path, dict[str, str]]]:
    """One single-item request body per payload kind (the same tensor in both)."""
    x = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    json_body = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "FP32",
                    "shape": list(x.shape),
                    "data": x.reshape(-1).tolist(),
                }
            ]
        }
    ).encode()
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "FP32",
                    "shape": list(x.shape),
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    )
    bodies = {
        "json": (json_body, {"Content-Type": "application/json"}),
        "binary": (
            header + x.tobytes(),
            {
                "Content-Type": "application/octet-stream",
                "Inference-Header-Content-Length": str(len(header)),
            },
        ),
    }
    out = {}
    for kind, (body, headers) in bodies.items():
        path = workdir / f"body-{kind}.bin"
        path.write_bytes(body)
        out[kind] = (path, headers)
    return out


# process tree measurements ------------------------------------------------------------------
def _group_pids(pgid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:
                pids.append(int(entry.name))
    return pids


def group_rss_mb(pgid: int) -> float:
    total = 0
    for pid in _group_pids(pgid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total / 1024


def group_cpu_seconds(pgid: int) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in _group_pids(pgid):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / ticks


# servers -------------------------------------------------------------------------------------
@dataclass
class Running:
    name: str
    process: subprocess.Popen[bytes]
    urls: dict[str, str]  # payload kind -> inference URL
    batch_log: Path
    metrics_url: str | None = None
    log_path: Path | None = None
    ttfi_s: float = float("nan")

    def batches(self) -> tuple[float, float]:
        """(sum of items, number of forward passes) so far."""
        if self.metrics_url:
            text = httpx.get(self.metrics_url, timeout=10).text
            values = {}
            for line in text.splitlines():
                for key in ("modelyard_batch_size_sum", "modelyard_batch_size_count"):
                    if line.startswith(key):
                        values[key] = float(line.split()[-1])
            return values.get("modelyard_batch_size_sum", 0), values.get(
                "modelyard_batch_size_count", 0
            )
        if not self.batch_log.exists():
            return 0.0, 0.0
        sizes = [int(s) for s in self.batch_log.read_text().split()]
        return float(sum(sizes)), float(len(sizes))


@dataclass
class Environment:
    models: dict[str, Path]  # format -> file; the first format is what the peers serve
    size: int
    workdir: Path
    pythons: dict[str, Path] = field(default_factory=dict)

    @property
    def peer_format(self) -> str:
        return next(iter(self.models))


def served_format(name: str, env: Environment) -> str:
    """``modelyard/aoti`` serves aoti; every other server the peers' format."""
    return name.split("/", 1)[1] if name.startswith("modelyard/") else env.peer_format


def build_models(size: int, formats: list[str]) -> dict[str, Path]:
    """The demo ResNet-18 in each format, cached (an AOTInductor package per torch version:
    it is compiled for this machine's CPU by ``modelyard convert``, verified against the
    exported program, ~1 min on two cores the first time)."""
    files = {
        "export": f"resnet18-{size}.pt2",
        "aoti": f"resnet18-{size}-aoti-b{AOTI_MAX_BATCH}-torch{torch.__version__}.pt2",
        "torchscript": f"resnet18-{size}.pt",
    }
    models = {}
    for fmt in formats:
        path = CACHE / files[fmt]
        if not path.exists():
            print(f"building the {fmt} model…", flush=True)
        started = time.monotonic()
        models[fmt] = bench_model.build(path, size, format=fmt, max_batch=AOTI_MAX_BATCH)
        if time.monotonic() - started > 1:
            print(f"  {models[fmt]} in {time.monotonic() - started:.0f} s", flush=True)
    return models


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELYARD_")}
    env.update(
        {
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "PYTHONPATH": str(SERVERS_DIR),
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


def launch(name: str, env: Environment) -> Running:  # noqa: PLR0915
    port = reserve_port()
    base = f"http://127.0.0.1:{port}"
    work = env.workdir / name.replace("/", "-")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    batch_log = work / "batches.log"
    fmt = served_format(name, env)
    model = str(env.models[fmt])
    extra = {
        "BENCH_BATCH_LOG": str(batch_log),
        "BENCH_MODEL_PATH": model,
        "BENCH_MODEL_FORMAT": fmt,
    }
    v2 = f"{base}/v2/models/resnet/infer"
    metrics_url = None
    if name.startswith("modelyard/"):
        command = [sys.executable, "-m", "modelyard.runtime"]
        extra.update(
            {
                "MODELYARD_MODEL_NAME": "resnet",
                "MODELYARD_MODEL_URI": model,
                "MODELYARD_MODEL_FORMAT": fmt,
                "MODELYARD_HOST": "127.0.0.1",
                "MODELYARD_PORT": str(port),
                "MODELYARD_MAX_BATCH_SIZE": "16",
                "MODELYARD_MAX_DELAY_MS": "5",
                "MODELYARD_THREADS": "1",
                "MODELYARD_DEVICE": "cpu",
                "MODELYARD_LOG_LEVEL": "warning",
            }
        )
        urls = {"json": v2, "binary": v2}
        metrics_url = f"{base}/metrics"
    elif name == "fastapi":
        command = [sys.executable, str(SERVERS_DIR / "fastapi_plain.py"), model, str(port)]
        urls = {"json": v2}
    elif name == "kserve":
        python = env.pythons[name]
        command = [
            str(python),
            str(SERVERS_DIR / "kserve_server.py"),
            model,
            str(port),
            str(reserve_port()),
        ]
        urls = {"json": v2, "binary": v2}
    elif name == "mlserver":
        python = env.pythons[name]
        model_dir = work / "models" / "resnet"
        model_dir.mkdir(parents=True)
        (work / "models" / "settings.json").write_text(
            json.dumps(
                {
                    "http_port": port,
                    "grpc_port": reserve_port(),
                    "metrics_port": reserve_port(),
                    "debug": False,
                    "parallel_workers": 1,
                }
            )
        )
        (model_dir / "model-settings.json").write_text(
            json.dumps(
                {
                    "name": "resnet",
                    "implementation": "mlserver_model.ResNet",
                    "max_batch_size": 16,
                    "max_batch_time": 0.005,
                }
            )
        )
        command = [str(python.with_name("mlserver")), "start", str(work / "models")]
        urls = {"json": v2}
    elif name == "litserve":
        python = env.pythons[name]
        command = [str(python), str(SERVERS_DIR / "litserve_server.py"), model, str(port)]
        urls = {"json": f"{base}/predict"}
    elif name == "torchserve":
        python = env.pythons[name]
        store = work / "store"
        store.mkdir()
        served = work / Path(model).name  # the handler loads it by this name
        shutil.copy(model, served)
        subprocess.run(
            [
                str(python.with_name("torch-model-archiver")),
                "--model-name",
                "resnet",
                "--version",
                "1.0",
                "--serialized-file",
                str(served),
                "--handler",
                str(SERVERS_DIR / "torchserve_handler.py"),
                "--export-path",
                str(store),
                "--force",
            ],
            check=True,
            capture_output=True,
            timeout=300,
            env=_env({}),
        )
        models = {
            "resnet": {
                "1.0": {
                    "defaultVersion": True,
                    "marName": "resnet.mar",
                    "minWorkers": 1,
                    "maxWorkers": 1,
                    "batchSize": 16,
                    "maxBatchDelay": 5,
                    "responseTimeout": 120,
                }
            }
        }
        config = work / "config.properties"
        config.write_text(
            "\n".join(
                [
                    f"inference_address=http://127.0.0.1:{port}",
                    f"management_address=http://127.0.0.1:{reserve_port()}",
                    f"metrics_address=http://127.0.0.1:{reserve_port()}",
                    f"model_store={store}",
                    "load_models=resnet.mar",
                    f"models={json.dumps(models)}",
                    "default_workers_per_model=1",
                    "disable_token_authorization=true",
                    "enable_envvars_config=false",
                    "install_py_dep_per_model=false",
                    "max_request_size=10000000",
                    "max_response_size=10000000",
                    "",
                ]
            )
        )
        command = [
            str(python.with_name("torchserve")),
            "--start",
            "--foreground",
            "--ncs",
            "--model-store",
            str(store),
            "--ts-config",
            str(config),
            "--disable-token-auth",
        ]
        extra["PATH"] = f"{python.parent}:{os.environ.get('PATH', '')}"
        urls = {"json": f"{base}/predictions/resnet"}
    else:
        raise ValueError(name)
    log_path = work / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            ["taskset", "-c", SERVER_CORE, *command],
            env=_env(extra),
            cwd=work,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Running(name, process, urls, batch_log, metrics_url, log_path)


def stop(running: Running) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(running.process.pid, signal.SIGTERM)
    try:
        running.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(running.process.pid, signal.SIGKILL)
        running.process.wait(timeout=30)
    deadline = time.monotonic() + 20  # children (workers, the JVM) leave with the group
    while _group_pids(running.process.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(running.process.pid, signal.SIGKILL)


def wait_first_inference(
    running: Running,
    bodies: dict[str, tuple[Path, dict[str, str]]],
    started: float,
    timeout: float = 300,
) -> None:
    kind = "json" if "json" in running.urls else next(iter(running.urls))
    body_path, headers = bodies[kind]
    body = body_path.read_bytes()
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if running.process.poll() is not None:
            break
        try:
            response = httpx.post(running.urls[kind], content=body, headers=headers, timeout=30)
            if response.status_code == 200:
                running.ttfi_s = time.monotonic() - started
                return
            last = f"HTTP {response.status_code}: {response.text[:200]}"
        except httpx.HTTPError as error:
            last = type(error).__name__
        time.sleep(0.1)
    log = running.log_path.read_text(errors="replace")[-1500:] if running.log_path else ""
    raise RuntimeError(f"{running.name} never answered an inference ({last}); log tail:\n{log}")


def loadgen(  # noqa: PLR0917
    url: str, body: Path, headers: dict[str, str], concurrency: int, warmup: float, duration: float
) -> dict[str, object]:
    command = [
        "taskset",
        "-c",
        CLIENT_CORE,
        sys.executable,
        "-m",
        "bench.loadgen",
        url,
        str(body),
        str(concurrency),
        str(warmup),
        str(duration),
        *[f"{k}={v}" for k, v in headers.items()],
    ]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=warmup + duration + 300,
        check=False,
    )
    if result.returncode != 0:
        return {
            "requests": 0,
            "errors": -1,
            "items_per_s": 0.0,
            "p50_ms": float("nan"),
            "p99_ms": float("nan"),
            "first_error": result.stderr[-300:],
        }
    return dict(orjson.loads(result.stdout.strip().splitlines()[-1]))


# the run ------------------------------------------------------------------------------------
def run_server(  # noqa: PLR0917
    name: str,
    env: Environment,
    bodies: dict[str, tuple[Path, dict[str, str]]],
    levels: list[int],
    warmup: float,
    duration: float,
    results: dict[str, object],
) -> None:
    print(f"  {name}: starting", flush=True)
    started = time.monotonic()
    running = launch(name, env)
    try:
        wait_first_inference(running, bodies, started)
        time.sleep(3)
        idle_cpu0 = group_cpu_seconds(running.process.pid)
        time.sleep(5)
        idle_cpu = (group_cpu_seconds(running.process.pid) - idle_cpu0) / 5 * 100
        info = results.setdefault(name, {"runs": {}})
        assert isinstance(info, dict)
        info.setdefault("ttfi_s", []).append(running.ttfi_s)
        info.setdefault("idle_mb", []).append(group_rss_mb(running.process.pid))
        info.setdefault("idle_cpu_pct", []).append(idle_cpu)
        for kind in running.urls:
            body, headers = bodies[kind]
            for level in levels:
                before = running.batches()
                outcome = loadgen(running.urls[kind], body, headers, level, warmup, duration)
                after = running.batches()
                passes = after[1] - before[1]
                outcome["mean_batch"] = (after[0] - before[0]) / passes if passes else float("nan")
                info["runs"].setdefault(f"{kind}@{level}", []).append(outcome)
                print(
                    f"    {kind:6} c={level:<3} {outcome['items_per_s']:8.1f} items/s  "
                    f"p50 {outcome['p50_ms']:8.1f} ms  p99 {outcome['p99_ms']:8.1f} ms  "
                    f"batch {outcome['mean_batch']:5.1f}  errors {outcome['errors']}"
                    + (f"  ({outcome['first_error']})" if outcome["first_error"] else ""),
                    flush=True,
                )
    except Exception as error:  # a peer that fails to start is reported, not dropped
        results.setdefault("_failed", {})[name] = str(error)[:2000]  # type: ignore[index]
        print(f"  {name}: FAILED: {str(error)[:500]}", flush=True)
    finally:
        stop(running)


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not np.isnan(v)]
    return statistics.fmean(finite) if finite else float("nan")


FORMAT_NOTES = {
    "aoti": f"AOTInductor package from modelyard convert, batch 1-{AOTI_MAX_BATCH}",
    "export": "torch.export program",
    "torchscript": "TorchScript, legacy",
}


def _label(name: str, versions: dict[str, str]) -> str:
    if name.startswith("modelyard/"):
        return f"modelyard {versions.get('modelyard', '')} {name.split('/', 1)[1]}"
    return f"{name} {versions.get(name, '')}".strip()


def render(
    results: dict[str, object],
    raws: dict[str, dict[str, Any]],
    args: argparse.Namespace,
    versions: dict[str, str],
    skipped: dict[str, str],
) -> str:
    levels = args.levels
    peer_format = args.formats[0]
    lines = [
        f"modelyard runtime benchmark — ResNet-18 (plain torch, fixed random weights), "
        f"input 3x{args.size}x{args.size}, CPU",
        f"{time.strftime('%Y-%m-%d %H:%M')} · {platform.processor() or platform.machine()} · "
        f"{os.cpu_count()} cores · python {platform.python_version()} · torch "
        f"{torch.__version__}",
        f"servers pinned to core {SERVER_CORE} (1 torch/OMP thread), load generator on core "
        f"{CLIENT_CORE}; closed loop; {args.warmup:g} s warm-up + {args.duration:g} s measured "
        f"per level; {args.passes} pass(es), the second in reverse order; figures are means "
        f"over passes; batching 16 / 5 ms where supported; single-item requests",
        f"load average (1 min) at the start {args.load_start:.1f}, at the end "
        f"{os.getloadavg()[0]:.1f} (other work on the machine slows every figure)",
        "model formats: "
        + "; ".join(f"{f} ({FORMAT_NOTES[f]})" for f in args.formats)
        + f"; modelyard serves each, the other servers serve {peer_format}",
        "",
    ]
    for fmt in args.formats:
        raw = raws[fmt]
        lines += [
            f"raw in-process limit, {fmt} (core {SERVER_CORE}, one thread; mean of before and "
            f"after the sweep: {raw['before']['best_items_per_s']:.1f} and "
            f"{raw['after']['best_items_per_s']:.1f}): best {raw['best_items_per_s']:.1f} "
            f"items/s at batch {raw['best_batch']}; batch-1 forward {raw['batch1_ms']:.1f} ms "
            f"({1000 / raw['batch1_ms']:.1f}/s)",
            "  per batch size: "
            + ", ".join(f"b{b}={v:.1f}" for b, v in raw["items_per_s"].items()),
        ]
    lines.append("")
    shown = [n for n in args.server_order if n in results and n != "_failed"]
    width = max([22, *(len(_label(n, versions)) + 2 for n in shown)])
    header = f"{'server':<{width}}{'payload':<8}"
    for level in levels:
        header += f"| c={level:<3} items/s   p50 ms   p99 ms  batch "
    header += "| eff@max | idle MB | idle CPU% | 1st inference s"
    lines.append(header)
    lines.append("-" * len(header))
    table: dict[tuple[str, str, int], float] = {}
    p50s: dict[tuple[str, str, int], float] = {}
    for name in shown:
        info = results[name]
        assert isinstance(info, dict)
        raw_best = float(raws[args.server_formats[name]]["best_items_per_s"])
        kinds = sorted({key.split("@")[0] for key in info["runs"]}, key=lambda k: k != "binary")
        for kind in kinds:
            row = f"{_label(name, versions):<{width}}{kind:<8}"
            for level in levels:
                runs = info["runs"].get(f"{kind}@{level}", [])
                ips = _mean([r["items_per_s"] for r in runs])
                p50 = _mean([r["p50_ms"] for r in runs])
                p99 = _mean([r["p99_ms"] for r in runs])
                batch = _mean([r["mean_batch"] for r in runs])
                errors = sum(int(r["errors"]) for r in runs)
                table[(name, kind, level)] = ips
                p50s[(name, kind, level)] = p50
                row += f"| {ips:13.1f} {p50:8.1f} {p99:8.1f} {batch:5.1f}" + (
                    "!" if errors else " "
                )
            top = table[(name, kind, levels[-1])] / raw_best
            row += (
                f"| {top:7.2f} | {_mean(info['idle_mb']):7.0f} | "
                f"{_mean(info['idle_cpu_pct']):9.1f} | {_mean(info['ttfi_s']):6.1f}"
            )
            lines.append(row)
    lines.append("")
    lines.append(
        "eff@max = items/s at the highest concurrency ÷ the raw limit of the format that "
        "server serves; '!' = some requests failed in that cell; batch = mean items per "
        "forward pass"
    )
    failed = results.get("_failed", {})
    assert isinstance(failed, dict)
    for name, why in {**skipped, **failed}.items():
        lines.append(f"not measured: {name}: {why.splitlines()[0][:300]}")
    lines += ["", *verdicts(table, p50s, results, raws, args)]
    return "\n".join(lines) + "\n"


def verdicts(
    table: dict[tuple[str, str, int], float],
    p50s: dict[tuple[str, str, int], float],
    results: dict[str, object],
    raws: dict[str, dict[str, Any]],
    args: argparse.Namespace,
) -> list[str]:
    levels = args.levels
    top = levels[-1]
    ours = [n for n in args.server_order if n.startswith("modelyard/") and n in results]
    out = ["targets (measured, not asserted):"]
    for name in ours:
        fmt = args.server_formats[name]
        raw = raws[fmt]
        for kind, target in (("binary", 0.90), ("json", 0.75)):
            value = table.get((name, kind, top))
            if value is not None:
                share = value / raw["best_items_per_s"]
                out.append(
                    f"  {name} {kind} at c={top}: {share:.2f} of raw {fmt} "
                    f"{raw['best_items_per_s']:.1f} items/s (target ≥ {target:.2f}) — "
                    f"{'met' if share >= target else 'MISSED'}"
                )
        if 1 in levels:
            for kind in ("binary", "json"):
                p50 = p50s.get((name, kind, 1))
                if p50 is None:
                    continue
                ratio = p50 / raw["batch1_ms"]
                out.append(
                    f"  {name} c=1 {kind}: p50 {p50:.1f} ms = x{ratio:.2f} of one batch-1 "
                    f"{fmt} forward {raw['batch1_ms']:.1f} ms (target ≤ x1.15) — "
                    f"{'met' if ratio <= 1.15 else 'MISSED'}"
                )
    for level in [lv for lv in levels if lv >= 8]:
        peers = {
            (n, k): v
            for (n, k, lv), v in table.items()
            if not n.startswith("modelyard/") and lv == level
        }
        if not peers:
            continue
        (best_name, best_kind), best = max(peers.items(), key=lambda item: item[1])
        for name in ours:
            mine = max(
                (v for (n, _, lv), v in table.items() if n == name and lv == level),
                default=float("nan"),
            )
            out.append(
                f"  c={level}: {name} {mine:.1f} items/s vs best other "
                f"{best_name}/{best_kind} ({args.formats[0]}) {best:.1f} → x{mine / best:.2f}"
            )
    peers_mb = {
        n: _mean(v["idle_mb"])
        for n, v in results.items()
        if isinstance(v, dict)
        and not n.startswith("modelyard/")
        and n not in ("_failed", "fastapi")
        and "idle_mb" in v
    }
    for name in ours:
        info = results[name]
        if peers_mb and isinstance(info, dict):
            ours_mb = _mean(info["idle_mb"])
            lightest = min(peers_mb, key=lambda n: peers_mb[n])
            met = "met" if ours_mb < peers_mb[lightest] else "MISSED"
            out.append(
                f"  idle memory: {name} {ours_mb:.0f} MB vs lightest peer {lightest} "
                f"{peers_mb[lightest]:.0f} MB — {met}"
            )
    if len(args.formats) > 1:
        base = args.formats[-1]
        out.append(f"formats (raw, against {base}; not a target):")
        for fmt in args.formats[:-1]:
            a, b = raws[fmt], raws[base]
            out.append(
                f"  {fmt}: best x{a['best_items_per_s'] / b['best_items_per_s']:.2f} "
                f"({a['best_items_per_s']:.1f} vs {b['best_items_per_s']:.1f} items/s), "
                f"batch 1 x{b['batch1_ms'] / a['batch1_ms']:.2f} "
                f"({a['batch1_ms']:.1f} vs {b['batch1_ms']:.1f} ms)"
            )
    return out


def measure_raw(model_path: Path, size: int, fmt: str) -> dict[str, Any]:
    """The raw limit of one format on the server core (measured before and after the sweep)."""
    print(f"raw limit, {fmt}…", flush=True)
    command = [
        "taskset",
        "-c",
        SERVER_CORE,
        sys.executable,
        "-m",
        "bench.raw",
        str(model_path),
        str(size),
        "4",
        "--format",
        fmt,
    ]
    run = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, check=True, env=_env({}), timeout=900
    )
    raw: dict[str, Any] = orjson.loads(run.stdout.strip().splitlines()[-1])
    print(
        f"  best {raw['best_items_per_s']:.1f} items/s at batch {raw['best_batch']}, "
        f"batch-1 {raw['batch1_ms']:.1f} ms",
        flush=True,
    )
    return raw


def combine_raw(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Mean of the two raw measurements (the machine drifts by several percent)."""
    per_batch = {
        b: (before["items_per_s"][b] + after["items_per_s"][b]) / 2 for b in before["items_per_s"]
    }
    best = max(per_batch, key=lambda b: per_batch[b])
    return {
        "items_per_s": per_batch,
        "best_batch": best,
        "best_items_per_s": per_batch[best],
        "batch1_ms": (before["batch1_ms"] + after["batch1_ms"]) / 2,
        "before": before,
        "after": after,
    }


def _formats(text: str) -> list[str]:
    formats = [f for f in text.split(",") if f]
    unknown = set(formats) - set(FORMATS)
    if unknown or not formats:
        raise argparse.ArgumentTypeError(f"formats are {', '.join(FORMATS)}")
    return formats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument(
        "--levels", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32]
    )
    parser.add_argument("--servers", type=lambda s: s.split(","), default=list(ALL_SERVERS))
    parser.add_argument(
        "--formats",
        type=_formats,
        default=["aoti", "export"],
        help="model formats (aoti, export, torchscript): modelyard serves "
        "each, the other servers the first (default aoti,export)",
    )
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    if (os.cpu_count() or 1) < 2:
        sys.exit("the benchmark needs two cores: one for the servers, one for the load")

    args.load_start = os.getloadavg()[0]
    models = build_models(args.size, args.formats)
    workdir = Path(tempfile.mkdtemp(prefix="modelyard-bench-"))
    env = Environment(models, args.size, workdir)
    versions = {"modelyard": "0.1.0", "fastapi": ""}
    skipped: dict[str, str] = {}
    for name in args.servers:
        if name in PEERS:
            print(f"preparing {name}…", flush=True)
            python, why = ensure_venv(PEERS[name])
            if python is None:
                skipped[name] = why
            else:
                env.pythons[name] = python
                versions[name] = version_of(python, name)
    args.server_order = [
        expanded
        for name in args.servers
        for expanded in (
            [f"modelyard/{f}" for f in args.formats] if name == "modelyard" else [name]
        )
    ]
    args.server_formats = {name: served_format(name, env) for name in args.server_order}
    servers = [n for n in args.server_order if n not in skipped]
    bodies = make_bodies(args.size, workdir)
    raw_before = {fmt: measure_raw(path, args.size, fmt) for fmt, path in models.items()}
    results: dict[str, object] = {}
    for index in range(args.passes):
        order = servers if index % 2 == 0 else list(reversed(servers))
        print(f"pass {index + 1}: {', '.join(order)}", flush=True)
        for name in order:
            run_server(name, env, bodies, args.levels, args.warmup, args.duration, results)
    raws = {
        fmt: combine_raw(raw_before[fmt], measure_raw(path, args.size, fmt))
        for fmt, path in models.items()
    }
    text = render(results, raws, args, versions, skipped)
    print("\n" + text)
    write_results(args.out, f"runtime-{args.size}", {
        "raw": raws, "results": results, "versions": versions, "skipped": skipped,
        "formats": args.formats, "models": {f: str(p) for f, p in models.items()},
    }, text, suffix="txt")
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()

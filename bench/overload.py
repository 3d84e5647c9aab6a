"""Overload: the runtime driven at twice its capacity, with its queue bounded and without.

    .venv/bin/python -m bench.overload                 # ~4 min on 2 cores
    .venv/bin/python -m bench.overload --duration 20 --factor 2

Method (``bench/runtime.py``'s: the same TorchScript ResNet-18, 3x64x64, the server pinned
to core 0 with one torch thread, the load generator to core 1, batching 16 / 5 ms,
single-item binary requests). For each queue setting a fresh server is started, then:

1. capacity: closed loop at concurrency 32 (the server's best items/s, as
   ``bench.runtime`` measures it), over REST and, on the first server, over gRPC
   (tritonclient's asyncio gRPC client, raw contents) for the gRPC-versus-REST rows;
2. overload: an open loop (arrivals on a fixed schedule, whatever the answers) at
   ``factor`` x that capacity, for ``duration`` seconds. Latency runs from each request's
   scheduled time, so a late client cannot hide queueing (no coordinated omission);
3. capacity again, closed loop: the figure goodput is compared with is the mean of both.

Reported per setting: goodput (answers 200 per second) against the capacity, refusals
(503, 504) per second, p50 and p99 of the accepted requests over the whole window and
over its last third (bounded means the last third is no worse than the whole), and the
server's memory (RSS of its process tree) at the start and the end of the window. On a
shared machine wall-clock capacity drifts with the neighbours' load, so one more figure
does not depend on it: items served per CPU-second of the server's process tree under
overload against the same at capacity (refusing costs CPU; 1.0 means none is lost).
The unbounded queue is the "before": its latency and memory grow for as long as the
overload lasts. Nothing asserts; the table is printed and written to ``bench/results/``.

``--openloop`` and ``--grpcloop`` are the load generators' own entry points (run pinned
by the parent).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any

import orjson

from bench import model as bench_model
from bench import write_results
from bench.loadgen import _Connection
from bench.runtime import (
    CACHE,
    CLIENT_CORE,
    ROOT,
    SERVER_CORE,
    Running,
    _env,
    group_cpu_seconds,
    group_rss_mb,
    loadgen,
    make_bodies,
    stop,
    wait_first_inference,
)
from modelyard.operator.devcluster.ports import reserve_port

SETTINGS: dict[str, dict[str, str]] = {
    "maxItems 256 (default)": {},
    "maxWaitMs 250": {"MODELYARD_MAX_QUEUE_ITEMS": "0", "MODELYARD_MAX_QUEUE_WAIT_MS": "250"},
    "unbounded (before)": {"MODELYARD_MAX_QUEUE_ITEMS": "0"},
}


# the open-loop load generator (a subprocess on the client core) ----------------------------
async def _open_loop(url: str, body: bytes, headers: dict[str, str], rate: float,
                     duration: float) -> dict[str, Any]:
    parsed = urllib.parse.urlsplit(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 80
    head = [f"POST {parsed.path} HTTP/1.1", f"Host: {host}:{port}",
            f"Content-Length: {len(body)}", "Connection: keep-alive",
            *(f"{k}: {v}" for k, v in headers.items())]
    payload = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
    idle: list[_Connection] = []
    codes: dict[str, int] = {}
    accepted: list[tuple[float, float]] = []  # (scheduled offset, latency s)
    start = time.perf_counter()

    async def one(scheduled: float) -> None:
        connection = idle.pop() if idle else _Connection(host, port)
        try:
            status, _ = await connection.request(payload)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            connection.close()
            codes["error"] = codes.get("error", 0) + 1
            return
        idle.append(connection)
        codes[str(status)] = codes.get(str(status), 0) + 1
        if status == 200:
            accepted.append((scheduled - start, time.perf_counter() - scheduled))

    tasks = []
    total = int(rate * duration)
    for index in range(total):
        scheduled = start + index / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(scheduled)))
    sent_s = time.perf_counter() - start
    _, pending = await asyncio.wait(tasks, timeout=max(30.0, duration))
    for task in pending:
        task.cancel()
    for connection in idle:
        connection.close()

    def pct(values: list[float], q: float) -> float:
        values = sorted(values)
        return values[min(len(values) - 1, int(q * len(values)))] * 1000 if values else \
            float("nan")

    latencies = [latency for _, latency in accepted]
    last_third = [latency for offset, latency in accepted if offset >= duration * 2 / 3]
    return {"offered": total, "offered_per_s": total / duration, "sent_s": sent_s,
            "codes": codes, "unanswered": len(pending), "goodput_per_s": len(accepted) / duration,
            "p50_ms": pct(latencies, 0.5), "p99_ms": pct(latencies, 0.99),
            "p99_last_third_ms": pct(last_third, 0.99)}


def _open_loop_main(argv: list[str]) -> None:
    url, body_file, rate, duration, *pairs = argv
    headers = dict(pair.split("=", 1) for pair in pairs)
    body = Path(body_file).read_bytes()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    result = asyncio.run(_open_loop(url, body, headers, float(rate), float(duration)))
    print(orjson.dumps(result).decode(), flush=True)


async def _grpc_loop(target: str, size: int, concurrency: int, warmup: float,
                     duration: float) -> dict[str, Any]:
    import numpy as np
    from tritonclient.grpc import aio as grpcaio

    x = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    latencies: list[float] = []
    errors = 0
    start = time.perf_counter()
    measure_from, stop_at = start + warmup, start + warmup + duration
    async with grpcaio.InferenceServerClient(url=target) as client:
        async def worker() -> None:
            nonlocal errors
            tensor = grpcaio.InferInput("input", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            while (sent := time.perf_counter()) < stop_at:
                try:
                    await client.infer("resnet", [tensor])
                    ok = True
                except Exception:
                    ok = False
                done = time.perf_counter()
                if sent >= measure_from and done <= stop_at:
                    if ok:
                        latencies.append(done - sent)
                    else:
                        errors += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 \
            if latencies else float("nan")

    return {"requests": len(latencies), "errors": errors,
            "items_per_s": len(latencies) / duration, "p50_ms": pct(0.5), "p99_ms": pct(0.99)}


def _grpc_loadgen(target: str, size: int, concurrency: int, duration: float) -> dict[str, Any]:
    command = ["taskset", "-c", CLIENT_CORE, sys.executable, "-m", "bench.overload",
               "--grpcloop", target, str(size), str(concurrency), "3", str(duration)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False,
                            timeout=duration + 300)
    if result.returncode:
        return {"items_per_s": float("nan"), "p50_ms": float("nan"), "p99_ms": float("nan"),
                "errors": -1, "first_error": result.stderr[-300:]}
    return dict(orjson.loads(result.stdout.strip().splitlines()[-1]))


# the run ------------------------------------------------------------------------------------
def _launch(model: Path, workdir: Path, extra: dict[str, str]) -> tuple[Running, str, int]:
    port = reserve_port()
    grpc_port = reserve_port()
    base = f"http://127.0.0.1:{port}"
    log_path = workdir / f"server-{port}.log"
    env = _env({"MODELYARD_MODEL_NAME": "resnet", "MODELYARD_MODEL_URI": str(model),
                "MODELYARD_HOST": "127.0.0.1", "MODELYARD_PORT": str(port),
                "MODELYARD_MAX_BATCH_SIZE": "16", "MODELYARD_MAX_DELAY_MS": "5",
                "MODELYARD_THREADS": "1", "MODELYARD_DEVICE": "cpu",
                "MODELYARD_LOG_LEVEL": "warning", "MODELYARD_GRPC_PORT": str(grpc_port),
                **extra})
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            ["taskset", "-c", SERVER_CORE, sys.executable, "-m", "modelyard.runtime"],
            env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"{base}/v2/models/resnet/infer"
    return Running("modelyard", process, {"binary": url}, workdir / "none", f"{base}/metrics",
                   log_path), url, grpc_port


def _overload(url: str, body: Path, headers: dict[str, str], rate: float, *, duration: float,
              pgid: int) -> dict[str, Any]:
    command = ["taskset", "-c", CLIENT_CORE, sys.executable, "-m", "bench.overload",
               "--openloop", url, str(body), str(rate), str(duration),
               *[f"{k}={v}" for k, v in headers.items()]]
    memory: list[tuple[float, float]] = []
    started = time.monotonic()
    cpu_before = group_cpu_seconds(pgid)
    with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True) as generator:
        while generator.poll() is None:
            memory.append((time.monotonic() - started, group_rss_mb(pgid)))
            time.sleep(0.5)
        out = generator.stdout.read() if generator.stdout else ""
    result: dict[str, Any] = dict(orjson.loads(out.strip().splitlines()[-1]))
    result["cpu_s"] = group_cpu_seconds(pgid) - cpu_before
    window = [mb for t, mb in memory if t <= duration]
    result["rss_start_mb"] = window[1] if len(window) > 1 else float("nan")
    result["rss_end_mb"] = window[-1] if window else float("nan")
    result["rss_max_mb"] = max(mb for _, mb in memory) if memory else float("nan")
    return result


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--openloop":
        _open_loop_main(sys.argv[2:])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--grpcloop":
        target, size, concurrency, warmup, duration = sys.argv[2:7]
        print(orjson.dumps(asyncio.run(_grpc_loop(
            target, int(size), int(concurrency), float(warmup), float(duration)))).decode())
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--factor", type=float, default=2.0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    if (os.cpu_count() or 1) < 2:
        sys.exit("the benchmark needs two cores: one for the server, one for the load")
    model = bench_model.build(CACHE / f"resnet18-{args.size}.pt", args.size,
                              format="torchscript")  # legacy, as its runs were
    workdir = Path(tempfile.mkdtemp(prefix="modelyard-overload-"))
    bodies = make_bodies(args.size, workdir)
    body, headers = bodies["binary"]
    rows: dict[str, dict[str, Any]] = {}
    protocols: dict[str, dict[str, Any]] = {}
    for name, extra in SETTINGS.items():
        print(f"{name}: starting", flush=True)
        running, url, grpc_port = _launch(model, workdir, extra)
        pgid = running.process.pid
        try:
            wait_first_inference(running, bodies, time.monotonic())
            cpu = group_cpu_seconds(pgid)
            capacity = loadgen(url, body, headers, 32, 3.0, 10.0)
            capacity_cpu = group_cpu_seconds(pgid) - cpu
            if not protocols:  # gRPC against REST, same server, one after the other
                protocols["REST (binary)"] = capacity
                protocols["gRPC (raw contents)"] = _grpc_loadgen(
                    f"127.0.0.1:{grpc_port}", args.size, 32, 10.0)
                print(f"  REST {capacity['items_per_s']:.1f} items/s, gRPC "
                      f"{protocols['gRPC (raw contents)']['items_per_s']:.1f} items/s",
                      flush=True)
            rate = args.factor * float(capacity["items_per_s"])  # type: ignore[arg-type]
            print(f"  capacity {capacity['items_per_s']:.1f} items/s; offering {rate:.1f}/s "
                  f"for {args.duration:.0f} s", flush=True)
            row = _overload(url, body, headers, rate, duration=args.duration, pgid=pgid)
            after = loadgen(url, body, headers, 32, 3.0, 10.0)
            row["capacity_before_per_s"] = capacity["items_per_s"]
            row["capacity_after_per_s"] = after["items_per_s"]
            row["capacity_per_s"] = (float(capacity["items_per_s"])  # type: ignore[arg-type]
                                     + float(after["items_per_s"])) / 2  # type: ignore[arg-type]
            served = row["codes"].get("200", 0)
            row["items_per_cpu_s"] = served / row["cpu_s"] if row["cpu_s"] else float("nan")
            # the closed loop ran 3 s of warm-up and 10 s measured, all of it at capacity
            row["capacity_items_per_cpu_s"] = (
                float(capacity["items_per_s"]) * 13.0 / capacity_cpu  # type: ignore[arg-type]
                if capacity_cpu else float("nan"))
            rows[name] = row
            print("  " + json.dumps(row), flush=True)
        finally:
            stop(running)
    text = render(rows, args) + render_protocols(protocols)
    print("\n" + text)
    write_results(args.out, "overload", rows, text)
    shutil.rmtree(workdir, ignore_errors=True)


def render(rows: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"# Overload: {args.factor:g}x capacity for {args.duration:.0f} s "
        f"(ResNet-18 3x{args.size}x{args.size}, binary, batching 16 / 5 ms, server on one "
        "core)", "",
        "| queue | capacity items/s (before, after) | offered/s | goodput/s | "
        "goodput / capacity | served per CPU-s / at capacity | "
        "503/s | 504/s | unanswered | p50 ms | p99 ms | p99 last third ms | "
        "RSS start → end MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        codes = r["codes"]
        efficiency = r["items_per_cpu_s"] / r["capacity_items_per_cpu_s"]
        lines.append(
            f"| {name} | {r['capacity_per_s']:.1f} ({r['capacity_before_per_s']:.1f}, "
            f"{r['capacity_after_per_s']:.1f}) | {r['offered_per_s']:.1f} | "
            f"{r['goodput_per_s']:.1f} | {r['goodput_per_s'] / r['capacity_per_s']:.2f} | "
            f"{efficiency:.2f} | "
            f"{codes.get('503', 0) / args.duration:.1f} | "
            f"{codes.get('504', 0) / args.duration:.1f} | {r['unanswered']} | "
            f"{r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['p99_last_third_ms']:.0f} | "
            f"{r['rss_start_mb']:.0f} → {r['rss_end_mb']:.0f} |")
    lines += ["", "goodput: answers 200 per second of the window; capacity: closed loop at "
              "concurrency 32 just before and just after, on the same server (their mean). "
              "Latency from each request's scheduled send time. Served per CPU-s: items "
              "answered per CPU-second of the server's process tree, overload against "
              "capacity (1.00: refusing costs nothing)."]
    return "\n".join(lines) + "\n"


def render_protocols(rows: dict[str, dict[str, Any]]) -> str:
    lines = ["", "## gRPC beside REST (same server, closed loop, concurrency 32, single-item "
             "requests)", "", "| protocol | items/s | p50 ms | p99 ms | errors |",
             "|---|---|---|---|---|"]
    lines += [f"| {name} | {r['items_per_s']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
              f"{r['errors']} |" for name, r in rows.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

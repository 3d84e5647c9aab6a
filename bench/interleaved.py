"""Raw PyTorch and modelyard in alternating rounds: the headline ratios, with their spread.

    .venv/bin/python -m bench.interleaved                  # 5 rounds, ~7 min
    .venv/bin/python -m bench.interleaved --rounds 9 --duration 8

On a shared machine the raw limit itself drifts by 10-20 % over a few minutes,
so a ratio of two figures measured minutes apart mostly measures the drift.
Here the raw limit (core 0, one thread) is measured once at batch 1, 8, 16 and
32 to pick the best batch size, and then again (batch 1 and the best) between
every two measurements of the running modelyard server (core 0, batching
16 / 5 ms, load generator on core 1) at each concurrency and payload: each cell
is divided by the mean of the raw measurements just before and just after it,
and the report gives the median and min-max of those ratios over the rounds.
Same model, bodies, pinning and load generator as ``bench/runtime.py``; results
go to ``bench/results/interleaved-SIZE-STAMP.{txt,json}``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from bench import model as bench_model
from bench import write_results
from bench.runtime import (
    CACHE,
    ROOT,
    SERVER_CORE,
    Environment,
    _env,
    launch,
    loadgen,
    make_bodies,
    stop,
    wait_first_inference,
)

TARGETS = {"binary": 0.90, "json": 0.75}
LATENCY_TARGET = 1.15


def raw_round(model_path: Path, size: int, seconds: float, batches: str) -> dict[str, Any]:
    command = ["taskset", "-c", SERVER_CORE, sys.executable, "-m", "bench.raw",
               str(model_path), str(size), str(seconds), batches]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True,
                         env=_env({}), timeout=600)
    result: dict[str, Any] = orjson.loads(run.stdout.strip().splitlines()[-1])
    return result


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:  # noqa: PLR0915
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=6.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--raw-seconds", type=float, default=2.0)
    parser.add_argument("--levels", type=lambda s: [int(x) for x in s.split(",")],
                        default=[1, 32])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()

    model_path = bench_model.build(CACHE / f"resnet18-{args.size}.pt", args.size,
                                   format="torchscript")  # legacy, as its runs were
    workdir = Path(tempfile.mkdtemp(prefix="modelyard-interleaved-"))
    env = Environment(model_path, args.size, workdir)
    bodies = make_bodies(args.size, workdir)
    rounds: list[dict[str, Any]] = []
    started = time.monotonic()
    running = launch("modelyard", env)
    try:
        wait_first_inference(running, bodies, started)
        raw = raw_round(model_path, args.size, args.raw_seconds, "1,8,16,32")
        batch = max(("8", "16", "32"), key=lambda b: raw["items_per_s"][b])
        for index in range(args.rounds):
            entry: dict[str, Any] = {"raw": [raw], "cells": {}}
            line = f"round {index + 1} (raw at batch 1 and {batch} around each cell):"
            for kind in ("binary", "json"):
                body, headers = bodies[kind]
                for level in args.levels:
                    cell = loadgen(running.urls[kind], body, headers, level, args.warmup,
                                   args.duration)
                    after = raw_round(model_path, args.size, args.raw_seconds, f"1,{batch}")
                    best = (raw["items_per_s"][batch] + after["items_per_s"][batch]) / 2
                    batch1 = (raw["batch1_ms"] + after["batch1_ms"]) / 2
                    cell["raw_best"], cell["raw_batch1_ms"] = best, batch1
                    cell["throughput_ratio"] = float(cell["items_per_s"]) / best  # type: ignore[arg-type]
                    cell["p50_ratio"] = float(cell["p50_ms"]) / batch1  # type: ignore[arg-type]
                    entry["cells"][f"{kind}@{level}"] = cell
                    entry["raw"].append(after)
                    raw = after
                    line += (f" | {kind} c={level}: {cell['items_per_s']:.1f}/s vs raw "
                             f"{best:.1f} ({cell['throughput_ratio']:.2f}), p50 "
                             f"{cell['p50_ms']:.2f} ms vs {batch1:.2f} (x{cell['p50_ratio']:.2f})")
            print(line, flush=True)
            rounds.append(entry)
    finally:
        stop(running)

    top = args.levels[-1]
    lines = [
        f"modelyard vs raw PyTorch, interleaved — ResNet-18 3x{args.size}x{args.size}, CPU, "
        f"{time.strftime('%Y-%m-%d %H:%M')}",
        f"{args.rounds} rounds of modelyard binary and JSON at "
        f"c={','.join(map(str, args.levels))} ({args.warmup:g} s warm-up + {args.duration:g} s), "
        f"each cell between two raw measurements (batch 1 and {batch}, {args.raw_seconds:g} s "
        f"each); server on core {SERVER_CORE}, one torch thread, batching 16 / 5 ms; "
        "ratios per cell, median (min-max) over rounds",
        "",
    ]
    for kind in ("binary", "json"):
        ratios = [r["cells"][f"{kind}@{top}"]["throughput_ratio"] for r in rounds]
        met = "met" if statistics.median(ratios) >= TARGETS[kind] else "MISSED"
        lines.append(f"  {kind:6} throughput at c={top} / raw best: {_spread(ratios)}  "
                     f"(target >= {TARGETS[kind]:.2f}) — {met}")
    if 1 in args.levels:
        for kind in ("binary", "json"):
            ratios = [r["cells"][f"{kind}@1"]["p50_ratio"] for r in rounds]
            met = "met" if statistics.median(ratios) <= LATENCY_TARGET else "MISSED"
            lines.append(f"  {kind:6} p50 at c=1 / raw batch-1 forward: {_spread(ratios)}  "
                         f"(target <= {LATENCY_TARGET:.2f}) — {met}")
    lines.append("")
    lines.append("raw around the cells (items/s at the best batch; batch-1 ms): " + "; ".join(
        f"{r['items_per_s'][batch]:.0f}/s {r['batch1_ms']:.2f} ms"
        for entry in rounds for r in entry["raw"]))
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    write_results(args.out, f"interleaved-{args.size}",
                  {"args": {k: str(v) for k, v in vars(args).items()}, "rounds": rounds},
                  text, suffix="txt")


if __name__ == "__main__":
    main()

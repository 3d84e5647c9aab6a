"""The conversion benchmark: one model as eager, TorchScript, torch.compile and AOTInductor.

    nice -n 10 .venv/bin/python -m bench.convert                  # ~10 min on 2 busy cores
    .venv/bin/python -m bench.convert --quantize int8-dynamic --seconds 1

Method: the runtime benchmark's model (the demo ResNet-18, 3xSIZExSIZE, seed 0,
``modelyard.runtime.demo``), one torch thread, the measurements pinned to core 0 like
``bench/raw.py`` (compiling may use both cores). For each variant and batch size in
1, 2, 4, 8, 16 (the runtime's default batching limit): warm-up, then calls for
``--seconds`` in ``--rounds`` slices, the variants interleaved slice by slice (a busy
machine drifts; see ``measure``): the best items/s (and its batch) and the batch-1
latency (the median call of the fastest slice), each as a ratio to eager. The
AOTInductor packages are made by ``modelyard convert`` itself (compile, verify against
eager, write with a manifest): their conversion time and accuracy delta come from that;
with int8-dynamic, also from the exported program, quantised as a graph (PT2E).
The accuracy delta of the others is the largest absolute logit difference from eager
divided by the largest absolute eager logit, on 16 random images. Nothing asserts: it
prints a table and writes it to ``bench/results/convert-SIZE-STAMP.{md,json}``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from bench import write_results
from modelyard.runtime.aoti import load_package
from modelyard.runtime.convert import ConvertOptions, compile_package, verify, write
from modelyard.runtime.demo import build, demo_model

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path.home() / ".cache" / "modelyard" / "bench"
BATCHES = (1, 2, 4, 8, 16)
MEASURE_CORE = 0


def measure(variants: dict[str, Callable[..., Any]], size: int, seconds: float,
            rounds: int) -> dict[str, dict[str, Any]]:
    """items/s per batch size and batch-1 latency of every variant, on one core and thread.

    Interleaved: per batch size, ``rounds`` rounds visit every variant for a slice of
    ``seconds / rounds``; a variant's figure is its best slice (other work on the machine
    only ever slows a slice down, and it slows every variant alike within a round).
    """
    rates: dict[str, dict[int, float]] = {name: {} for name in variants}
    batch1: dict[str, list[float]] = {name: [] for name in variants}
    affinity = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {MEASURE_CORE})
    try:
        with torch.inference_mode():
            for batch in BATCHES:
                x = torch.randn(batch, 3, size, size)
                for model in variants.values():
                    for _ in range(3):
                        model(x)
                for _ in range(rounds):
                    for name, model in variants.items():
                        calls: list[float] = []
                        started = time.perf_counter()
                        while len(calls) < 2 or time.perf_counter() - started < seconds / rounds:
                            t = time.perf_counter()
                            model(x)
                            calls.append(time.perf_counter() - t)
                        rate = len(calls) * batch / (time.perf_counter() - started)
                        rates[name][batch] = max(rates[name].get(batch, 0.0), rate)
                        if batch == 1:
                            batch1[name].append(statistics.median(calls))
    finally:
        os.sched_setaffinity(0, affinity)
    out = {}
    for name, per_batch in rates.items():
        best = max(per_batch, key=lambda b: per_batch[b])
        out[name] = {"items_per_s": per_batch, "best_batch": best,
                     "best_items_per_s": per_batch[best],
                     "batch1_ms": min(batch1[name]) * 1000, "batch1_slices_ms": batch1[name]}
    return out


def accuracy(model: Callable[..., Any], eager: torch.nn.Module, size: int) -> float:
    x = torch.randn(16, 3, size, size, generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        want, got = eager(x), model(x)
    if isinstance(got, tuple):  # a package answers with a tuple of its outputs
        got = got[0]
    return float((got - want).abs().max() / want.abs().max())


def eager_model(size: int, workdir: Path) -> torch.nn.Module:
    """The demo ResNet-18 with the weights ``runtime.demo.build`` gives it in every format."""
    return demo_model()


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Build every variant, then measure them all together (interleaved)."""
    torch.set_num_threads(1)
    size = args.size
    eager = eager_model(size, workdir)
    variants: dict[str, Callable[..., Any]] = {"eager": eager}
    results: dict[str, Any] = {"eager": {"conversion_s": 0.0, "accuracy_delta": 0.0}}

    legacy = build(workdir / f"resnet-{size}.pt", size, format="torchscript")
    started = time.monotonic()
    variants["torchscript"] = torch.jit.load(str(legacy)).eval()
    results["torchscript"] = {"conversion_s": time.monotonic() - started}
    started = time.monotonic()
    compiled = torch.compile(eager)
    with torch.inference_mode():
        for batch in BATCHES:  # compiles here (static, then one dynamic recompile)
            compiled(torch.zeros(batch, 3, size, size))
    variants["torch.compile"] = compiled
    results["torch.compile"] = {"conversion_s": time.monotonic() - started}

    source = workdir / f"resnet-{size}.safetensors"
    metadata = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 3, size, size]}],
                "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 1000]}]}
    save_file({k: v.contiguous() for k, v in eager.state_dict().items()}, str(source),
              metadata={"modelyard": json.dumps(metadata)})
    for scheme in [None, *args.quantize]:
        _convert(f"aoti {scheme or 'fp32'}", ConvertOptions(
            source=source, entry_point="modelyard.runtime.demo:ResNet18", max_batch=max(BATCHES),
            quantize=scheme, bench_seconds=0.5, threads=1), workdir, variants, results)
    if "int8-dynamic" in args.quantize:  # the exported program, quantised as a graph (PT2E)
        exported = workdir / f"resnet-{size}.pt2"
        batch = torch.export.Dim("batch", min=1, max=max(BATCHES))
        torch.export.save(torch.export.export(eager, (torch.zeros(2, 3, size, size),),
                                              dynamic_shapes=({0: batch},)), str(exported))
        _convert("aoti int8-dynamic (export, PT2E)", ConvertOptions(
            source=exported, max_batch=max(BATCHES), quantize="int8-dynamic",
            bench_seconds=0.5, threads=1), workdir, variants, results)

    print("measuring", ", ".join(variants), flush=True)
    for name, figures in measure(variants, size, args.seconds, args.rounds).items():
        results[name].update(figures)
        if "accuracy_delta" not in results[name]:
            results[name]["accuracy_delta"] = accuracy(variants[name], eager, size)
    return results


def _convert(name: str, options: ConvertOptions, workdir: Path,
             variants: dict[str, Callable[..., Any]], results: dict[str, Any]) -> None:
    """One package, as ``modelyard convert`` makes it: compiled, verified, written, loaded."""
    print(f"converting {name}", flush=True)
    started = time.monotonic()
    candidate = compile_package(options)
    try:
        verification = verify(candidate)
        output = workdir / f"{name.replace(' ', '-').replace('(', '').replace(')', '')}.pt2"
        try:
            manifest = write(candidate, verification, output)
        except Exception as error:  # a failed verification is a result too
            results[name] = {"failed": str(error)}
            return
    finally:
        candidate.discard()
    variants[name] = load_package(output, "cpu").module
    results[name] = {"conversion_s": time.monotonic() - started,
                     "compile_s": manifest["compileSeconds"],
                     "accuracy_delta": manifest["verification"]["accuracyDelta"]}


def render(results: dict[str, Any], args: argparse.Namespace) -> str:
    eager = results["eager"]
    lines = [
        f"# Conversion benchmark: ResNet-18 3x{args.size}x{args.size}, one thread on one core",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M')} · {platform.processor() or platform.machine()} · "
        f"torch {torch.__version__} · {args.seconds:g} s per variant and batch size "
        f"({', '.join(map(str, BATCHES))}) in {args.rounds} interleaved slices, the best · "
        f"load average {os.getloadavg()[0]:.1f} at the end (other work on the machine)",
        "",
        "| variant | best items/s (batch) | x eager | batch-1 ms | x eager | conversion s "
        "| accuracy delta |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, figures in results.items():
        if "failed" in figures:
            lines.append(f"| {name} | failed: {figures['failed']} | | | | | |")
            continue
        lines.append(
            f"| {name} | {figures['best_items_per_s']:.1f} ({figures['best_batch']}) "
            f"| {figures['best_items_per_s'] / eager['best_items_per_s']:.2f} "
            f"| {figures['batch1_ms']:.2f} | {eager['batch1_ms'] / figures['batch1_ms']:.2f} "
            f"| {figures['conversion_s']:.1f} | {figures['accuracy_delta']:.1e} |")
    lines += [
        "",
        "x eager: items/s over eager's, and for batch 1 eager's latency over the variant's "
        "(above 1 is faster). Conversion: TorchScript load, torch.compile's compiles at "
        "every batch size, or `modelyard convert` (export, compile, verify, write). "
        "Accuracy delta: largest |logit difference| / largest |eager logit|; for the "
        "packages, the one their verification recorded.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.convert", description=__doc__)
    parser.add_argument("--size", type=int, default=64, help="image height and width")
    parser.add_argument("--seconds", type=float, default=4.0,
                        help="per variant and batch size, over all rounds")
    parser.add_argument("--rounds", type=int, default=8, help="slices per variant and batch")
    parser.add_argument("--quantize", default="int8-dynamic,int8-weight-only",
                        type=lambda s: [q for q in s.split(",") if q],
                        help="quantised packages to add (comma-separated; '' for none)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        results = run(args, Path(tmp))
    text = render(results, args)
    print(text)
    write_results(args.out, f"convert-{args.size}",
                  {"results": results, "torch": torch.__version__, "size": args.size,
                   "seconds": args.seconds}, text)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())

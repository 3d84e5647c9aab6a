"""The explanation benchmark: what one explanation costs against an inference, and against
the passes it cannot do without.

    nice -n 10 .venv/bin/python -m bench.explain                 # ~1 min
    .venv/bin/python -m bench.explain --steps 8 32 128 --seconds 4

Method: the runtime benchmark's model (the demo ResNet-18, 3xSIZExSIZE, seed 0), eager,
one torch thread, pinned to core 0 like ``bench/raw.py``. One row is explained through
the runtime's own path (``Explainer.explain``: the outputs, Captum's attributions, the
JSON answer) with integrated gradients at each ``--steps`` and with saliency; the chunk of
Captum's passes is the runtime's default batch size (16). Beside them, the passes an
explanation is made of: an inference of one row (inference mode), and a forward pass
with autograd and the gradient with respect to the input, of 1 row and of each chunk's
rows. The variants are interleaved slice by slice (a busy machine drifts); each figure is
the median call of its fastest slice.

Printed per method: the time of one explanation, its ratio to one inference (what a
caller pays), and the floor it cannot beat over the measured time (1.00: nothing but
the passes): integrated gradients needs ceil(steps / 16) forward and backward passes of
min(steps, 16) rows plus the inference that chooses the target; saliency one forward and
backward pass of a row plus that inference. Nothing asserts; the table goes to
``bench/results/explain-SIZE-STAMP.{md,json}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from modelyard.runtime.config import RuntimeConfig
from modelyard.runtime.demo import demo_model
from modelyard.runtime.explain import Explainer
from modelyard.runtime.models import LoadedModel
from modelyard.runtime.protocol import InferRequest, TensorMeta

ROOT = Path(__file__).resolve().parent.parent
CHUNK = 16  # the runtime's default max batch size: Captum's passes are this many rows
MEASURE_CORE = 0


def measure(variants: dict[str, Callable[[], Any]], seconds: float,
            rounds: int) -> dict[str, float]:
    """Seconds per call of each variant: the median call of its fastest slice."""
    best: dict[str, float] = {}
    for call in variants.values():
        call()  # warm-up
    for _ in range(rounds):
        for name, call in variants.items():
            calls: list[float] = []
            started = time.perf_counter()
            while len(calls) < 2 or time.perf_counter() - started < seconds / rounds:
                t = time.perf_counter()
                call()
                calls.append(time.perf_counter() - t)
            best[name] = min(best.get(name, math.inf), statistics.median(calls))
    return best


def _pass(rows: int) -> str:
    return f"forward+backward, {rows} row{'s' if rows > 1 else ''}"


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    size = args.size
    module = demo_model()
    model = LoadedModel(
        name="resnet", version="1", platform="pytorch_eager", module=module,
        device=torch.device("cpu"),
        inputs=[TensorMeta("input", "FP32", (-1, 3, size, size))],
        outputs=[TensorMeta("logits", "FP32", (-1, 1000))])
    config = RuntimeConfig("resnet", "file:///bench", explain=True, max_batch_size=CHUNK,
                           explain_steps=max(args.steps))
    explainer = Explainer(model, config)
    loop = asyncio.new_event_loop()
    x1 = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(3))
    chunks = sorted({1, *(min(s, CHUNK) for s in args.steps)})  # rows of Captum's passes

    def infer() -> None:
        model.predict({"input": x1})

    def forward_backward(rows: int) -> Callable[[], None]:
        x = x1.repeat(rows, 1, 1, 1)

        def call() -> None:  # the gradient with respect to the input only, as Captum's
            leaf = x.clone().requires_grad_(True)
            torch.autograd.grad(module(leaf)[:, 0].sum(), leaf)
        return call

    def explain(**parameters: Any) -> Callable[[], None]:
        request = InferRequest({"input": x1}, parameters=parameters)
        return lambda: loop.run_until_complete(explainer.explain(request))

    variants: dict[str, Callable[[], Any]] = {
        "inference, 1 row": infer,
        **{_pass(rows): forward_backward(rows) for rows in chunks},
        "saliency": explain(method="saliency"),
        **{f"integrated gradients, {s} steps": explain(steps=s) for s in args.steps},
    }
    affinity = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {MEASURE_CORE})  # explain threads start here: they inherit it
    try:
        seconds = measure(variants, args.seconds, args.rounds)
    finally:
        os.sched_setaffinity(0, affinity)
        explainer.close()
        loop.close()
    one = seconds["inference, 1 row"]
    floors = {"saliency": seconds[_pass(1)] + one}
    for s in args.steps:
        floors[f"integrated gradients, {s} steps"] = (
            math.ceil(s / CHUNK) * seconds[_pass(min(s, CHUNK))] + one)
    return {"seconds": seconds, "floors": floors, "size": size, "steps": args.steps,
            "measure_seconds": args.seconds, "rounds": args.rounds,
            "torch": torch.__version__, "machine": platform.machine(),
            "load_average": os.getloadavg()[0]}


def table(result: dict[str, Any]) -> str:
    seconds, floors = result["seconds"], result["floors"]
    one = seconds["inference, 1 row"]
    lines = [
        f"# Explanation benchmark: ResNet-18 3x{result['size']}x{result['size']}, one row, "
        "one thread on one core", "",
        f"{time.strftime('%Y-%m-%d %H:%M')} · {result['machine']} · torch {result['torch']} · "
        f"{result['measure_seconds']} s per variant in {result['rounds']} interleaved slices, "
        f"the fastest · load average {result['load_average']:.1f} at the end", "",
        "| what | ms | x one inference | floor / measured |", "|---|---|---|---|",
    ]
    for name, value in seconds.items():
        floor = floors.get(name)
        ratio = f"{floor / value:.2f}" if floor is not None else ""
        lines.append(f"| {name} | {value * 1000:.1f} | {value / one:.1f} | {ratio} |")
    lines += ["", "x one inference: the time over that of an inference of one row. Floor: "
              f"the passes a method cannot do without (integrated gradients: ceil(steps / "
              f"{CHUNK}) forward and backward passes of min(steps, {CHUNK}) rows, saliency: one "
              "of a row; "
              "both plus the inference that picks the target) over the measured time; "
              "1.00 would be nothing but those passes."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.explain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=64, help="input height and width")
    parser.add_argument("--steps", type=int, nargs="+", default=[8, 32, 128],
                        help="integrated gradients' steps to measure")
    parser.add_argument("--seconds", type=float, default=3.0, help="per variant")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved slices")
    args = parser.parse_args(argv)
    result = run(args)
    text = table(result)
    print(text)
    stamp = time.strftime("%Y%m%d-%H%M")
    out = ROOT / "bench" / "results" / f"explain-{args.size}-{stamp}"
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}.md and .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

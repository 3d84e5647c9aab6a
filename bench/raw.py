"""The raw in-process limit: the model called directly on one thread, per batch size.

    python -m bench.raw MODEL_PATH SIZE SECONDS_PER_BATCH_SIZE [BATCH,SIZES] [--format F]

``F`` is the model's format: ``aoti`` (the AOTInductor package through its C++ loader,
``boxed_run``, as the runtime and the peers call it), ``export`` (the exported program's
module) or ``torchscript`` (legacy; the default). Run pinned to the server core by
``bench/runtime.py``; prints one JSON line.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import orjson
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "servers"))
from common import load_any  # bench/servers: what every server loads the model with


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path")
    parser.add_argument("size", type=int)
    parser.add_argument("seconds", type=float)
    parser.add_argument("batches", nargs="?", default="1,2,4,8,16,32")
    parser.add_argument("--format", default="torchscript",
                        choices=("aoti", "export", "torchscript"))
    args = parser.parse_args()
    sizes = [int(b) for b in args.batches.split(",")]
    torch.set_num_threads(1)
    model = load_any(args.path, args.format)
    per_batch: dict[int, float] = {}
    batch1: list[float] = []
    with torch.inference_mode():
        for batch in sizes:
            x = torch.randn(batch, 3, args.size, args.size)
            for _ in range(3):
                model(x)
            runs = 0
            started = time.perf_counter()
            while True:
                t = time.perf_counter()
                model(x)
                if batch == 1:
                    batch1.append(time.perf_counter() - t)
                runs += 1
                elapsed = time.perf_counter() - started
                if elapsed >= args.seconds and runs >= 5:
                    break
            per_batch[batch] = runs * batch / elapsed
    best = max(per_batch, key=lambda b: per_batch[b])
    print(
        orjson.dumps(
            {
                "format": args.format,
                "items_per_s": per_batch,
                "best_batch": best,
                "best_items_per_s": per_batch[best],
                "batch1_ms": statistics.median(batch1) * 1000,
            },
            option=orjson.OPT_NON_STR_KEYS,
        ).decode()
    )


if __name__ == "__main__":
    main()

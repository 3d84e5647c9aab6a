"""The raw in-process limit: the TorchScript model on one thread, per batch size.

    python -m bench.raw MODEL_PATH SIZE SECONDS_PER_BATCH_SIZE [BATCH,SIZES]

Run pinned to the server core by ``bench/runtime.py``; prints one JSON line.
"""

from __future__ import annotations

import statistics
import sys
import time

import orjson
import torch


def main() -> None:
    path, size, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    sizes = [int(b) for b in sys.argv[4].split(",")] if len(sys.argv) > 4 else [1, 2, 4, 8, 16, 32]
    torch.set_num_threads(1)
    model = torch.jit.load(path).eval()
    per_batch: dict[int, float] = {}
    batch1: list[float] = []
    with torch.inference_mode():
        for batch in sizes:
            x = torch.randn(batch, 3, size, size)
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
                if elapsed >= seconds and runs >= 5:
                    break
            per_batch[batch] = runs * batch / elapsed
    best = max(per_batch, key=lambda b: per_batch[b])
    print(
        orjson.dumps(
            {
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

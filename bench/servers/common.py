"""Helpers every peer server script shares (stdlib + numpy + torch only).

Each script records the batch size of every forward pass in ``BENCH_BATCH_LOG``
so the benchmark can report the batches each server actually ran.
"""

from __future__ import annotations

import os

import torch


def load(path: str) -> torch.jit.ScriptModule:
    torch.set_num_threads(1)
    model = torch.jit.load(path)
    model.eval()
    return model


def log_batch(size: int) -> None:
    target = os.environ.get("BENCH_BATCH_LOG")
    if target:
        with open(target, "a", encoding="ascii") as file:
            file.write(f"{size}\n")

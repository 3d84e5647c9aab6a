"""Helpers every peer server script shares (stdlib + numpy + torch only).

``load`` reads the benchmark's model in any of its formats (``BENCH_MODEL_FORMAT``:
``aoti``, ``export`` or the legacy ``torchscript``) and returns one callable, tensor in,
tensor out, called the way ``bench/raw.py`` calls it. Each script records the batch size
of every forward pass in ``BENCH_BATCH_LOG`` so the benchmark can report the batches each
server actually ran.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch


def load_any(path: str, format: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model at ``path`` as a plain callable. An AOTInductor package is called through
    its C++ loader (``boxed_run``): ``aoti_load_package``'s Python wrapper re-parses the
    call's tree spec on every call, which is not the package's own cost."""
    if format == "aoti":
        loader = torch._C._aoti.AOTIModelPackageLoader(path, "model", False, 1, -1)
        return lambda x: loader.boxed_run([x.contiguous()])[0]
    if format == "export":
        module: Callable[[torch.Tensor], torch.Tensor] = torch.export.load(path).module()
        return module
    if format == "torchscript":
        scripted: Callable[[torch.Tensor], torch.Tensor] = torch.jit.load(path).eval()
        return scripted
    raise ValueError(f"unknown model format {format!r}")


def load(path: str) -> Callable[[torch.Tensor], torch.Tensor]:
    torch.set_num_threads(1)
    return load_any(path, os.environ.get("BENCH_MODEL_FORMAT", "torchscript"))


def log_batch(size: int) -> None:
    target = os.environ.get("BENCH_BATCH_LOG")
    if target:
        with open(target, "a", encoding="ascii") as file:
            file.write(f"{size}\n")

"""AOTInductor packages: what modelyard writes into them and how the runtime runs them.

An AOTInductor package (``.pt2`` from ``torch._inductor.aoti_compile_and_package``) is a
zip holding a compiled shared library per model plus a small metadata document. modelyard
keeps the tensor signature there (``aot_inductor.metadata``), so a package is served with
no side file: input and output names, datatypes and shapes (-1 for the batch), the
largest batch it was compiled for, and how it was made (source digest, quantisation).

Called by ``models.py`` (format ``aoti``) to load a package and by ``convert.py`` to
write the metadata when it compiles one.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from modelyard.runtime.errors import ConfigError, ModelLoadError
from modelyard.runtime.protocol import TensorMeta

__all__ = ["AotiModule", "Package", "load_package", "package_metadata", "signature_metadata"]

SIGNATURE_KEY = "modelyard.signature"  # {"inputs": [...], "outputs": [...]} as OIP metadata
MAX_BATCH_KEY = "modelyard.maxBatch"  # the batch dimension's upper bound at export
DEVICE_KEY = "AOTI_DEVICE_KEY"  # written by AOTInductor itself: "cpu" or "cuda"


def signature_metadata(inputs: list[TensorMeta], outputs: list[TensorMeta],
                       max_batch: int, **extra: str) -> dict[str, str]:
    """The ``aot_inductor.metadata`` modelyard compiles into a package (string values)."""
    signature = {"inputs": [m.as_json() for m in inputs], "outputs": [m.as_json() for m in outputs]}
    return {SIGNATURE_KEY: json.dumps(signature), MAX_BATCH_KEY: str(max_batch),
            **{f"modelyard.{key}": value for key, value in extra.items()}}


def package_metadata(path: Path) -> dict[str, str]:
    """The metadata compiled into the package at ``path``, read without loading it."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith("wrapper_metadata.json")]
            if not names:
                raise ModelLoadError(f"{path} is not an AOTInductor package (a zip "
                                     "without a compiled model)")
            document = json.loads(archive.read(names[0]))
    except (zipfile.BadZipFile, OSError, ValueError) as error:
        raise ModelLoadError(f"{path} is not an AOTInductor package: {error}") from None
    if not isinstance(document, dict):
        raise ModelLoadError(f"{path}: the package's metadata is not an object")
    return {str(k): str(v) for k, v in document.items()}


class AotiModule:
    """Calls the compiled model with positional tensors; returns its outputs as a tuple.

    The package's C++ loader is called directly (``boxed_run``): the Python wrapper of
    ``torch._inductor.aoti_load_package`` parses the call's tree spec on every call and
    costs seconds of imports at start-up. A batch above the compiled limit runs in slices.
    """

    def __init__(self, loader: Any, max_batch: int | None) -> None:
        self.loader = loader
        self.max_batch = max_batch

    def _run(self, args: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return tuple(self.loader.boxed_run([a.contiguous() for a in args]))

    def __call__(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        rows = args[0].shape[0] if args and args[0].dim() else 0
        step = self.max_batch
        if step is None or rows <= step:
            return self._run(args)
        parts = [self._run([a[i:i + step] for a in args]) for i in range(0, rows, step)]
        return tuple(torch.cat(list(column)) for column in zip(*parts, strict=True))


@dataclass
class Package:
    module: AotiModule
    device: torch.device
    inputs: list[TensorMeta]
    outputs: list[TensorMeta]
    metadata: dict[str, str]


def _signature(path: Path, metadata: dict[str, str]) -> tuple[list[TensorMeta], list[TensorMeta]]:
    raw = metadata.get(SIGNATURE_KEY)
    if raw is None:
        return [], []
    try:
        document = json.loads(raw)
        return ([TensorMeta.from_json(item) for item in document["inputs"]],
                [TensorMeta.from_json(item) for item in document["outputs"]])
    except (ValueError, KeyError, TypeError) as error:
        raise ModelLoadError(f"{path}: bad {SIGNATURE_KEY} in the package: {error}") from None


def load_package(path: Path, device_name: str) -> Package:
    """Load the package for ``device_name`` (``auto``: the device it was compiled for)."""
    metadata = package_metadata(path)
    built_for = metadata.get(DEVICE_KEY, "cpu")
    if device_name not in ("auto", built_for):
        raise ConfigError(f"{path} was compiled for {built_for}; it cannot run on "
                          f"{device_name} (convert it again for {device_name})")
    if built_for == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{path} was compiled for cuda, but no CUDA device is visible")
    device = torch.device("cuda" if built_for == "cuda" else "cpu")
    inputs, outputs = _signature(path, metadata)
    max_batch = int(metadata[MAX_BATCH_KEY]) if MAX_BATCH_KEY in metadata else None
    try:
        loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)
    except Exception as error:
        raise ModelLoadError(f"cannot load AOTInductor package {path}: "
                             f"{type(error).__name__}: {error}") from None
    return Package(AotiModule(loader, max_batch), device, inputs, outputs, metadata)

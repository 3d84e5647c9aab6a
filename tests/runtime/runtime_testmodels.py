"""Tiny models the runtime tests build themselves (fixed seeds, no downloads).

Imported by ``conftest.py`` and by the runtime's subprocesses (it is on their
PYTHONPATH), where ``TinyMLP`` / ``build_tiny_mlp`` serve as safetensors entry points.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from torch import nn

MLP_METADATA = {
    "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}],
    "outputs": [
        {"name": "logits", "datatype": "FP32", "shape": [-1, 3]},
        {"name": "label", "datatype": "INT64", "shape": [-1]},
    ],
}

DTYPE_NAMES = {
    "FP32": torch.float32,
    "FP16": torch.float16,
    "BF16": torch.bfloat16,
    "INT64": torch.int64,
    "INT32": torch.int32,
    "INT8": torch.int8,
    "UINT8": torch.uint8,
    "BOOL": torch.bool,
}


class TinyMLP(nn.Module):
    """4 -> 8 -> 3, returns (logits, argmax)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.layers(x)
        return logits, logits.argmax(dim=1)


def build_tiny_mlp() -> nn.Module:
    """Entry point for the safetensors format."""
    return TinyMLP()


class AllTypes(nn.Module):
    """One input per datatype; floats doubled, ints plus one, bools negated."""

    def forward(  # noqa: PLR0917
        self,
        fp32: torch.Tensor,
        fp16: torch.Tensor,
        bf16: torch.Tensor,
        int64: torch.Tensor,
        int32: torch.Tensor,
        int8: torch.Tensor,
        uint8: torch.Tensor,
        flag: torch.Tensor,
    ) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
        torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
    ]:
        return (fp32 * 2, fp16 * 2, bf16 * 2, int64 + 1, int32 + 1, int8 + 1, uint8 + 1,
                torch.logical_not(flag))


ALLTYPES_INPUTS = ["fp32", "fp16", "bf16", "int64", "int32", "int8", "uint8", "flag"]
ALLTYPES_DATATYPES = ["FP32", "FP16", "BF16", "INT64", "INT32", "INT8", "UINT8", "BOOL"]


class TinyImageNet(nn.Module):
    """3x16x16 image -> 5 classes (the image handler's test model)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = torch.relu(self.conv(x)).mean(dim=(2, 3))
        return self.head(features)


class SlowEcho(nn.Module):
    """Returns x * scale (2) after sleeping ``delay`` seconds per batch (drain tests)."""

    def __init__(self, delay: float = 0.05) -> None:
        super().__init__()
        self.delay = delay
        self.scale = nn.Parameter(torch.full((1,), 2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.delay)
        return x * self.scale


class GatedRecorder(nn.Module):
    """x * 2, with two test seams read from the environment (overload tests): each
    forward pass waits while the file $TESTMODEL_GATE exists, then appends the first
    column of its batch, one value a line, to $TESTMODEL_RECORD: what reached the model."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((1,), 2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = Path(os.environ["TESTMODEL_GATE"])
        deadline = time.monotonic() + 60
        while gate.exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        with Path(os.environ["TESTMODEL_RECORD"]).open("a") as record:
            record.writelines(f"{float(v)}\n" for v in x[:, 0])
        return x * self.scale


SLOW_METADATA = {
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
    "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}],
}


def save_torchscript(module: nn.Module, path: Path, metadata: dict[str, object] | None) -> Path:
    scripted = torch.jit.script(module.eval())
    extra = {"modelyard.json": json.dumps(metadata)} if metadata else {}
    torch.jit.save(scripted, str(path), _extra_files=extra)
    return path


def build_models(directory: Path) -> dict[str, Path]:
    """Write every test model into ``directory``; return name -> path."""
    directory.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    paths["mlp"] = save_torchscript(TinyMLP(), directory / "mlp.pt", MLP_METADATA)
    paths["mlp_bare"] = save_torchscript(TinyMLP(), directory / "mlp_bare.pt", None)

    types_meta = {
        "inputs": [
            {"name": n, "datatype": d, "shape": [-1, 2]}
            for n, d in zip(ALLTYPES_INPUTS, ALLTYPES_DATATYPES, strict=True)
        ],
        "outputs": [
            {"name": "out_" + n, "datatype": d, "shape": [-1, 2]}
            for n, d in zip(ALLTYPES_INPUTS, ALLTYPES_DATATYPES, strict=True)
        ],
    }
    paths["alltypes"] = save_torchscript(AllTypes(), directory / "alltypes.pt", types_meta)

    image_meta = {
        "inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 3, 16, 16]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 5]}],
    }
    paths["image"] = save_torchscript(TinyImageNet(), directory / "image.pt", image_meta)

    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(
        TinyMLP().eval(), (torch.zeros(2, 4),), dynamic_shapes={"x": {0: batch}}
    )
    paths["export"] = directory / "mlp.pt2"
    torch.export.save(program, str(paths["export"]))

    from safetensors.torch import save_file

    paths["safetensors"] = directory / "mlp.safetensors"
    save_file(
        {k: v.contiguous() for k, v in TinyMLP().state_dict().items()},
        str(paths["safetensors"]),
        metadata={"modelyard": json.dumps(MLP_METADATA)},
    )
    paths["slow"] = directory / "slow.safetensors"
    save_file(dict(SlowEcho().state_dict()), str(paths["slow"]),
              metadata={"modelyard": json.dumps(SLOW_METADATA)})
    paths["state_dict"] = directory / "mlp_state.pt"
    torch.save(TinyMLP().state_dict(), paths["state_dict"])
    paths["pickled"] = directory / "mlp_pickled.pt"
    torch.save(TinyMLP(), paths["pickled"])
    return paths

"""A demo model: ResNet-18 in plain torch with fixed random weights.

No weights are downloaded: ``build`` makes the file from a fixed seed. Its format is
``export`` by default: a ``torch.export`` program (``.pt2``) whose batch dimension is
dynamic and whose signature carries the names, datatypes and shapes the runtime serves.
``aoti`` turns that program into an AOTInductor package with ``modelyard convert``
(compiled and verified for this machine's CPU); ``torchscript`` writes the legacy format
(deprecated by PyTorch, still loaded) with its metadata embedded (``modelyard.json``).
``make run`` serves the exported program, the benchmarks measure all three, and the
docs use it in examples::

    python -m modelyard.runtime.demo /tmp/resnet/model.pt2 --size 64
    python -m modelyard.runtime.demo /tmp/resnet/model-aoti.pt2 --format aoti --max-batch 16
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import torch
from torch import nn

__all__ = ["FORMATS", "ResNet18", "build", "demo_model", "save_image_model"]

FORMATS = ("export", "aoti", "torchscript")


class BasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or inplanes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 7, 2, 3, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(3, 2, 1),
        )
        layers: list[nn.Module] = []
        inplanes = 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [BasicBlock(inplanes, planes, stride), BasicBlock(planes, planes)]
            inplanes = planes
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, classes)

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # the served input's name
        features = self.layers(self.stem(input))
        logits: torch.Tensor = self.fc(
            torch.flatten(nn.functional.adaptive_avg_pool2d(features, 1), 1))
        return logits


def demo_model(classes: int = 1000) -> ResNet18:
    """The demo ResNet-18 in eval mode, its weights from seed 0 (the same in every format)."""
    torch.manual_seed(0)
    model = ResNet18(classes).eval()
    with torch.no_grad():
        for module in model.modules():  # non-trivial batch-norm statistics
            if isinstance(module, nn.BatchNorm2d):
                assert module.running_mean is not None
                assert module.running_var is not None
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model


def build(path: Path, size: int = 64, classes: int = 1000, format: str = "export",
          max_batch: int = 16) -> Path:
    """Write the demo ResNet-18 for ``size``x``size`` inputs as ``format``.

    ``export``: a ``torch.export`` program with a dynamic batch dimension (input
    ``input``, output ``linear``, as the program's signature names them). ``aoti``: that
    program compiled by ``modelyard convert`` for this machine's CPU, batch 1 to
    ``max_batch``, verified against it, with its manifest beside it (about 30 s on two
    cores). ``torchscript`` (legacy): traced, metadata embedded. Deterministic (seed 0);
    an existing file is kept.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, not {format!r}")
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    if format == "aoti":
        return _build_aoti(path, size, classes, max_batch)
    model = demo_model(classes)
    if format == "torchscript":
        warnings.filterwarnings("ignore", category=FutureWarning, module="torch.jit")
        with torch.no_grad():
            traced = torch.jit.trace(  # type: ignore[no-untyped-call]
                model, torch.zeros(1, 3, size, size))
        return save_image_model(traced, path, size, classes)
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        program = torch.export.export(model, (torch.zeros(2, 3, size, size),),
                                      dynamic_shapes=({0: batch},))
    tmp = path.with_name(f".{path.stem}.partial.pt2")  # torch wants the suffix
    torch.export.save(program, str(tmp))
    tmp.replace(path)
    return path


def _build_aoti(path: Path, size: int, classes: int, max_batch: int) -> Path:
    """The exported demo, converted into a verified AOTInductor package for the CPU."""
    from modelyard.runtime.convert import ConvertOptions, convert

    source = path.with_name(f"{path.stem}-source.pt2")
    build(source, size, classes, "export")
    convert(ConvertOptions(source=source, max_batch=max_batch, device="cpu"), path)
    return path


def save_image_model(scripted: torch.jit.ScriptModule, path: Path, size: int,
                     classes: int) -> Path:
    """Save a TorchScript image classifier (N x 3 x size x size -> N x classes) with the
    metadata the runtime reads, atomically."""
    metadata = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 3, size, size]}],
        "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1, classes]}],
    }
    tmp = path.with_suffix(".tmp")
    torch.jit.save(scripted, str(tmp), _extra_files={"modelyard.json": json.dumps(metadata)})
    tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the demo ResNet-18.")
    parser.add_argument("path", type=Path)
    parser.add_argument("--size", type=int, default=64, help="input height and width")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--format", choices=FORMATS, default="export",
                        help="export (default; a torch.export program), aoti (an "
                             "AOTInductor package, compiled here) or torchscript (legacy)")
    parser.add_argument("--max-batch", type=int, default=16,
                        help="aoti: the largest batch the package takes (maxBatchSize)")
    args = parser.parse_args(argv)
    print(build(args.path, args.size, args.classes, args.format, args.max_batch))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

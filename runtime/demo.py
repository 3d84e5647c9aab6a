"""A demo model: ResNet-18 in plain torch with fixed random weights, as TorchScript.

No weights are downloaded: ``build`` makes the file from a fixed seed, with the
tensor metadata the runtime needs embedded (``modelyard.json``). ``make run`` serves
it, the benchmark measures it, and the docs use it in examples::

    python -m modelyard.runtime.demo /tmp/resnet/model.pt --size 64
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import torch
from torch import nn

__all__ = ["ResNet18", "build"]


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.layers(self.stem(x))
        logits: torch.Tensor = self.fc(
            torch.flatten(nn.functional.adaptive_avg_pool2d(features, 1), 1))
        return logits


def build(path: Path, size: int = 64, classes: int = 1000) -> Path:
    """Write the TorchScript ResNet-18 for ``size``x``size`` inputs (metadata embedded).

    Deterministic (seed 0); an existing file is kept.
    """
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.jit")
    torch.manual_seed(0)
    model = ResNet18(classes).eval()
    with torch.no_grad():
        for module in model.modules():  # non-trivial batch-norm statistics
            if isinstance(module, nn.BatchNorm2d):
                assert module.running_mean is not None
                assert module.running_var is not None
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
        traced = torch.jit.trace(model, torch.zeros(1, 3, size, size))  # type: ignore[no-untyped-call]
    return save_image_model(traced, path, size, classes)


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
    parser = argparse.ArgumentParser(description="Write the demo ResNet-18 as TorchScript.")
    parser.add_argument("path", type=Path)
    parser.add_argument("--size", type=int, default=64, help="input height and width")
    args = parser.parse_args(argv)
    print(build(args.path, args.size))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`modelyard convert` on the two models issue 15 names, on CPU: the demo ResNet-18 (as
`modelyard demo --format aoti` builds it) and a small transformer encoder, in fp32 and, for
the encoder (linear layers throughout), quantised. Each package is verified against its
source before it is written, then loaded as the runtime loads it and checked again here, on
inputs of its own. Three compiles in all (about a minute on 2 cores)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from modelyard.runtime import demo
from modelyard.runtime.config import RuntimeConfig
from modelyard.runtime.convert import (
    FP32_TOLERANCE,
    QUANTIZED_TOLERANCE,
    ConvertOptions,
    convert,
    manifest_file,
)
from modelyard.runtime.models import LoadedModel, load_model

SIZE, MAX_BATCH = 32, 4


class TinyEncoder(nn.Module):
    """Token embeddings through two pre-norm encoder layers, mean-pooled into 3 classes."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(16, 32)
        layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64,
                                           dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(dim=1))  # type: ignore[no-any-return]


def _export_encoder(path: Path) -> TinyEncoder:
    model = TinyEncoder().eval()
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    with torch.no_grad():
        program = torch.export.export(model, (torch.randn(2, 8, 16),),
                                      dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))
    return model


def _served(package: Path) -> LoadedModel:
    """The package as the runtime loads it."""
    loaded = load_model(RuntimeConfig(model_name="m", model_uri=str(package),
                                      model_format="aoti"), package)
    assert loaded.platform == "pytorch_aoti"
    return loaded


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


def test_the_demo_resnet_converts_within_tolerance(tmp_path: Path) -> None:
    package = demo.build(tmp_path / "resnet.pt2", size=SIZE, format="aoti",
                         max_batch=MAX_BATCH)
    manifest = json.loads(manifest_file(package).read_text())
    assert manifest["verification"]["passed"]
    assert manifest["verification"]["accuracyDelta"] <= FP32_TOLERANCE
    model = _served(package)
    images = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = demo.demo_model()(images)
    [got] = model.predict({"input": images}).values()
    assert _relative_error(got, want) <= FP32_TOLERANCE


@pytest.mark.parametrize("quantize", [None, "int8-dynamic"])
def test_a_transformer_encoder_converts_within_its_tolerance(tmp_path: Path,
                                                            quantize: str | None) -> None:
    source = tmp_path / "encoder.pt2"
    eager = _export_encoder(source)
    package = tmp_path / "encoder-aoti.pt2"
    manifest = convert(ConvertOptions(source=source, max_batch=MAX_BATCH, quantize=quantize,
                                      bench_seconds=0.1, threads=1), package)
    tolerance = QUANTIZED_TOLERANCE if quantize else FP32_TOLERANCE
    assert manifest["verification"]["tolerance"] == tolerance
    assert manifest["verification"]["accuracyDelta"] <= tolerance
    tokens = torch.randn(MAX_BATCH, 8, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = eager(tokens)
    [got] = _served(package).predict({"tokens": tokens}).values()
    error = _relative_error(got, want)
    assert error <= tolerance
    if quantize:  # int8 did change the numbers, beyond fp32's compile noise
        assert error > FP32_TOLERANCE / 10

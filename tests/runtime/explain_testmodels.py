"""The explanation tests' model: a linear layer whose attributions are known exactly.

Imported by ``test_runtime_explain.py`` and, as a safetensors entry point, by the runtime
process it starts (this folder is on that process's PYTHONPATH).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from torch import nn

WEIGHT = [[1.0, 2.0, 3.0, 4.0], [-1.0, 0.5, 0.0, 2.0], [0.0, 0.0, 1.0, -3.0]]
BIAS = [0.5, -1.0, 2.0]
METADATA = {
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
    "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}],
}


class GatedLinear(nn.Module):
    """y = W x + b: integrated gradients from zeros give x * W[target] exactly, and saliency
    |W[target]|. A test seam read from the environment: a forward pass with autograd on
    (an explanation's; inference runs without) creates $TESTMODEL_EXPLAIN_ENTERED, then
    waits while $TESTMODEL_EXPLAIN_GATE exists, so a test holds an explanation running."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)
        with torch.no_grad():
            self.linear.weight.copy_(torch.tensor(WEIGHT))
            self.linear.bias.copy_(torch.tensor(BIAS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = os.environ.get("TESTMODEL_EXPLAIN_GATE")
        if gate and torch.is_grad_enabled() and Path(gate).exists():
            Path(os.environ["TESTMODEL_EXPLAIN_ENTERED"]).touch()
            deadline = time.monotonic() + 60
            while Path(gate).exists() and time.monotonic() < deadline:
                time.sleep(0.005)
        return self.linear(x)  # type: ignore[no-any-return]

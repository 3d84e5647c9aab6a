"""The benchmark model: the demo ResNet-18 (plain torch, fixed random weights, TorchScript).

Called by ``bench/runtime.py``; every server under test loads the same file. The
model itself lives in :mod:`modelyard.runtime.demo` (``make run`` serves it too).
"""

from __future__ import annotations

from modelyard.runtime.demo import ResNet18, build

__all__ = ["ResNet18", "build"]

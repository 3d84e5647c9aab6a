"""The benchmark model: the demo ResNet-18 (plain torch, fixed random weights).

Called by the benchmarks; every server under test loads the same file. The model and its
formats live in :mod:`modelyard.runtime.demo` (``make run`` serves it too): ``export``
(a ``torch.export`` program), ``aoti`` (an AOTInductor package from ``modelyard convert``)
and the legacy ``torchscript``.
"""

from __future__ import annotations

from modelyard.runtime.demo import ResNet18, build, demo_model

__all__ = ["ResNet18", "build", "demo_model"]

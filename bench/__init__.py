"""Benchmarks of modelyard. ``python -m bench.runtime`` runs the serving-runtime benchmark."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


def write_results(out: Path, name: str, data: Any, text: str, *, suffix: str = "md") -> Path:
    """Write a run's table (``NAME-STAMP.md``, or ``.txt``) and its figures (``.json``) to
    ``out``; returns the path without its suffix."""
    out.mkdir(parents=True, exist_ok=True)
    base = out / f"{name}-{time.strftime('%Y%m%d-%H%M')}"
    base.with_name(f"{base.name}.{suffix}").write_text(text)
    base.with_name(f"{base.name}.json").write_text(
        json.dumps(data, indent=1, default=str) + "\n")
    print(f"written: {base}.{suffix} and .json")
    return base

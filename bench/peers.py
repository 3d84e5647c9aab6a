"""The peer servers of the runtime benchmark, and their private virtual environments.

Called by ``bench/runtime.py``. Each peer is installed into its own venv under
``~/.cache/modelyard/bench-venvs/<name>`` (``uv venv`` + ``uv pip install``), so
its dependencies never touch the project's. A peer that cannot be installed is
reported with the reason, not silently dropped.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

VENVS = Path.home() / ".cache" / "modelyard" / "bench-venvs"
TORCH = f"torch=={torch.__version__.split('+')[0]}"


@dataclass(frozen=True)
class Peer:
    """A server under test: how to install it and what it speaks."""

    name: str
    requirements: tuple[str, ...]
    payloads: tuple[str, ...]  # "json" (OIP v2 JSON body), "binary" (OIP binary extension)
    batching: str  # how it batches, for the table
    notes: str = ""
    extra_pip_args: tuple[str, ...] = field(default_factory=tuple)


PEERS: dict[str, Peer] = {
    "kserve": Peer("kserve", ("kserve", TORCH, "numpy"), ("json", "binary"), "none in-process"),
    "mlserver": Peer(
        "mlserver", ("mlserver", "uvloop<0.22", TORCH, "numpy"), ("json",), "adaptive 16 / 5 ms"
    ),
    "litserve": Peer("litserve", ("litserve", TORCH, "numpy"), ("json",), "16 / 5 ms"),
    "torchserve": Peer(
        "torchserve",
        ("torchserve", "torch-model-archiver", "pyyaml", TORCH, "numpy"),
        ("json",),
        "16 / 5 ms",
        notes="needs Java 17",
    ),
}


def _uv() -> str:
    found = shutil.which("uv") or str(Path(sys.executable).with_name("uv"))
    if not Path(found).exists():
        raise RuntimeError("uv is needed to build the peers' virtual environments")
    return found


def ensure_venv(peer: Peer) -> tuple[Path | None, str]:
    """Return (python of the peer's venv, "") or (None, why it could not be installed)."""
    root = VENVS / peer.name
    digest = hashlib.sha256("\n".join(peer.requirements).encode()).hexdigest()[:12]
    marker = root / f".installed-{digest}"
    python = root / "bin" / "python"
    if marker.exists() and python.exists():
        return python, ""
    if peer.name == "torchserve" and shutil.which("java") is None:
        return None, "Java 17 is not installed"
    uv = _uv()
    root.parent.mkdir(parents=True, exist_ok=True)
    steps = [
        [uv, "venv", "--quiet", "--allow-existing", "--python", sys.executable, str(root)],
        [
            uv,
            "pip",
            "install",
            "--quiet",
            "--python",
            str(python),
            *peer.requirements,
            *peer.extra_pip_args,
        ],
    ]
    for step in steps:
        result = subprocess.run(step, capture_output=True, text=True, timeout=1800, check=False)
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-6:]
            return None, "install failed: " + " | ".join(tail)
    marker.touch()
    return python, ""


def version_of(python: Path, package: str) -> str:
    result = subprocess.run(
        [str(python), "-c", f"import importlib.metadata as m; print(m.version({package!r}))"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return result.stdout.strip() or "?"


if __name__ == "__main__":
    for name in sys.argv[1:] or list(PEERS):
        path, why = ensure_venv(PEERS[name])
        print(name, path or why, flush=True)

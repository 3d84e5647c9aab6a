"""The wheel carries every module of the three packages (a subpackage missing from
pyproject's explicit list would silently drop out of the images), and each extra names
what its package imports."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_contains_every_module(tmp_path: Path) -> None:
    uv = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    assert uv, "uv is installed by scripts/bootstrap"
    subprocess.run([uv, "build", "--wheel", "--out-dir", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True)
    [wheel] = tmp_path.glob("modelyard-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder, package in (("operator", "modelyard/operator"),
                            ("activator", "modelyard/activator"),
                            ("runtime", "modelyard/runtime")):
        for source in (ROOT / folder).rglob("*"):
            if source.is_dir() or "__pycache__" in source.parts:
                continue
            if source.is_relative_to(ROOT / "operator" / "devcluster"):
                continue  # development tooling: not shipped (below)
            if source.suffix not in {".py", ".yaml", ".html", ".js", ".css", ".sum", ".mod"} \
                    and source.name != "py.typed":
                continue
            rel = source.relative_to(ROOT / folder).as_posix()
            assert f"{package}/{rel}" in names, f"{folder}/{rel} is missing from the wheel"
    assert not any(n.startswith("modelyard/operator/devcluster/") for n in names)
    assert not any(n.startswith("operator/") for n in names)  # never a top-level `operator`
    assert not any(n == "modelyard/operator/__init__.py" for n in names)


def _imports_of(package: str) -> tuple[set[str], set[str]]:
    """The top-level names that ``package``'s modules import, and every ``modelyard``
    module they reach (followed through ``modelyard.*`` imports, function bodies included:
    a lazy import fails just the same when its distribution is missing)."""
    folders = {"modelyard.operator": ROOT / "operator", "modelyard.activator": ROOT / "activator",
               "modelyard.runtime": ROOT / "runtime"}

    def source(module: str) -> Path | None:
        for prefix, folder in folders.items():
            if module == prefix or module.startswith(prefix + "."):
                rel = module.removeprefix(prefix).lstrip(".").replace(".", "/")
                for candidate in (folder / rel / "__init__.py", folder / f"{rel}.py",
                                  folder / rel):
                    if candidate.is_file():
                        return candidate
                return None
        return None

    seen: set[str] = set()
    external: set[str] = set()
    todo = [f"{package}.{path.stem}" for path in folders[package].glob("*.py")]
    while todo:
        module = todo.pop()
        path = source(module)
        if module in seen or path is None:
            continue
        seen.add(module)
        here = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = here
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                stem = f"{base}.{node.module}" if node.level and node.module else \
                    base if node.level else str(node.module)
                names = [stem, *(f"{stem}.{alias.name}" for alias in node.names)]
            for name in names:
                if name == "modelyard":
                    continue  # `from modelyard import contract`: the names that follow
                if name.startswith("modelyard."):
                    todo.append(name)
                elif name.split(".")[0] not in sys.stdlib_module_names:
                    external.add(name.split(".")[0])
    return external, seen


def _requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0].lower().replace("_", "-")
            for r in requirements}


def test_the_activator_extra_is_exactly_what_the_activator_imports() -> None:
    """`modelyard activator` runs from the operator image: with the core dependencies and
    the `activator` extra, every import it can reach resolves, and the extra holds nothing
    it does not import (issue #10: it once needed uvicorn the image did not have)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = _requirement_names(project["dependencies"])
    extra = _requirement_names(project["optional-dependencies"]["activator"])
    external, modules = _imports_of("modelyard.activator")
    assert "modelyard.activator.server" in modules
    assert not {m for m in modules if m.startswith("modelyard.runtime")}
    owners = importlib.metadata.packages_distributions()
    imported = {owners[name][0].lower().replace("_", "-") for name in external}
    assert imported - core - extra == set(), "imported but not declared"
    assert extra - imported == set(), "declared but never imported"


def test_development_commands_say_where_they_run_when_the_local_cluster_is_not_shipped(
        monkeypatch: Any, capsys: Any) -> None:
    """In the product (wheel, images) `modelyard dev up` & co. explain themselves instead of
    failing on an import."""
    from modelyard.operator import cli

    monkeypatch.setattr(cli, "_has_devcluster", lambda: False)
    for command in (["dev", "up"], ["build-binaries"], ["build-node"]):
        assert cli.main(command) == 2
        assert "source checkout" in capsys.readouterr().err

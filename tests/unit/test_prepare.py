"""scripts/prepare.py, which `make test` and `make run` call before pytest: it builds
only what is missing, in order, says so as it goes, and knows every slow part the tests
would otherwise build inside a fixture."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def prepare() -> ModuleType:
    spec = importlib.util.spec_from_file_location("prepare", ROOT / "scripts" / "prepare.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["prepare"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_it_builds_what_is_missing_and_says_so(prepare: ModuleType,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[str] = []
    cached = {"a": True, "b": False, "c": False}

    def part(name: str, groups: set[str]) -> Any:
        return prepare.Part(name, frozenset(groups), "~1 min", lambda: cached[name],
                            lambda: built.append(name))

    monkeypatch.setattr(prepare, "_parts", lambda: [
        part("a", {"cluster", "test"}), part("b", {"cluster", "test"}), part("c", {"test"})])
    lines: list[str] = []
    prepare.prepare("cluster", lines.append)
    assert built == ["b"]
    assert lines[0] == "prepare: [1/2] a: cached"
    assert lines[1] == "prepare: [2/2] b: building (first time, ~1 min)..."
    assert lines[2].startswith("prepare: [2/2] b: ready in ")
    assert lines[3].startswith("prepare: ready for `make run` in ")
    built.clear()
    prepare.prepare("test", lines.append)
    assert built == ["b", "c"]


def test_a_download_overlaps_the_builds_and_its_failure_still_fails(
        prepare: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """An ``overlap`` part (a download) starts first, in a thread, and runs while the
    compiling parts build in turn; prepare returns only once it is done, and its error is
    prepare's."""
    import threading

    download_started, compile_done = threading.Event(), threading.Event()
    order: list[str] = []

    def download() -> None:
        download_started.set()
        assert compile_done.wait(10), "the compile did not run while the download did"
        order.append("download")

    def compile_() -> None:
        assert download_started.wait(10), "the download had not started"
        order.append("compile")
        compile_done.set()

    monkeypatch.setattr(prepare, "_parts", lambda: [
        prepare.Part("compile", frozenset({"test"}), "~1 min", lambda: False, compile_),
        prepare.Part("download", frozenset({"test"}), "~1 min", lambda: False, download,
                     overlap=True)])
    lines: list[str] = []
    prepare.prepare("test", lines.append)
    assert order == ["compile", "download"]
    assert lines[-1].startswith("prepare: ready for `make test` in ")

    def broken() -> None:
        raise RuntimeError("no network")

    monkeypatch.setattr(prepare, "_parts", lambda: [
        prepare.Part("download", frozenset({"test"}), "~1 min", lambda: False, broken,
                     overlap=True)])
    with pytest.raises(RuntimeError, match="no network"):
        prepare.prepare("test", lines.append)


def test_it_knows_every_pinned_build_of_the_local_cluster(prepare: ModuleType) -> None:
    """Every `ensure_*` of the devcluster (each a pinned build through `cached_build`) is a
    part, so no test fixture is left to build one under the per-test timeout."""
    from modelyard.operator import devcluster

    folder = Path(devcluster.__file__).parent
    ensures = {f"{path.stem}.{line.split('(')[0].removeprefix('def ')}"
               for path in folder.glob("*.py") for line in path.read_text().splitlines()
               if line.startswith("def ensure_")}
    parts = prepare._parts()
    assert {f"{p.build.__module__.rpartition('.')[2]}.{p.build.__name__}"
            for p in parts} == ensures
    assert next(p.name for p in parts if "cluster" in p.groups).startswith("Kubernetes v")

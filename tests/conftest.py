"""Fixtures shared by every test tier.

* ``cluster``: one real local control plane for the whole session (built from
  pinned sources on first use, then started in seconds), with the CRD installed.
* ``operator``: the real operator, in-process, authenticated as its own user
  ``modelyard-operator`` so the API server's audit log can count its writes.
* ``namespace``: a fresh namespace per test, deleted afterwards.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from typing import Any

import pytest
from support import Kube, as_operator, fresh_namespace, install_crd


def pytest_configure(config: pytest.Config) -> None:
    logging.getLogger("modelyard").setLevel(logging.DEBUG)  # shown only for failing tests
    # Every operator setting stays at its default (the resync is 300 s, a safety net only):
    # whatever a test sees move on time, it moved on the operator's own rechecks.
    os.environ.pop("MODELYARD_RESYNC_SECONDS", None)


# `make test` runs two pytest-xdist workers (`-n 2`): a group runs on one worker, in order,
# and the groups are handed out in the order below. A group is a module (its module-scoped
# fixtures are built once) except two: the modules that start vLLM (two engines at once
# would ask the 2 cores twice over) and those on the real node (one node per session). The
# longest groups go first, so the two workers finish close together.
_GROUPS = {"tests/runtime/test_runtime_llm.py": "vllm", "tests/cluster/test_llm.py": "vllm"}
_FIRST = ("vllm", "node")


def _group(path: str) -> str:
    """The group of a test module, by its path from the repository's root."""
    return _GROUPS.get(path) or ("node" if path.startswith("tests/node/") else path)


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Hand out whole groups (xdist's `loadgroup` marks no longer reach its scheduler under
    pytest 9, so the scheduler is told the groups itself)."""
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _group(nodeid.split("::", 1)[0])

    config.option.loadscopereorder = False  # keep the order collection gives
    return GroupScheduling(config, log)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if {"cluster", "binaries"} & set(item.fixturenames) or "e2e" in item.path.parts:
            item.add_marker(pytest.mark.cluster)
    rank = {group: index for index, group in enumerate(_FIRST)}
    items.sort(key=lambda item: rank.get(_group(item.nodeid.split("::", 1)[0]), len(rank)))


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """The real-node journey's timings (tests/node/conftest.py puts them on its reports).
    Here, not beside the journey: under pytest-xdist only this conftest is loaded where
    the summary is printed."""
    timings: dict[str, float] = {}
    for reports in terminalreporter.stats.values():
        for report in reports:
            for name, value in getattr(report, "user_properties", ()):
                if name == "journey timings" and len(value) >= len(timings):
                    timings = value
    if timings:
        terminalreporter.section("the journey on the real node, at the chart's defaults")
        for what, value in timings.items():
            terminalreporter.write_line(f"{what}: {json.dumps(value)}")
    # Any test's ("summary", (title, {figure: value})) property: what a note quotes (once,
    # though the test's setup, call and teardown reports all carry it).
    sections: dict[str, dict[str, Any]] = {}
    for reports in terminalreporter.stats.values():
        for report in reports:
            for name, value in getattr(report, "user_properties", ()):
                if name == "summary":
                    sections[value[0]] = value[1]
    for title, figures in sections.items():
        terminalreporter.section(title)
        for what, figure in figures.items():
            terminalreporter.write_line(f"{what}: {json.dumps(figure)}")


@pytest.fixture(scope="session")
def cluster() -> Iterator[Any]:
    from modelyard.operator.devcluster import LocalCluster

    with LocalCluster() as local:
        install_crd(local)
        yield local


@pytest.fixture
def namespace(cluster: Any) -> Iterator[str]:
    with fresh_namespace(cluster) as name:
        yield name


@pytest.fixture
def kube(cluster: Any, namespace: str) -> Kube:
    return Kube(cluster, namespace)


@pytest.fixture
def operator_identity(cluster: Any) -> Iterator[str]:
    """Point in-process operators at the cluster under their own user name."""
    with as_operator(cluster) as user:
        yield user


@pytest.fixture
def operator(operator_identity: str) -> Iterator[Any]:
    from modelyard.operator.runner import OperatorThread

    with OperatorThread() as running:
        yield running


@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, str]:
    """The demo generative model (a tiny Llama and its tokenizer, built here once per
    session under vLLM's Python): its directory and manifest digest."""
    from llmsupport import build_model

    path = tmp_path_factory.mktemp("tiny-llm") / "model"
    return path, build_model(path)

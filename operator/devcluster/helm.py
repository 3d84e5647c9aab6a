"""Build and cache Helm from its pinned upstream Go module, for the chart's tests.

Helm is built like the cluster's own binaries (:mod:`.binaries`): once, through the
Go module proxy, with ``CGO_ENABLED=0`` and ``-trimpath``, and its version stamped
through ``-ldflags`` exactly as Helm's own Makefile does (the release version, and
the Kubernetes version its linter and ``.Capabilities`` assume, taken from the
``k8s.io/client-go`` the release requires). ``helm.sh/helm/v3`` has no replace
lines, so ``go install module/cmd/helm@version`` builds it; the checksum database
verifies the module and its ``go.sum`` pins every dependency. The result lives in
``<cache>/helm-v<version>/bin/helm``, built under the same file lock and atomic rename
as the other binaries (:func:`.binaries.cached_build`), so concurrent test sessions
build it once.

Called by ``tests/cluster/test_helm.py`` and ``test_rbac.py`` through
:func:`ensure_helm`; ``python -m modelyard.operator.devcluster.helm`` builds it now
and prints its path.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .binaries import BuildError, _json_field, _run, cached_build

HELM_VERSION = "3.22.0"
HELM_MODULE = "helm.sh/helm/v3"


@dataclass(frozen=True)
class Helm:
    """A built Helm and the private home folders it runs with."""

    root: Path

    @property
    def path(self) -> Path:
        return self.root / "bin" / "helm"

    def is_complete(self) -> bool:
        return self.path.is_file()

    def run(self, *args: str, home: Path, kubeconfig: Path | None = None,
            input: str | None = None, check: bool = True,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run ``helm ARGS`` (against ``kubeconfig`` when given: lint and template need no
        cluster), keeping Helm's cache, config and data (repositories, plugins, registry
        logins) under ``home`` rather than the user's."""
        cluster = [f"--kubeconfig={kubeconfig}"] if kubeconfig else []
        proc = subprocess.run(
            [str(self.path), *cluster, *args],
            input=input, capture_output=True, text=True, check=False, timeout=timeout,
            env=helm_env(home),
        )
        if check and proc.returncode != 0:
            raise subprocess.CalledProcessError(proc.returncode, proc.args, proc.stdout,
                                                proc.stderr)
        return proc


def helm_env(home: Path) -> dict[str, str]:
    """The current environment with Helm's three home folders moved under ``home``."""
    return {
        **os.environ,
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }


def version_key() -> str:
    return f"helm-v{HELM_VERSION}"


def ensure_helm(root: Path | None = None) -> Helm:
    """Return the cached Helm, building it first when missing (safe across processes)."""
    built = cached_build(f"Helm v{HELM_VERSION}", version_key(),
                         lambda path: Helm(path).is_complete(),
                         lambda go, out, work: _build(go, work, Helm(out)), root=root)
    return Helm(built)


def _build(go: str, workdir: Path, out: Helm) -> None:
    out.path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-buildvcs=false"}
    module = f"{HELM_MODULE}@v{HELM_VERSION}"
    downloaded = _run([go, "mod", "download", "-json", module], cwd=workdir, env=env)
    go_mod = Path(_json_field(downloaded, "GoMod")).read_text()
    major, minor = kubernetes_api_version(go_mod)
    _run([go, "install", "-trimpath", f"-ldflags={ldflags(major, minor)}",
          f"{HELM_MODULE}/cmd/helm@v{HELM_VERSION}"],
         cwd=workdir, env={**env, "GOBIN": str(out.path.parent)})


def ldflags(k8s_major: int, k8s_minor: int) -> str:
    """Helm's Makefile flags: its version, and the Kubernetes version it assumes offline."""
    version_pkg = f"{HELM_MODULE}/internal/version"
    flags = ["-w -s", f"-X {version_pkg}.version=v{HELM_VERSION}",
             f"-X {version_pkg}.gitTreeState=clean"]
    for pkg in ("pkg/lint/rules", "pkg/chartutil"):
        flags += [f"-X {HELM_MODULE}/{pkg}.k8sVersionMajor={k8s_major}",
                  f"-X {HELM_MODULE}/{pkg}.k8sVersionMinor={k8s_minor}"]
    return " ".join(flags)


def kubernetes_api_version(go_mod: str) -> tuple[int, int]:
    """Kubernetes ``(major, minor)`` matching the ``k8s.io/client-go`` a go.mod requires
    (client-go v0.37.x is Kubernetes 1.37), as Helm's Makefile derives it."""
    found = re.search(r"^\s*k8s\.io/client-go v0\.(\d+)\.\d+", go_mod, re.MULTILINE)
    if found is None:
        raise BuildError(f"{HELM_MODULE} v{HELM_VERSION}: no k8s.io/client-go in its go.mod")
    return 1, int(found.group(1))


def _main() -> int:
    print(ensure_helm().path)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())

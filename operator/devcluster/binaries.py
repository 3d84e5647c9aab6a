"""Build and cache the local cluster's binaries from pinned upstream releases.

No registry ships kube-apiserver and friends as packages, so we compile them once
through the Go module proxy and keep them under ``~/.cache/modelyard/`` keyed by
version. Kubernetes cannot be ``go install``-ed directly (its ``go.mod`` points the
``k8s.io/*`` staging modules at local folders), so a small wrapper module in
``gomod/`` requires ``k8s.io/kubernetes`` and replaces each staging module by its
published version; its committed ``go.sum`` pins every byte. etcd is built from that
same module graph, at exactly the version Kubernetes itself depends on. kwok has
no replace lines and builds with ``go install module@version``.

Called by :mod:`modelyard.operator.devcluster.cluster` (and so by the test fixture
and ``modelyard dev``) through :func:`ensure_binaries`.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

log = logging.getLogger(__name__)

KUBERNETES_VERSION = "1.37.2"
ETCD_VERSION = "3.7.0"  # what k8s.io/kubernetes v1.37.2 requires; see gomod/go.mod
KWOK_VERSION = "0.8.0"

_KUBE_COMMANDS = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl")
_KWOK_STAGES = (
    "node/fast/node-initialize.yaml",
    "node/heartbeat-with-lease/node-heartbeat-with-lease.yaml",
    "pod/fast/pod-ready.yaml",
    "pod/fast/pod-complete.yaml",
    "pod/fast/pod-delete.yaml",
)


class BuildError(RuntimeError):
    """Building the cluster binaries failed; the message carries the tool's output."""


@dataclass(frozen=True)
class Binaries:
    """Paths of everything the local cluster runs."""

    root: Path

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    def path(self, name: str) -> Path:
        return self.bin / name

    @property
    def kwok_stages(self) -> Path:
        return self.root / "kwok-stages.yaml"

    def is_complete(self) -> bool:
        names = (*_KUBE_COMMANDS, "etcd", "kwok")
        return self.kwok_stages.is_file() and all(self.path(n).is_file() for n in names)


def cache_root() -> Path:
    """``$MODELYARD_CACHE`` or ``$XDG_CACHE_HOME/modelyard`` or ``~/.cache/modelyard``."""
    if explicit := os.environ.get("MODELYARD_CACHE"):
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "modelyard"


def version_key() -> str:
    return f"k8s-v{KUBERNETES_VERSION}-etcd-v{ETCD_VERSION}-kwok-v{KWOK_VERSION}"


def ensure_binaries(root: Path | None = None) -> Binaries:
    """Return the cached cluster binaries, building them first when missing."""
    built = cached_build(
        f"Kubernetes v{KUBERNETES_VERSION}, etcd v{ETCD_VERSION} and kwok v{KWOK_VERSION}",
        version_key(), lambda path: Binaries(path).is_complete(),
        lambda go, out, work: _build(go, work, Binaries(out)), root=root)
    return Binaries(built)


def cached_build(what: str, key: str, complete: Callable[[Path], bool],
                 build: Callable[[str, Path, Path], None], *, root: Path | None = None) -> Path:
    """``<cache>/<key>``, made by ``build(go, out_dir, work_dir)`` first when missing.

    Every pinned upstream artefact of the local cluster (Kubernetes, kwok, Prometheus,
    Helm, the Gateway API CRDs, the real node's kubelet and containerd) is made this way,
    through Go's module proxy only. See :func:`cached_tree` for the locking.
    """
    def with_go(out: Path, work: Path) -> None:
        go = shutil.which("go")
        if go is None:
            raise BuildError(f"Go (>= 1.26) is needed once to build {what}; install it and "
                             "try again (nothing is downloaded outside Go's module proxy).")
        build(go, out, work)

    return cached_tree(f"{what} from source", key, complete, with_go, root=root)


def cached_tree(what: str, key: str, complete: Callable[[Path], bool],
                build: Callable[[Path, Path], None], *, root: Path | None = None,
                verb: str = "building") -> Path:
    """``<cache>/<key>``, made by ``build(out_dir, work_dir)`` first when missing.

    Safe to call from several processes at once: one builds, the others wait on a file
    lock and then find the finished tree. The build goes to a temporary folder that is
    renamed into place, so an interrupted build leaves nothing half-written behind.
    """
    base = root or cache_root()
    target = base / key
    if complete(target):
        return target
    base.mkdir(parents=True, exist_ok=True)
    with _locked(base / f"{key}.lock"):
        if complete(target):
            return target
        started = time.monotonic()
        print(f"modelyard: {verb} {what} (once; cached in {target})...", flush=True)
        with tempfile.TemporaryDirectory(dir=base, prefix=f".build-{key}-") as tmp:
            staging = Path(tmp) / "out"
            staging.mkdir()
            work = Path(tmp) / "work"
            work.mkdir()
            build(staging, work)
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)
        elapsed = time.monotonic() - started
        (target / "build-seconds").write_text(f"{elapsed:.0f}\n")
        print(f"modelyard: {what} done in {elapsed:.0f} s", flush=True)
    return target


def kube_ldflags() -> str:
    """``-ldflags`` that stamp the pinned Kubernetes version into its binaries."""
    version_pkg = "k8s.io/component-base/version"
    major, minor, _ = KUBERNETES_VERSION.split(".")
    return " ".join(
        [
            "-s -w",
            f"-X {version_pkg}.gitVersion=v{KUBERNETES_VERSION}",
            f"-X {version_pkg}.gitMajor={major}",
            f"-X {version_pkg}.gitMinor={minor}",
            f"-X {version_pkg}.gitTreeState=clean",
            f"-X k8s.io/client-go/pkg/version.gitVersion=v{KUBERNETES_VERSION}",
        ]
    )


def write_wrapper_module(workdir: Path) -> Path:
    """A copy of the wrapper module ``gomod/`` (go.mod, go.sum, tools.go) in ``workdir``."""
    module = workdir / "gomod"
    module.mkdir()
    for name in ("go.mod", "go.sum", "tools.go"):
        source = resources.files("modelyard.operator.devcluster").joinpath("gomod", name)
        (module / name).write_bytes(source.read_bytes())
    return module


def _build(go: str, workdir: Path, out: Binaries) -> None:
    out.bin.mkdir(parents=True, exist_ok=True)
    module = write_wrapper_module(workdir)
    env = {**os.environ, "GOFLAGS": "-mod=readonly -buildvcs=false", "CGO_ENABLED": "0"}
    build = [go, "build", "-trimpath", f"-ldflags={kube_ldflags()}"]
    run_tool([*build, "-o", f"{out.bin}/",
              *(f"k8s.io/kubernetes/cmd/{c}" for c in _KUBE_COMMANDS)], cwd=module, env=env)
    run_tool([*build, "-o", str(out.path("etcd")), "go.etcd.io/etcd/server/v3"],
             cwd=module, env=env)
    kwok = f"sigs.k8s.io/kwok/cmd/kwok@v{KWOK_VERSION}"
    run_tool([go, "install", "-trimpath", "-ldflags=-s -w", kwok],
         cwd=module, env={**env, "GOBIN": str(out.bin), "GOFLAGS": "-buildvcs=false"})

    # kwok has no built-in lifecycle: it plays the Stage objects it is given. Use the
    # upstream "fast" stages from the very module version we built.
    listing = run_tool([go, "list", "-m", "-json", f"sigs.k8s.io/kwok@v{KWOK_VERSION}"],
                   cwd=module, env={**env, "GOFLAGS": "-mod=mod"})
    kwok_dir = Path(_json_field(listing, "Dir"))
    docs = [(kwok_dir / "kustomize" / "stage" / rel).read_text() for rel in _KWOK_STAGES]
    out.kwok_stages.write_text("\n---\n".join(d.strip() for d in docs) + "\n")


def _json_field(text: str, field: str) -> str:
    import json

    value = json.loads(text).get(field)
    if not isinstance(value, str):
        raise BuildError(f"`go list -m -json` gave no {field!r}: {text[:500]}")
    return value


def run_tool(cmd: list[str], *, cwd: Path, env: dict[str, str]) -> str:
    log.info("running %s", " ".join(cmd[:3]))
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise BuildError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc.stdout


_run = run_tool  # the name the other pinned builds (helm, gateway, prometheus) use


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)

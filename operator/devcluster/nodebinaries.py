"""Build and cache a real node's binaries from pinned sources: kubelet, kube-proxy,
containerd and its runc shim, ctr, and the sandbox ("pause") program.

The kubelet and kube-proxy come from the very Kubernetes release the control plane is
built from (the wrapper module ``gomod/``, whose ``tools.go`` names them so its
``go.sum`` pins their dependencies too). containerd is ``go install``-ed at
:data:`CONTAINERD_VERSION` with the build tags that leave out the snapshotters this
machine has no use for (btrfs, devmapper, zfs need C libraries). The pause program is
a few lines of Go below, built static; :mod:`.images` puts it in a ``scratch`` image so
the node needs no registry. runc and the CNI plugins are Debian's (see
``scripts/system-packages.txt``): :func:`host_tools` finds them.

Everything is cached under ``~/.cache/modelyard/<key>`` like the control plane
(:func:`.binaries.cached_build`): built once, under a file lock, through Go's module
proxy only. ``modelyard build-node`` builds it ahead of the tests.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .binaries import (
    KUBERNETES_VERSION,
    BuildError,
    cached_build,
    kube_ldflags,
    run_tool,
    write_wrapper_module,
)

CONTAINERD_VERSION = "2.4.2"
CONTAINERD_TAGS = "no_btrfs no_devmapper no_zfs"
CNI_PLUGIN_DIRS = (Path("/usr/lib/cni"), Path("/opt/cni/bin"))
_KUBE_NODE_COMMANDS = ("kubelet", "kube-proxy")
_CONTAINERD_COMMANDS = ("containerd", "containerd-shim-runc-v2", "ctr")

# The sandbox of every pod: holds its namespaces, reaps orphans when it is PID 1 of a
# shared PID namespace, exits 0 on SIGINT/SIGTERM. Static, no dependencies.
PAUSE_SOURCE = """\
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	signals := make(chan os.Signal, 8)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for s := range signals {
		if s != syscall.SIGCHLD {
			os.Exit(0)
		}
		for {
			pid, err := syscall.Wait4(-1, nil, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
"""
PAUSE_GO_MOD = "module modelyard.dev/pause\n\ngo 1.26\n"


@dataclass(frozen=True)
class NodeBinaries:
    """Paths of what a real node runs (besides Debian's runc and CNI plugins)."""

    root: Path

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    def path(self, name: str) -> Path:
        return self.bin / name

    def is_complete(self) -> bool:
        names = (*_KUBE_NODE_COMMANDS, *_CONTAINERD_COMMANDS, "pause")
        return all(self.path(n).is_file() for n in names)


@dataclass(frozen=True)
class HostTools:
    """Debian's runc and CNI plugins, which the node uses as the system provides them."""

    runc: Path
    cni_bin_dir: Path


def node_version_key() -> str:
    pause = hashlib.sha256((PAUSE_SOURCE + PAUSE_GO_MOD).encode()).hexdigest()[:10]
    return f"node-k8s-v{KUBERNETES_VERSION}-containerd-v{CONTAINERD_VERSION}-pause-{pause}"


def ensure_node_binaries(root: Path | None = None) -> NodeBinaries:
    """Return the cached node binaries, building them first when missing."""
    built = cached_build(
        f"kubelet and kube-proxy v{KUBERNETES_VERSION}, containerd v{CONTAINERD_VERSION} "
        "and the pause program",
        node_version_key(), lambda path: NodeBinaries(path).is_complete(),
        lambda go, out, work: _build(go, work, NodeBinaries(out)), root=root)
    return NodeBinaries(built)


def host_tools() -> HostTools:
    """runc and the CNI plugins, or a :class:`BuildError` naming the Debian packages."""
    runc = shutil.which("runc")
    cni = next((d for d in CNI_PLUGIN_DIRS if (d / "bridge").is_file()), None)
    if runc is None or cni is None:
        raise BuildError("a real node needs runc and the CNI plugins: apt-get install runc "
                         "containernetworking-plugins (see scripts/system-packages.txt)")
    return HostTools(Path(runc), cni)


def _build(go: str, workdir: Path, out: NodeBinaries) -> None:
    out.bin.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "GOFLAGS": "-mod=readonly -buildvcs=false", "CGO_ENABLED": "0"}

    module = write_wrapper_module(workdir)
    run_tool([go, "build", "-trimpath", f"-ldflags={kube_ldflags()}", "-o", f"{out.bin}/",
              *(f"k8s.io/kubernetes/cmd/{c}" for c in _KUBE_NODE_COMMANDS)],
             cwd=module, env=env)

    version = f"github.com/containerd/containerd/v2/version.Version=v{CONTAINERD_VERSION}"
    run_tool([go, "install", "-trimpath", "-tags", CONTAINERD_TAGS,
              f"-ldflags=-s -w -X {version}",
              *(f"github.com/containerd/containerd/v2/cmd/{c}@v{CONTAINERD_VERSION}"
                for c in _CONTAINERD_COMMANDS)],
             cwd=workdir, env={**env, "GOBIN": str(out.bin), "GOFLAGS": "-buildvcs=false"})

    pause = workdir / "pause"
    pause.mkdir()
    (pause / "go.mod").write_text(PAUSE_GO_MOD)
    (pause / "main.go").write_text(PAUSE_SOURCE)
    run_tool([go, "build", "-trimpath", "-ldflags=-s -w", "-o", str(out.path("pause")), "."],
             cwd=pause, env={**env, "GOFLAGS": "-buildvcs=false"})


__all__ = ["CONTAINERD_VERSION", "HostTools", "NodeBinaries", "ensure_node_binaries",
           "host_tools", "node_version_key"]

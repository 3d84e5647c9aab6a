"""Everything a real node needs, in one place: its binaries, Debian's runc and CNI
plugins, and the images. ``modelyard build-node`` (:func:`build_node_artefacts`) builds
what is missing, with progress printed; a cluster with real nodes and the tests only
look them up (:func:`find_node_artefacts`), so no slow build runs under a test's timeout.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .binaries import cache_root
from .images import Images, ensure_images, find_images
from .nodebinaries import (
    HostTools,
    NodeBinaries,
    ensure_node_binaries,
    host_tools,
    node_version_key,
)

BUILD_COMMAND = "modelyard build-node"


class NodeArtefactsMissing(RuntimeError):
    """The real node's artefacts are not built for this source tree."""


@dataclass(frozen=True)
class NodeArtefacts:
    binaries: NodeBinaries
    tools: HostTools
    images: Images


def build_node_artefacts(context: Path | None = None) -> NodeArtefacts:
    """Build (once; cached) and return everything a real node runs."""
    tools = host_tools()
    binaries = ensure_node_binaries()
    return NodeArtefacts(binaries, tools, ensure_images(context, binaries))


def find_node_artefacts(context: Path | None = None) -> NodeArtefacts:
    """The built artefacts for this source tree, or :class:`NodeArtefactsMissing` naming the
    command that builds them."""
    binaries = NodeBinaries(cache_root() / node_version_key())
    images = find_images(context)
    if not binaries.is_complete() or images is None:
        what = "the node binaries" if not binaries.is_complete() else "the images"
        raise NodeArtefactsMissing(
            f"a real node needs {what} built for this source tree (images are keyed by a "
            f"hash of the files that go into them): run `{BUILD_COMMAND}` first "
            "(`make test` does it in its set-up step)")
    return NodeArtefacts(binaries, host_tools(), images)


__all__ = ["BUILD_COMMAND", "NodeArtefacts", "NodeArtefactsMissing", "build_node_artefacts",
           "find_node_artefacts"]

"""The Gateway API's CRDs for the local cluster, from the pinned upstream Go module.

No package registry this project reaches ships the published CRD manifests, but the
``sigs.k8s.io/gateway-api`` module carries them (``config/crd/standard``): ``go mod
download`` fetches the module through the proxy, verified against the checksum
database, and the standard-channel CRDs are copied into the cache once. A cluster
started with ``ClusterConfig(gateway_api=True)`` installs them, so the operator finds
``HTTPRoute`` and splits canary traffic by route weights.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .binaries import _json_field, _run, cached_build

GATEWAY_API_VERSION = "1.6.3"
_MODULE = "sigs.k8s.io/gateway-api"


def ensure_gateway_crds(root: Path | None = None) -> list[Path]:
    """The standard-channel CRD manifests, fetched and cached first when missing."""

    def fetch(go: str, out: Path, work: Path) -> None:
        listing = _run([go, "mod", "download", "-json", f"{_MODULE}@v{GATEWAY_API_VERSION}"],
                       cwd=work, env={**os.environ, "GOFLAGS": "-mod=mod"})
        source = Path(_json_field(listing, "Dir")) / "config" / "crd" / "standard"
        for manifest in sorted(source.glob("gateway.networking.k8s.io_*.yaml")):
            shutil.copyfile(manifest, out / manifest.name)

    folder = cached_build(f"the Gateway API v{GATEWAY_API_VERSION} CRDs",
                          f"gateway-api-v{GATEWAY_API_VERSION}",
                          lambda path: (path / "gateway.networking.k8s.io_httproutes.yaml")
                          .is_file(), fetch, root=root)
    return sorted(folder.glob("gateway.networking.k8s.io_*.yaml"))

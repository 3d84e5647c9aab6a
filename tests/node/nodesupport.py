"""Helpers of the real-node tests."""

from __future__ import annotations

import contextlib
import http.server
import json
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

NODE_SELECTOR = {"modelyard.dev/node": "real"}
# The journey's timings, shown in pytest's terminal summary (tests/node/conftest.py), so a
# plain `make test` reports them without -s.
JOURNEY_TIMINGS = pytest.StashKey[dict[str, float]]()


def kube_json(cluster: Any, *args: str) -> Any:
    return json.loads(cluster.kubectl(*args, "-o", "json").stdout)


@contextlib.contextmanager
def restricted_namespace(cluster: Any) -> Iterator[str]:
    name = f"rn-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    cluster.kubectl("label", "namespace", name, "pod-security.kubernetes.io/enforce=restricted",
                    "pod-security.kubernetes.io/enforce-version=latest")
    cluster.kubectl("wait", "--for=create", "serviceaccount/default", "-n", name,
                    "--timeout=30s")
    try:
        yield name
    finally:
        cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@contextlib.contextmanager
def serve_file(path: Path, address: str, gets: list[str] | None = None) -> Iterator[str]:
    """``path`` over HTTP on ``address`` (the host's end of the node's link): the URL.
    Each GET's path is appended to ``gets``, if given (the store's request log)."""
    directory = str(path.parent)

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=directory, **kwargs)

        def do_GET(self) -> None:
            if gets is not None:
                gets.append(self.path)
            super().do_GET()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer((address, 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{address}:{server.server_address[1]}/{path.name}"
    finally:
        server.shutdown()
        server.server_close()


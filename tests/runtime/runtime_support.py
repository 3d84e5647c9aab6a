"""Small helpers of the runtime tests (importable by name, unlike conftest.py)."""

from __future__ import annotations

from modelyard.operator.devcluster.ports import reserve_port


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on every address (``host`` included), reserved for this test run."""
    del host  # a reserved port is free on all of them
    return reserve_port()

"""The local processes' listening ports: never one the kernel or another run can take."""

from __future__ import annotations

import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from modelyard.operator.devcluster import ports


def _ephemeral_low() -> int:
    return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])


def test_a_reserved_port_is_free_and_below_the_ephemeral_range() -> None:
    port = ports.reserve_port()
    try:
        assert 1024 <= port < _ephemeral_low()
        with socket.socket() as server:  # what the child process will do with it
            server.bind(("127.0.0.1", port))
            server.listen()
    finally:
        ports.release_port(port)


def test_another_process_never_gets_a_port_this_one_holds() -> None:
    held = ports.reserve_port()
    try:
        # The other process starts its search exactly at our port.
        code = (f"import random; random.randrange = lambda a, b: {held}; "
                "from modelyard.operator.devcluster.ports import reserve_port; "
                "print(reserve_port())")
        other = int(subprocess.run([sys.executable, "-c", code], capture_output=True,
                                   text=True, check=True).stdout)
        assert other != held
    finally:
        ports.release_port(held)


def test_a_port_someone_listens_on_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    busy = ports.reserve_port()
    ports.release_port(busy)  # unlocked, but a foreign listener holds it
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", busy))
        listener.listen()
        monkeypatch.setattr(random, "randrange", lambda a, b: busy)
        port = ports.reserve_port()
        ports.release_port(port)
    assert port != busy

"""Listening ports for the local processes we start, that nothing else can take first.

The usual trick (bind port 0, read the port, close the socket, hand the number to a child)
leaves a window in which the kernel may give that port to any other socket: an outgoing
connection's source port, or another test's ``bind(0)``. On a busy CI machine it did (kwok:
``bind: address already in use``). Ports here come from *below* the kernel's ephemeral
range (``net.ipv4.ip_local_port_range``), which ``connect()`` and ``bind(0)`` never use,
and each is held by a file lock until released (or its process exits), so two test or
benchmark processes on one machine never pick the same one.
"""

from __future__ import annotations

import contextlib
import random
import socket
import tempfile
import threading
from pathlib import Path
from typing import IO

from .locks import try_lock

LOCK_DIR = Path(tempfile.gettempdir()) / "modelyard-ports"
_SPAN = 12_000  # ports handed out: the _SPAN just below the ephemeral range
_DEFAULT_EPHEMERAL_LOW = 32768

_held: dict[int, IO[bytes]] = {}
_guard = threading.Lock()


class NoFreePortError(RuntimeError):
    pass


def reserve_port() -> int:
    """A TCP port that is free now and stays ours until :func:`release_port` (or exit)."""
    high = _ephemeral_low()
    low = max(1024, high - _SPAN)
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    start = random.randrange(low, high)
    with _guard:
        for offset in range(high - low):
            port = low + (start - low + offset) % (high - low)
            if port in _held:
                continue
            handle = try_lock(LOCK_DIR / f"{port}.lock")
            if handle is None:
                continue
            if _bindable(port):
                _held[port] = handle
                return port
            handle.close()
    raise NoFreePortError(f"no free port between {low} and {high}")


def release_port(port: int) -> None:
    """Give a reserved port back (its listener should be gone by now)."""
    with _guard:
        handle = _held.pop(port, None)
    if handle is not None:
        handle.close()


def _bindable(port: int) -> bool:
    # All addresses at once: a listener on any one of them (127.0.0.1, the pod network's
    # host address) makes this fail. SO_REUSEADDR, as the servers themselves set it, so a
    # connection lingering in TIME_WAIT does not count as taken.
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("", port))
        except OSError:
            return False
    return True


def _ephemeral_low() -> int:
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        return int(text.split()[0])
    except (OSError, ValueError, IndexError):
        return _DEFAULT_EPHEMERAL_LOW


__all__ = ["LOCK_DIR", "NoFreePortError", "release_port", "reserve_port"]

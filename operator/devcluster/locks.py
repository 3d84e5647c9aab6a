"""The one file-lock primitive of the local cluster: claim a numbered resource (a pod
network block, a port) for as long as a handle stays open, across processes."""

from __future__ import annotations

import fcntl
from pathlib import Path
from typing import IO

__all__ = ["try_lock"]


def try_lock(path: Path) -> IO[bytes] | None:
    """An open handle holding an exclusive lock on ``path``, or None if another holds it.
    The lock goes with the handle: close it, or let the process exit."""
    handle = path.open("wb")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle

"""API keys: who may call the model, read from a mounted Secret and re-read when it changes.

Called by ``server.InferenceDoor`` on every HTTP request when ``MODELYARD_API_KEYS`` is set.
The operator mounts the Secret named in ``spec.auth.apiKeySecret`` as a volume: a
directory with one file per Secret entry, every non-empty line of every file a valid key
(so several keys are valid at once, and a rotation is: add the new key, move the clients,
remove the old one). A single file works too (one key per line).

The kubelet updates a mounted Secret in place (an atomic swap of the directory's
``..data`` link) within about a minute of an edit; the keys are re-read at most every
``recheck_seconds``, and only when the files' content digest changed are they rebuilt, so
a rotation takes effect without restarting the pod and a request costs one monotonic
clock read in between. Keys are kept only as SHA-256 digests and compared with
``hmac.compare_digest`` against every key (no early exit), the way vLLM's own
``--api-key`` middleware does; nothing here logs a key or what a client sent.

A request is allowed when it carries ``Authorization: Bearer <key>`` with a valid key.
When the file holds no key at all, nothing is allowed (closed, logged once per change).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["ApiKeys", "bearer_token"]

log = logging.getLogger(__name__)


def bearer_token(header: bytes | None) -> bytes | None:
    """The token of an ``Authorization: Bearer <token>`` value (scheme in any case)."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(b" ")
    if scheme.lower() != b"bearer" or not token.strip():
        return None
    return token.strip()


class ApiKeys:
    """The valid keys of one file or directory, reloaded when its content changes."""

    def __init__(self, path: Path, recheck_seconds: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self.recheck_seconds = recheck_seconds
        self._clock = clock
        self._digest = b""
        self._keys: tuple[bytes, ...] = ()
        self._checked = float("-inf")
        self.reload()

    @property
    def count(self) -> int:
        return len(self._keys)

    def _files(self) -> list[Path]:
        if not self.path.is_dir():
            return [self.path]
        # A mounted Secret: the entries are links into ..data; the dot-entries are the
        # kubelet's own bookkeeping.
        return sorted(p for p in self.path.iterdir()
                      if not p.name.startswith(".") and p.is_file())

    def reload(self) -> bool:
        """Read the keys again; True when they changed."""
        self._checked = self._clock()
        try:
            contents = [f.read_bytes() for f in self._files()]
        except OSError as error:
            # Mid-swap or briefly missing: keep the keys we have, try again next time.
            log.warning("API keys at %s unreadable, keeping the previous ones: %s",
                        self.path, error.strerror)
            return False
        digest = hashlib.sha256(b"\0".join(contents)).digest()
        if hmac.compare_digest(digest, self._digest):
            return False
        keys = {line.strip() for content in contents for line in content.splitlines()}
        keys.discard(b"")
        self._keys = tuple(sorted(hashlib.sha256(key).digest() for key in keys))
        self._digest = digest
        if self._keys:
            log.info("API keys loaded from %s: %d valid", self.path, len(self._keys))
        else:
            log.warning("no API key in %s: every guarded request is refused", self.path)
        return True

    def allows(self, authorization: bytes | None) -> bool:
        """Whether an ``Authorization`` header value carries a valid key."""
        if self._clock() - self._checked >= self.recheck_seconds:
            self.reload()
        token = bearer_token(authorization)
        if token is None:
            return False
        presented = hashlib.sha256(token).digest()
        match = False
        for key in self._keys:
            match |= hmac.compare_digest(presented, key)
        return match

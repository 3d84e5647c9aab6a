"""HTTPS: the server's certificate, reloaded when the mounted files change.

Called by ``__main__`` when ``MODELYARD_TLS_CERT_FILE`` and ``MODELYARD_TLS_KEY_FILE`` are
set. The operator mounts a ``kubernetes.io/tls`` Secret (``tls.crt``, ``tls.key``: the
shape cert-manager writes and renews) as a volume; the kubelet swaps the files in place
when the Secret changes. uvicorn builds the listener's ``ssl.SSLContext`` once, from the
files; :class:`CertificateReloader` watches their content digest (every
``interval_seconds``, on the event loop, so no handshake runs during the swap) and loads
the new chain into that same context: new connections get the renewed certificate,
open ones keep theirs, and nothing restarts. This is what vLLM's ``--enable-ssl-refresh``
does for its server. A half-written pair (a certificate whose key does not match yet)
is kept out until both files agree.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import ssl
from pathlib import Path

__all__ = ["CertificateReloader"]

log = logging.getLogger(__name__)


class CertificateReloader:
    """Keep ``context``'s certificate chain equal to ``certfile`` and ``keyfile``."""

    def __init__(self, context: ssl.SSLContext, certfile: Path, keyfile: Path,
                 interval_seconds: float = 2.0) -> None:
        self.context = context
        self.certfile = certfile
        self.keyfile = keyfile
        self.interval_seconds = interval_seconds
        self._digest = self._read_digest()

    def _read_digest(self) -> bytes | None:
        try:
            return hashlib.sha256(self.certfile.read_bytes() + b"\0"
                                  + self.keyfile.read_bytes()).digest()
        except OSError:
            return None

    def check(self) -> bool:
        """Load the files again when their content changed; True when the context did."""
        digest = self._read_digest()
        if digest is None or digest == self._digest:
            return False
        try:
            # A scratch context first: a pair that does not match must not reach the live
            # one (OpenSSL would drop the serving certificate on a mismatched key).
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(self.certfile, self.keyfile)
            self.context.load_cert_chain(self.certfile, self.keyfile)
        except (ssl.SSLError, OSError) as error:
            log.warning("TLS certificate at %s not reloaded (kept the previous one): %s",
                        self.certfile, error)
            return False
        self._digest = digest
        log.info("TLS certificate reloaded from %s", self.certfile)
        return True

    async def watch(self) -> None:
        """Check every ``interval_seconds`` until cancelled."""
        while True:
            await asyncio.sleep(self.interval_seconds)
            self.check()

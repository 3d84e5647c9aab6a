"""``modelyard-runtime`` / ``python -m modelyard.runtime``: run one model server.

Parses flags over ``MODELYARD_*`` variables (``config.py``), builds the app
(``server.py``) and runs it under uvicorn in this one process. SIGTERM drains:
readiness turns false at once, and requests keep being answered until none
has arrived for ``drain_seconds`` (Kubernetes is taking the pod out of its
endpoints; on a loaded cluster that takes longer than any fixed wait), at most
``contract.DRAIN_LIMIT_SECONDS``; then the listener closes, in-flight and queued requests
complete, and the process exits 0. A model that fails to fetch or load exits 1 with the reason.

With ``MODELYARD_TLS_CERT_FILE`` / ``MODELYARD_TLS_KEY_FILE`` it serves HTTPS only (TLS 1.2
and later), and a renewed certificate is served without a restart (``tls.py``).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import ssl
import sys
import threading
import time
from collections.abc import Sequence
from types import FrameType

import uvicorn

from modelyard import contract
from modelyard.runtime.config import parse_config
from modelyard.runtime.errors import ConfigError
from modelyard.runtime.server import Runtime, create_app
from modelyard.runtime.tls import CertificateReloader

__all__ = ["main"]

log = logging.getLogger("modelyard.runtime")


class _DrainingServer(uvicorn.Server):
    """uvicorn, except that SIGTERM drains before it stops the listener."""

    def __init__(self, config: uvicorn.Config, runtime: Runtime) -> None:
        super().__init__(config)
        self.runtime = runtime
        self._drain: threading.Thread | None = None
        self._reloading: asyncio.Task[None] | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        config = self.config
        if not config.loaded:
            config.load()
        if isinstance(config.ssl, ssl.SSLContext):
            config.ssl.minimum_version = ssl.TLSVersion.TLSv1_2
            cert, key = self.runtime.config.tls_cert_file, self.runtime.config.tls_key_file
            assert cert is not None
            assert key is not None
            self._reloading = asyncio.get_running_loop().create_task(
                CertificateReloader(config.ssl, cert, key).watch(), name="tls-reload")
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and self._drain is None and not self.should_exit:
            self.runtime.begin_drain()
            self._drain = threading.Thread(target=self._drain_then_stop,
                                           args=(time.monotonic(),), daemon=True,
                                           name="drain")
            self._drain.start()
            return
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        self.runtime.begin_drain()
        self.should_exit = True

    def _drain_then_stop(self, since: float) -> None:
        """Close the listener once no request has arrived for ``drain_seconds`` (the
        endpoint is gone everywhere that routes to it), or ``DRAIN_LIMIT_SECONDS`` after
        SIGTERM: Knative's queue-proxy drains the same way (a quiet period, reset by each
        request)."""
        quiet_needed = self.runtime.config.drain_seconds
        limit = since + max(contract.DRAIN_LIMIT_SECONDS, quiet_needed)
        while not self.should_exit:
            now = time.monotonic()
            quiet = now - max(since, self.runtime.last_request)
            if quiet >= quiet_needed or now >= limit:
                log.info("drain over after %.1f s (%.1f s without a new request): closing "
                         "the listener, finishing in-flight requests", now - since, quiet)
                self.should_exit = True
                return
            time.sleep(min(quiet_needed - quiet, limit - now))

    def fatal(self, message: str) -> None:
        self.should_exit = True


def _tune_uvicorn(max_body_bytes: int) -> None:
    """Let a request body up to 4 MiB arrive without pausing the socket every 64 KiB.

    uvicorn pauses reading whenever more than 64 KiB of body is buffered and
    resumes when the app calls ``receive()``: a 250 KB JSON tensor then costs
    several pause/resume round trips through the event loop. Bodies are capped
    by ``max_body_bytes`` (413) anyway.
    """
    from uvicorn.protocols.http import h11_impl, httptools_impl

    limit = max(65536, min(max_body_bytes, 4 * 1024 * 1024))
    for module in (httptools_impl, h11_impl):
        if hasattr(module, "HIGH_WATER_LIMIT"):
            setattr(module, "HIGH_WATER_LIMIT", limit)  # noqa: B010


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit status."""
    try:
        config = parse_config(argv)
    except ConfigError as error:
        print(f"modelyard-runtime: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    _tune_uvicorn(config.max_body_bytes)
    holder: list[_DrainingServer] = []
    runtime = Runtime(config, on_fatal=lambda message: holder[0].fatal(message))  # noqa: PLW0108
    app = create_app(runtime)
    server = _DrainingServer(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            log_level=config.log_level,
            access_log=False,
            lifespan="on",
            server_header=False,
            proxy_headers=False,  # nothing here reads the client address; saves a pass per request
            ssl_certfile=config.tls_cert_file, ssl_keyfile=config.tls_key_file,
        ),
        runtime,
    )
    holder.append(server)
    server.run()
    return runtime.exit_code


if __name__ == "__main__":
    sys.exit(main())

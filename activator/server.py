"""The activator process: the proxy and admin apps on two uvicorn listeners, stopped
together on SIGTERM / SIGINT. :func:`main` is ``modelyard activator`` and
``python -m modelyard.activator``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterator, Sequence

import uvicorn
import uvloop

from .discovery import KubePods, PodSource, load_api_client
from .proxy import Activator
from .settings import PROG, Settings, parse_settings

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: :func:`serve` stops both listeners."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve(settings: Settings, source: PodSource) -> None:
    """Run the proxy and admin listeners until SIGTERM / SIGINT.

    On the signal, held requests are let go at once (503 with Retry-After: the client
    retries and reaches a live replica, of the activator or of the model) while forwarded
    ones finish within the graceful shutdown; then the process exits 0."""
    activator = Activator(settings, source)
    level = settings.log_level.lower()
    proxy = _Server(uvicorn.Config(
        activator, host=settings.host, port=settings.port, log_level=level, access_log=False,
        server_header=False, date_header=False, proxy_headers=False, lifespan="off",
        timeout_graceful_shutdown=25))
    admin = _Server(uvicorn.Config(
        activator.admin, host=settings.host, port=settings.admin_port, log_level=level,
        access_log=False, lifespan="off"))
    servers = (proxy, admin)

    def stop() -> None:
        if any(server.should_exit for server in servers):  # a second signal: now
            for server in servers:
                server.force_exit = True
        activator.discovery.shut()
        for server in servers:
            server.should_exit = True

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    tasks = [asyncio.create_task(server.serve()) for server in servers]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for server in servers:
            server.should_exit = True
        await asyncio.gather(*tasks, return_exceptions=True)
        await activator.aclose()


def main(argv: Sequence[str] | None = None, *, prog: str = PROG) -> int:
    """``modelyard activator [FLAGS]``; returns the exit status."""
    settings = parse_settings(argv, prog=prog)
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    source = KubePods(load_api_client(), settings.check_model_deployment)
    log.info("activator on %s:%d (metrics on :%d/metrics), holding requests up to %g s "
             "(generative models: %g s)", settings.host, settings.port, settings.admin_port,
             settings.timeout_seconds, settings.generative_timeout_seconds)
    # uvloop, as uvicorn itself would pick (uvicorn[standard] brings it): asyncio.run
    # would give the stock loop, whose own cost per relayed chunk is the larger part.
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(settings, source))
    return 0

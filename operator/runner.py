"""Run the operator in a background thread of the current process.

``modelyard dev up`` and the integration tests host the real operator this way
(the same handlers ``kopf run`` loads), so it can be started, stopped and
restarted in-process like kopf's own ``KopfRunner`` does, with a clean stop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from types import TracebackType
from typing import Self

import kopf

from .leader import ElectionConfig


class OperatorThread:
    """``election``: take part in leader election with these settings (default: from the
    environment, see :class:`~.leader.ElectionConfig`; off unless asked for).
    ``liveness``: serve kopf's health probe at this URL, e.g. http://0.0.0.0:8081/healthz."""

    def __init__(self, namespaces: Sequence[str] = (), *, start_timeout_s: float = 60.0,
                 election: ElectionConfig | None = None, liveness: str | None = None):
        self.namespaces = list(namespaces)
        self.election = election
        self.liveness = liveness
        self._timeout = start_timeout_s
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="modelyard-operator", daemon=True)

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(self._timeout):
            self.stop()
            raise RuntimeError(f"the operator did not start within {self._timeout:.0f} s: "
                               f"{self._error!r}")
        if self._error is not None:
            raise RuntimeError("the operator failed to start") from self._error

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise RuntimeError("the operator did not stop in time")

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _main(self) -> None:
        from . import handlers  # noqa: F401 - registers the handlers with kopf

        try:
            asyncio.run(kopf.operator(
                clusterwide=not self.namespaces,
                namespaces=self.namespaces,
                standalone=True,
                stop_flag=self._stop,
                ready_flag=self._ready,
                memo=kopf.Memo(election=self.election),
                liveness_endpoint=self.liveness,
            ))
        except BaseException as exc:  # surfaced by start()
            self._error = exc
            self._ready.set()

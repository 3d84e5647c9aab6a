"""Leader election on a ``coordination.k8s.io/v1`` Lease, the way client-go does it.

Several operator replicas can run (the Helm chart runs two); only the one holding the
Lease reconciles, scales and writes. The others keep their caches warm and take over
when the leader stops renewing:

* every ``retry_s`` each replica tries to acquire or renew the Lease
  (``MODELYARD_LEASE_NAME`` in ``MODELYARD_LEASE_NAMESPACE``), writing with the
  Lease's resourceVersion so two replicas can never both win a round;
* a Lease held by someone else counts as expired only when its record has not
  changed for ``leaseDurationSeconds`` *as measured on this replica's own clock*
  (client-go's rule: no trust in other machines' clocks);
* a leader that cannot renew for ``renew_deadline_s`` stops acting at once, before
  its Lease can expire for the others (``renew_deadline_s < lease_s``);
* a leader that stops cleanly releases the Lease, so a rolling upgrade hands over in
  about ``retry_s`` instead of ``lease_s``.

:class:`Elector` is the loop; the reads and writes go through :class:`~.kube.Writer`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LeaseRecord:
    holder: str | None
    duration_s: int
    acquired: dt.datetime | None
    renewed: dt.datetime | None
    transitions: int = 0
    resource_version: str | None = None


class LeaseStore(Protocol):
    def read_lease(self, namespace: str, name: str) -> LeaseRecord | None: ...

    def write_lease(self, namespace: str, name: str, record: LeaseRecord) -> bool:
        """Create (no resourceVersion) or replace; False when someone else wrote first."""
        ...


@dataclass(frozen=True)
class ElectionConfig:
    namespace: str
    name: str = "modelyard-operator"
    identity: str = ""
    lease_s: float = 15.0
    renew_deadline_s: float = 10.0
    retry_s: float = 2.0

    @classmethod
    def from_env(cls) -> ElectionConfig | None:
        """The settings from the environment; None when leader election is off."""
        if os.environ.get("MODELYARD_LEADER_ELECTION", "").lower() not in ("1", "true", "yes"):
            return None
        identity = os.environ.get("POD_NAME") or f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}"
        config = cls(
            namespace=os.environ.get("MODELYARD_LEASE_NAMESPACE")
            or os.environ.get("POD_NAMESPACE") or "default",
            name=os.environ.get("MODELYARD_LEASE_NAME", "modelyard-operator"),
            identity=identity,
            lease_s=float(os.environ.get("MODELYARD_LEASE_DURATION_SECONDS", "15")),
            renew_deadline_s=float(os.environ.get("MODELYARD_LEASE_RENEW_DEADLINE_SECONDS",
                                                  "10")),
            retry_s=float(os.environ.get("MODELYARD_LEASE_RETRY_SECONDS", "2")),
        )
        if not config.retry_s < config.renew_deadline_s < config.lease_s:
            raise ValueError("leader election needs retry < renew deadline < lease duration, "
                             f"got {config.retry_s}, {config.renew_deadline_s}, "
                             f"{config.lease_s}")
        return config


class Elector:
    def __init__(self, store: LeaseStore, config: ElectionConfig, *,
                 on_started: Callable[[], None] = lambda: None,
                 clock: Callable[[], float] = time.monotonic):
        self.store = store
        self.config = config
        self.leading = False
        self._on_started = on_started
        self._clock = clock
        self._observed: LeaseRecord | None = None
        self._observed_at = 0.0
        self._renewed_at = 0.0

    async def run(self) -> None:
        """Acquire, renew, and step down when renewing fails for too long. Forever."""
        while True:
            try:
                won = await asyncio.to_thread(self._try_acquire_or_renew)
            except Exception as exc:  # the API server is unreachable: same as losing a round
                log.warning("leader election: %s", exc)
                won = False
            now = self._clock()
            if won:
                self._renewed_at = now
                if not self.leading:
                    self.leading = True
                    log.info("leader election: %s now leads (lease %s/%s)",
                             self.config.identity, self.config.namespace, self.config.name)
                    self._on_started()
            elif self.leading and now - self._renewed_at > self.config.renew_deadline_s:
                self.leading = False
                log.warning("leader election: %s could not renew for %.0f s; stepping down",
                            self.config.identity, now - self._renewed_at)
            await asyncio.sleep(self.config.retry_s)

    async def release(self) -> None:
        """Give the Lease up (on a clean stop), so another replica need not wait it out."""
        if not self.leading:
            return
        self.leading = False
        with contextlib.suppress(Exception):
            record = await asyncio.to_thread(self.store.read_lease, self.config.namespace,
                                             self.config.name)
            if record is not None and record.holder == self.config.identity:
                await asyncio.to_thread(self.store.write_lease, self.config.namespace,
                                        self.config.name,
                                        replace(record, holder=None, duration_s=1))
                log.info("leader election: %s released the lease", self.config.identity)

    def _try_acquire_or_renew(self) -> bool:
        cfg = self.config
        wall = dt.datetime.now(dt.UTC)
        now = self._clock()
        record = self.store.read_lease(cfg.namespace, cfg.name)
        mine = LeaseRecord(holder=cfg.identity, duration_s=max(1, round(cfg.lease_s)),
                           acquired=wall, renewed=wall)
        if record is None:
            return self.store.write_lease(cfg.namespace, cfg.name, mine)
        if self._observed is None or record.resource_version != self._observed.resource_version:
            self._observed, self._observed_at = record, now
        held_by_other = record.holder not in (None, "", cfg.identity)
        if held_by_other and now < self._observed_at + record.duration_s:
            return False
        if record.holder == cfg.identity:
            mine = replace(mine, acquired=record.acquired or wall,
                           transitions=record.transitions)
        else:
            mine = replace(mine, transitions=record.transitions + 1)
        return self.store.write_lease(
            cfg.namespace, cfg.name, replace(mine, resource_version=record.resource_version))

"""The controller loop: observe → plan → execute → report, in one direction.

:class:`Reconciler` runs one pass for a ModelDeployment whenever kopf's handlers
(:mod:`.handlers`) see it or a child change, when the autoscaler hands over a decision
(:meth:`Reconciler.autoscaled`), when something the last pass planned falls due
(``Plan.recheck_after``: a pause ends, an analysis is due), and on a slow operator-wide
resync that is only a safety net. A pass:

1. **observes** (:mod:`.world`): one frozen picture from kopf's in-memory indexes (no API
   reads), plus whether the Gateway API is served and where the activator is;
2. **measures** a running canary (:mod:`.measure`), before planning, never during it;
3. **plans** (:func:`.plan.plan`, pure): the children, scale, what to retire, the
   status and Events, and when to run next;
4. **executes** and **reports** (:mod:`.execute`): only what differs is written.

Running it twice in a row changes nothing the second time. Passes for one resource are
serialised by a per-resource lock; different resources run concurrently. Only the leader
acts (see :mod:`.leader`); a follower keeps track of what exists.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from . import api_status, gate, metrics, plan, rollout, world
from .activation import ActivatorLink
from .execute import Executor
from .kube import GoneError, Writer
from .measure import CanaryJudge, Scraper, scrape_metrics
from .render import NodeCache
from .world import Key, Observed

__all__ = ["Key", "Observed", "Reconciler", "scrape_metrics"]

log = logging.getLogger(__name__)
GATEWAY_RECHECK_S = 60.0
RETRY_S = 10.0  # a pass that failed runs again this soon (kopf's own retries are slower)

Snapshot = Callable[[], Observed | None]


class Reconciler:
    def __init__(self, writer: Writer, clock: Callable[[], dt.datetime] | None = None,
                 scraper: Scraper | None = None, leading: Callable[[], bool] = lambda: True,
                 activator: ActivatorLink | None = None, *,
                 node_cache: NodeCache | None = None,
                 network_peers: tuple[Mapping[str, Any], ...] = ()):
        self.activator = activator  # where a model at zero sends its traffic (activation.py)
        self.node_cache = node_cache  # the node-local model cache the pods mount, if any
        self.network_peers = network_peers  # admitted by every model's NetworkPolicy
        self.leading = leading  # only the leader acts (see leader.py); others keep track
        self._writer = writer
        self._executor = Executor(writer)
        self._judge = CanaryJudge(scraper)
        self._clock = clock or (lambda: dt.datetime.now(dt.UTC))
        self._locks: dict[Key, asyncio.Lock] = {}
        self._known: dict[Key, Snapshot] = {}
        self._autoscaled: set[Key] = set()  # resources whose last pass found autoscaling
        # The inputs of each resource's last pass that wrote nothing and set no timer: a
        # resync pass over the same inputs would plan the same nothing, so it is skipped.
        self._at_rest: dict[Key, tuple[Any, ...]] = {}
        self._gateway: tuple[bool, float] | None = None  # (HTTPRoute served?, checked at)
        self._scale_requests: dict[Key, api_status.AutoscalerStatus] = {}  # the autoscaler's say
        self._timers: dict[Key, asyncio.TimerHandle] = {}
        self._woken: set[asyncio.Task[None]] = set()
        # Namespaces whose node cache claim this operator has applied (render.NodeCache):
        # once per namespace while it has models, so a model pass writes it only the first
        # time; a namespace whose last model is gone is forgotten, and applied again if a
        # model comes back (a namespace made again needs a new claim).
        self._cache_claimed: set[str] = set()
        # At most gate.PASSES passes at once, handed out by priority: a thousand models
        # changed at once wait here holding nothing, instead of a thousand passes each
        # holding its rendered plan while they wait for the API (gate.py).
        self._passes = gate.Gate(gate.PASSES)
        # Resources with a pass queued that has not read the indexes yet: a trigger for one
        # of them returns at once, since that pass will read what the trigger saw (as a
        # controller's work queue holds a key once). A thousand models' events then wait as
        # a thousand keys, not as every event's handler and its object.
        self._queued: set[Key] = set()

    # ---------------------------------------------------------------- what is known

    def known_keys(self) -> list[Key]:
        """Every resource seen and not yet gone."""
        return list(self._known)

    def autoscaled_keys(self) -> list[Key]:
        """The resources with ``spec.autoscaling`` as of their last pass: the autoscaler
        looks at these only, so models without it cost nothing per tick."""
        return list(self._autoscaled)

    def observe(self, key: Key) -> Observed | None:
        """The resource and its children as the indexes hold them now (None: gone)."""
        snapshot = self._known.get(key)
        return snapshot() if snapshot is not None else None

    async def statuses(self) -> list[tuple[str, str, Mapping[str, Any]]]:
        """Every known resource's status, read on the event loop (kopf's indexes are not
        for other threads): the operator's metrics server asks through the loop."""
        out = []
        for (namespace, name), snapshot in list(self._known.items()):
            observed = snapshot()
            if observed is not None:
                out.append((namespace, name, observed.resource.get("status") or {}))
        return out

    def forget(self, key: Key) -> None:
        """The resource is gone: drop what we remembered of it."""
        self._locks.pop(key, None)
        self._known.pop(key, None)
        self._autoscaled.discard(key)
        self._at_rest.pop(key, None)
        self._scale_requests.pop(key, None)
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        if not any(known[0] == key[0] for known in self._known):
            self._cache_claimed.discard(key[0])
        self._judge.forget(key)
        self._executor.forget(key)

    # ------------------------------------------------------------------ the triggers

    async def reconcile(self, key: Key, snapshot: Snapshot | None = None, *,
                        resync: bool = False, priority: int = gate.UPDATE) -> None:
        """Run one pass for ``key``. ``snapshot`` reads the indexes (the handlers give it;
        later triggers reuse it); it is called under the resource's lock, so a pass never
        acts on a view older than the previous pass's. A ``resync`` pass is skipped when
        nothing it reads changed since a pass that found nothing to do. ``priority`` is
        the trigger's (gate.py): a child's change (status to report) before a spec change,
        a new model's first pass and the resync last."""
        if key not in self._known:
            priority = max(priority, gate.CREATE)
        if snapshot is not None:
            self._known[key] = snapshot
        snapshot = self._known.get(key)
        if snapshot is None or not self.leading():
            return
        if key in self._queued:
            return  # the queued pass reads the indexes when its turn comes
        self._queued.add(key)
        queued = True
        lock = self._locks.setdefault(key, asyncio.Lock())
        try:
            async with lock, self._passes.slot(gate.CREATE if resync else priority):
                self._queued.discard(key)  # from here a trigger queues the next pass
                queued = False
                await self._locked_pass(key, snapshot, resync)
        finally:
            if queued:  # cancelled while waiting: the key is free to queue again
                self._queued.discard(key)

    async def _locked_pass(self, key: Key, snapshot: Snapshot, resync: bool) -> None:
        """One pass, under the resource's lock and a pass slot."""
        observed = snapshot()
        if observed is None:
            self.forget(key)
            return
        await self._gateway_api()  # what the pass will read of it (asked once a minute)
        inputs = self._inputs(key, observed)
        if resync and self._at_rest.get(key) == inputs:
            return
        self._at_rest.pop(key, None)
        started, ok, calls = time.monotonic(), False, self._executor.calls
        try:
            recheck_after = await self._pass(observed)
            self._schedule(key, recheck_after)
            if recheck_after is None and self._executor.calls == calls:
                self._at_rest[key] = inputs
            ok = True
        except GoneError as exc:
            ok = True
            log.debug("skipping %s/%s: %s", *key, exc)
        except Exception:
            self._schedule(key, RETRY_S)
            raise
        finally:
            metrics.observe_pass(time.monotonic() - started, ok)

    async def autoscaled(self, key: Key, decision: api_status.AutoscalerStatus) -> None:
        """The autoscaler's decision for ``key`` (total replicas, and what status reports
        of it): the pass splits the total between versions and applies it."""
        self._scale_requests[key] = decision
        await self.reconcile(key, priority=gate.REPORT)

    async def resync_forever(self, interval_s: float) -> None:
        """A full pass for every known resource every ``interval_s``: a safety net for
        missed events. One task for the whole operator, so resources need no finalizer."""
        while True:
            await asyncio.sleep(interval_s)
            await self.resync_once()

    async def resync_once(self) -> None:
        """A full pass for every known resource (also run when this replica starts leading,
        so a takeover acts at once on what the previous leader left); a resource is skipped
        when nothing a pass reads has changed since its last pass found nothing to do."""
        await self._gateway_api()  # a fact outside the indexes: refreshed before comparing
        for key in self.known_keys():
            await self._reconcile_logged(key, "resync", resync=True)

    def _inputs(self, key: Key, observed: Observed) -> tuple[Any, ...]:
        """What a pass reads: the indexes' versions, the Gateway API's presence, the
        autoscaler's say. (A model at zero also reads the activator's endpoints; its passes
        always set a timer, so they are never taken as at rest. A running canary's verdict
        comes with a timer too.)"""
        gateway = self._gateway[0] if self._gateway is not None else None
        return (world.fingerprint(observed), gateway, self._scale_requests.get(key))

    # --------------------------------------------------------------------- one pass

    async def _pass(self, observed: Observed) -> float | None:
        meta = observed.resource["metadata"]
        key = (meta["namespace"], meta["name"])
        seen = world.build(observed, self._executor.latest_status(key, observed.resource),
                           gateway=await self._gateway_api(), activator=None,
                           activator_configured=self.activator is not None,
                           node_cache=self.node_cache, network_peers=self.network_peers)
        if seen.spec is not None and seen.spec.autoscaling is not None and not seen.deleting:
            self._autoscaled.add(key)
        else:
            self._autoscaled.discard(key)
        if seen.spec is not None and self.activator is not None \
                and plan.needs_activator(seen.spec, seen.versions):
            seen = dataclasses.replace(seen, activator=await self.activator.endpoints())
        request = rollout.analysis_request(seen) if not seen.deleting else None
        verdict = await self._judge.verdict(seen, request) if request else None
        todo = plan.plan(seen, verdict, self._scale_requests.get(key), self._clock())
        recheck_after = todo.recheck_after
        if todo.apply and self.node_cache is not None \
                and not await self._claim_node_cache(key[0]):
            # Not at rest: the resync would skip it. Try again soon.
            recheck_after = RETRY_S if recheck_after is None else min(recheck_after, RETRY_S)
        await self._executor.execute(seen, todo)
        await self._executor.report(seen, todo)
        return recheck_after

    async def _claim_node_cache(self, namespace: str) -> bool:
        """The node cache's claim in ``namespace``, applied the first time (see
        ``_cache_claimed``); whether it is there. A failure (say, the operator may not
        create PersistentVolumes) is logged and tried again in RETRY_S; the pods meanwhile
        wait, Pending, with the scheduler's event naming the missing claim."""
        if namespace in self._cache_claimed or self.node_cache is None:
            return True
        volume, claim = self.node_cache.claim(namespace)
        try:
            await asyncio.to_thread(self._writer.claim_node_cache, volume, claim)
        except Exception as exc:
            log.warning("could not claim the node cache in %s (PersistentVolume %s): %s",
                        namespace, volume["metadata"]["name"], exc)
            return False
        log.info("the node cache %s is claimed in %s (PersistentVolume %s)",
                 self.node_cache.path, namespace, volume["metadata"]["name"])
        self._cache_claimed.add(namespace)
        return True

    def _schedule(self, key: Key, after: float | None) -> None:
        """Run the next pass for ``key`` in ``after`` seconds (None: only on events)."""
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        if after is not None:
            loop = asyncio.get_running_loop()
            self._timers[key] = loop.call_later(max(0.0, after), self._wake, key)

    def _wake(self, key: Key) -> None:
        self._timers.pop(key, None)
        task = asyncio.get_running_loop().create_task(self._reconcile_logged(key, "recheck"))
        self._woken.add(task)
        task.add_done_callback(self._woken.discard)

    async def _reconcile_logged(self, key: Key, why: str, *, resync: bool = False) -> None:
        try:
            await self.reconcile(key, resync=resync)
        except Exception:
            log.exception("%s of %s/%s failed; the next pass retries", why, *key)

    async def _gateway_api(self) -> bool:
        """Whether the cluster has HTTPRoute; asked at most once a minute."""
        now = time.monotonic()
        if self._gateway is None or now - self._gateway[1] > GATEWAY_RECHECK_S:
            try:
                found = await asyncio.to_thread(self._writer.has_httproute)
            except Exception as exc:  # discovery failed: keep the last answer
                log.warning("could not check for the Gateway API: %s", exc)
                found = bool(self._gateway and self._gateway[0])
            if self._gateway is None or self._gateway[0] != found:
                log.info("the Gateway API is %s: canary traffic is split by %s",
                         "present" if found else "absent",
                         "HTTPRoute weights" if found else "replica ratio")
            self._gateway = (found, now)
        return self._gateway[0]

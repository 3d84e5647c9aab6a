"""One idempotent reconcile pass for a ModelDeployment: observe, plan, execute, report.

:class:`Reconciler` is called by the kopf handlers in :mod:`.handlers` whenever the
ModelDeployment or one of its children changes (and on a slow safety timer). It

1. reads the resource and its children from kopf's in-memory indexes (no API reads),
2. renders the desired children (:mod:`.render`) and plans versions (:mod:`.status`),
3. applies only what differs (:mod:`.diff`) and retires finished versions through
   :class:`~.kube.Writer`,
4. computes the status and writes it only when it changed, emitting an Event per
   transition.

Running it twice in a row changes nothing the second time. Passes for one
resource are serialised by a per-resource lock; different resources run
concurrently. A watch event can lag our own write, so the pass remembers what it
last wrote (keyed by the resourceVersion it wrote over) and does not repeat a
write just because the index has not caught up yet.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pydantic

from . import api, diff, render
from .kube import GoneError, Writer
from .status import (
    DEGRADED,
    Event,
    compute_status,
    observe,
    plan_versions,
    status_payload,
)

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (namespace, name)


@dataclass(frozen=True)
class Observed:
    """A ModelDeployment and its children, as the indexes hold them."""

    resource: Mapping[str, Any]
    deployments: list[Mapping[str, Any]]
    pods: list[Mapping[str, Any]]
    services: list[Mapping[str, Any]]


class Reconciler:
    def __init__(self, writer: Writer, clock: Callable[[], dt.datetime] | None = None):
        self.writer = writer
        self._clock = clock or (lambda: dt.datetime.now(dt.UTC))
        self._locks: dict[Key, asyncio.Lock] = {}
        self._known: dict[Key, Callable[[], Observed | None]] = {}
        # key -> (resourceVersion we wrote over, what we wrote)
        self._written: dict[tuple[str, ...], tuple[str | None, Any]] = {}

    def forget(self, key: Key) -> None:
        """The resource is gone: drop what we remembered of it."""
        self._locks.pop(key, None)
        self._known.pop(key, None)
        for k in [k for k in self._written if k[1:3] == key]:
            del self._written[k]

    async def reconcile(self, key: Key, snapshot: Callable[[], Observed | None]) -> None:
        """Run one pass for ``key``. ``snapshot`` reads the indexes; it is called under the
        resource's lock, so a pass never acts on a view older than the previous pass's."""
        self._known[key] = snapshot
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            observed = snapshot()
            if observed is None:
                self.forget(key)
                return
            try:
                await self._pass(observed)
            except GoneError as exc:
                log.debug("skipping %s/%s: %s", *key, exc)

    async def _pass(self, o: Observed) -> None:
        meta = o.resource["metadata"]
        if meta.get("deletionTimestamp"):
            return  # owner references take the children away
        owner = render.Owner(meta["name"], meta["namespace"], meta["uid"])
        key = (owner.namespace, owner.name)
        generation = int(meta.get("generation", 1))
        previous = api.parse_status(o.resource.get("status"))
        try:
            spec = api.parse_spec(o.resource.get("spec", {}))
        except pydantic.ValidationError as exc:
            await self._report_invalid(o, owner, generation, previous, exc)
            return

        states = observe(o.deployments, o.pods)
        plan = plan_versions(spec, states)
        log.debug("%s/%s observed %s", *key, states)
        desired = [
            render.render_service(owner, spec),
            render.render_deployment(owner, spec, render.replicas_wanted(spec)),
        ]
        live = {(obj["kind"], obj["metadata"]["name"]): obj
                for obj in [*_with_kind(o.deployments, "Deployment"),
                            *_with_kind(o.services, "Service")]}
        for obj in desired:
            ident = (obj["kind"], obj["metadata"]["name"])
            current = live.get(ident)
            cache_key = ("apply", *key, *ident)
            if self._fresh_enough(cache_key, current, diff.applied_hash(obj)):
                continue
            if diff.needs_apply(obj, current):
                log.info("applying %s %s/%s", obj["kind"], owner.namespace, ident[1])
                await asyncio.to_thread(self.writer.apply, obj)
                self._written[cache_key] = (_rv(current), diff.applied_hash(obj))
        for version in sorted(plan.retire):
            name = states[version].deployment
            cache_key = ("delete", *key, "Deployment", name)
            if cache_key in self._written and _rv(live.get(("Deployment", name))) == \
                    self._written[cache_key][0]:
                continue
            log.info("retiring version %s of %s/%s", version, owner.namespace, owner.name)
            await asyncio.to_thread(self.writer.delete, "apps/v1", "Deployment",
                                    owner.namespace, name)
            self._written[cache_key] = (_rv(live.get(("Deployment", name))), None)

        status, events = compute_status(
            generation=generation, spec=spec, previous=previous, observed=states, plan=plan,
            url=render.service_url(owner), selector=render.selector_string(owner.name),
            now=self._clock(),
        )
        await self._write_status(o, key, status_payload(status), events)

    async def resync_forever(self, interval_s: float) -> None:
        """A full pass for every known resource every ``interval_s``: a safety net for
        missed events. One task for the whole operator, so resources need no finalizer."""
        while True:
            await asyncio.sleep(interval_s)
            for key, snapshot in list(self._known.items()):
                try:
                    await self.reconcile(key, snapshot)
                except Exception:
                    log.exception("resync of %s/%s failed; the next one retries", *key)

    def _fresh_enough(self, cache_key: tuple[str, ...], live: Mapping[str, Any] | None,
                      desired_hash: str | None) -> bool:
        """True when we already wrote this and the index has not caught up yet."""
        written = self._written.get(cache_key)
        if written is None:
            return False
        rv_before, what = written
        if _rv(live) == rv_before and what == desired_hash:
            return True
        del self._written[cache_key]
        return False

    async def _write_status(
        self, o: Observed, key: Key, payload: dict[str, Any], events: Iterable[Event]
    ) -> None:
        cache_key = ("status", *key)
        current_rv = _rv(o.resource)
        written = self._written.get(cache_key)
        live_payload = o.resource.get("status") or {}
        if written is not None and written[0] == current_rv:
            live_payload = written[1]  # the index still shows what we overwrote
        before = _normalise(live_payload)
        if _normalise(payload) == before:
            return
        log.info("status of %s/%s changed: %s", *key, _describe_change(before, payload))
        try:
            await asyncio.to_thread(self.writer.patch_status, key[0], key[1], payload)
        except GoneError:
            return
        self._written[cache_key] = (current_rv, payload)
        for event in events:
            await asyncio.to_thread(self.writer.event, o.resource, event.type, event.reason,
                                    event.message)

    async def _report_invalid(
        self, o: Observed, owner: render.Owner, generation: int,
        previous: api.ModelDeploymentStatus, exc: pydantic.ValidationError,
    ) -> None:
        message = "; ".join(
            f"spec.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )[:1000]
        now = self._clock().strftime("%Y-%m-%dT%H:%M:%SZ")
        status = previous.model_copy(update={
            "observed_generation": generation,
            "conditions": [c for c in previous.conditions if c.type != DEGRADED] + [
                api.Condition(type=DEGRADED, status=api.ConditionStatus.TRUE,
                              reason="InvalidSpec", message=message,
                              last_transition_time=now, observed_generation=generation)],
        })
        key = (owner.namespace, owner.name)
        await self._write_status(o, key, status_payload(status),
                                 [Event("Warning", "InvalidSpec", message)])


def _with_kind(objs: Iterable[Mapping[str, Any]], kind: str) -> Iterable[Mapping[str, Any]]:
    for obj in objs:
        yield {**obj, "kind": kind}


def _rv(obj: Mapping[str, Any] | None) -> str | None:
    if obj is None:
        return None
    value = obj.get("metadata", {}).get("resourceVersion")
    return str(value) if value is not None else None


def _normalise(status: Mapping[str, Any]) -> dict[str, Any]:
    return status_payload(api.parse_status(dict(status)))


def _describe_change(before: Mapping[str, Any], after: Mapping[str, Any]) -> str:
    """``readyReplicas 1 -> 2, conditions (Ready False -> True)``: for the operator's log."""
    parts = []
    for field in sorted({*before, *after}):
        old, new = before.get(field), after.get(field)
        if old == new:
            continue
        if field == "conditions":
            was = {c["type"]: (c["status"], c["reason"]) for c in old or []}
            now = {c["type"]: (c["status"], c["reason"]) for c in new or []}
            flips = [f"{t} {'/'.join(was.get(t, ('-',)))} -> {'/'.join(v)}"
                     for t, v in now.items() if was.get(t) != v]
            parts.append(f"conditions ({'; '.join(flips) or 'messages'})")
        elif isinstance(new, list | dict) or isinstance(old, list | dict):
            parts.append(field)
        else:
            parts.append(f"{field} {old} -> {new}")
    return ", ".join(parts)

"""Execute and report: carry a :class:`~.plan.Plan` out through the one writer.

The last two of the controller's four stages (observe → plan → **execute** → **report**,
see :mod:`.reconcile`):

* :meth:`Executor.execute` applies the children that differ from what is live
  (:mod:`.diff`), sets replicas through the scale subresource and deletes what the plan
  retires;
* :meth:`Executor.report` writes the status when it changed, then posts the plan's Events
  and counts finished rollouts (:mod:`.metrics`).

Every write goes through :class:`~.kube.Writer` in a worker thread (the client blocks),
through a :class:`~.gate.Gate` that bounds the calls in flight and lets a model's status
and replicas go before another's creation (:mod:`.gate`). A
watch event can lag our own write, so the executor remembers what it last wrote (keyed by
the resourceVersion it wrote over) and does not repeat a write only because the index has
not caught up yet: :meth:`Executor.latest_status` is the status as it is now.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from . import api_status, diff, gate, metrics
from .kube import GoneError, Writer
from .plan import Plan
from .status import status_payload
from .world import Key, World

log = logging.getLogger(__name__)
T = TypeVar("T")

_FINISHED: tuple[tuple[str, metrics.Outcome], ...] = (
    ("RolloutComplete", "promoted"), ("RolledBack", "rolled_back"))


class Executor:
    def __init__(self, writer: Writer, api_gate: gate.Gate | None = None):
        self.writer = writer
        self.gate = api_gate or gate.Gate()
        self.calls = 0  # API calls made, all resources together
        # (verb, namespace, name, ...) -> (resourceVersion we wrote over, what we wrote)
        self._written: dict[tuple[str, ...], tuple[str | None, Any]] = {}

    def forget(self, key: Key) -> None:
        for k in [k for k in self._written if k[1:3] == key]:
            del self._written[k]

    async def execute(self, world: World, plan: Plan) -> None:
        key, live = world.key, world.live
        for obj in plan.apply:
            ident = (obj["kind"], obj["metadata"]["name"])
            current = live.get(ident)
            cache_key: tuple[str, ...] = ("apply", *key, *ident)
            if self._fresh_enough(cache_key, current, diff.applied_hash(obj)):
                continue
            if diff.needs_apply(obj, current):
                log.info("applying %s %s/%s", obj["kind"], key[0], ident[1])
                await self._call(gate.UPDATE if current else gate.CREATE, self.writer.apply,
                                 obj)
                self._written[cache_key] = (_rv(current), diff.applied_hash(obj))
        for deployment, replicas in plan.scale.items():
            cache_key = ("scale", *key, deployment)
            current = live.get(("Deployment", deployment))
            if self._fresh_enough(cache_key, current, str(replicas)):
                continue
            log.info("scaling %s/%s to %d", key[0], deployment, replicas)
            await self._call(gate.REPORT, self.writer.scale, key[0], deployment, replicas)
            self._written[cache_key] = (_rv(current), str(replicas))
        for gone in plan.retire:
            current = live.get((gone.kind, gone.name))
            cache_key = ("delete", *key, gone.kind, gone.name)
            if self._fresh_enough(cache_key, current, None):
                continue
            log.info("retiring %s %s/%s", gone.kind, key[0], gone.name)
            await self._call(gate.UPDATE, self.writer.delete, gone.api_version, gone.kind,
                             key[0], gone.name)
            self._written[cache_key] = (_rv(current), None)

    async def report(self, world: World, plan: Plan) -> None:
        if plan.status is None:
            return
        key = world.key
        payload = status_payload(plan.status)
        before = _normalise(self.latest_status(world.key, world.resource))
        if _normalise(payload) == before:
            return
        log.info("status of %s/%s changed: %s", *key, describe_change(before, payload))
        try:
            result = await self._call(gate.REPORT, self.writer.patch_status, key[0], key[1],
                                      payload)
        except GoneError:
            return
        self._written[("status", *key)] = (_rv(result), payload)
        reasons = {event.reason for event in plan.events}
        for reason, outcome in _FINISHED:
            if reason in reasons:
                metrics.rollout_finished(key[0], key[1], outcome)
        for event in plan.events:
            await self._call(gate.REPORT, self.writer.event, world.resource, event.type,
                             event.reason, event.message)

    async def _call(self, priority: int, call: Callable[..., T], *args: Any) -> T:
        async with self.gate.slot(priority):
            self.calls += 1
            return await asyncio.to_thread(call, *args)

    def latest_status(self, key: Key, resource: Mapping[str, Any]) -> dict[str, Any]:
        """The status as it is now: what we last wrote, until the index has caught up with
        that write (it may still deliver older versions of the object meanwhile)."""
        cache_key = ("status", *key)
        written = self._written.get(cache_key)
        if written is not None:
            if _older(_rv(resource), written[0]):
                return dict(written[1])
            del self._written[cache_key]
        return dict(resource.get("status") or {})

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


def _rv(obj: Mapping[str, Any] | None) -> str | None:
    if obj is None:
        return None
    value = obj.get("metadata", {}).get("resourceVersion")
    return str(value) if value is not None else None


def _older(seen: str | None, written: str | None) -> bool:
    """Is the index's version ``seen`` older than the one our write produced?

    Kubernetes calls resourceVersions opaque, but etcd (and every storage the API server
    ships with) hands out increasing integers; for anything else, fall back to "not the
    same version"."""
    if seen is None or written is None:
        return False
    try:
        return int(seen) < int(written)
    except ValueError:
        return seen != written


def _normalise(status: Mapping[str, Any]) -> dict[str, Any]:
    return status_payload(api_status.parse_status(dict(status)))


def describe_change(before: Mapping[str, Any], after: Mapping[str, Any]) -> str:
    """``readyReplicas 1 -> 2, conditions (Ready False -> True)``: for the operator's log."""
    parts = []
    for name in sorted({*before, *after}):
        old, new = before.get(name), after.get(name)
        if old == new:
            continue
        if name == "conditions":
            was = {c["type"]: (c["status"], c["reason"]) for c in old or []}
            now = {c["type"]: (c["status"], c["reason"]) for c in new or []}
            flips = [f"{t} {'/'.join(was.get(t, ('-',)))} -> {'/'.join(v)}"
                     for t, v in now.items() if was.get(t) != v]
            parts.append(f"conditions ({'; '.join(flips) or 'messages'})")
        elif isinstance(new, dict) or isinstance(old, dict):
            keys = sorted({*(old or {}), *(new or {})})
            moved = [f"{k} {(old or {}).get(k)} -> {(new or {}).get(k)}" for k in keys
                     if (old or {}).get(k) != (new or {}).get(k)]
            parts.append(f"{name} ({'; '.join(moved)})")
        elif isinstance(new, list) or isinstance(old, list):
            parts.append(name)
        else:
            parts.append(f"{name} {old} -> {new}")
    return ", ".join(parts)

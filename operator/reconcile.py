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
import dataclasses
import datetime as dt
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import pydantic

from . import analysis, api, diff, metrics, promql, render, rollout
from .activation import ActivatorLink
from .kube import GoneError, Writer
from .status import (
    DEGRADED,
    Event,
    RollBack,
    VersionPlan,
    VersionState,
    compute_status,
    observe,
    plan_versions,
    rolled_back_record,
    status_payload,
)

log = logging.getLogger(__name__)
GATEWAY_RECHECK_S = 60.0

Key = tuple[str, str]  # (namespace, name)


Scraper = Callable[[str, int], Awaitable[str | None]]


ABORTED = "aborted by a user (modelyard.dev/abort)"


@dataclass(frozen=True)
class _Step:
    plan: VersionPlan
    target_replicas: int
    scale: dict[str, int]  # version -> replicas, for versions we do not re-render
    canary: rollout.CanaryDecision | None
    rolled_back: RollBack | None = None
    handled: api.HandledRequests | None = None
    active: str | None = None  # the one version the stable Service selects (None: all)
    preview: str | None = None  # the version the preview Service selects (blue-green)


@dataclass(frozen=True)
class Observed:
    """A ModelDeployment and its children, as the indexes hold them."""

    resource: Mapping[str, Any]
    deployments: list[Mapping[str, Any]]
    pods: list[Mapping[str, Any]]
    services: list[Mapping[str, Any]]
    endpoint_slices: list[Mapping[str, Any]] = dataclasses.field(default_factory=list)


class Reconciler:
    def __init__(self, writer: Writer, clock: Callable[[], dt.datetime] | None = None,
                 scraper: Scraper | None = None, leading: Callable[[], bool] = lambda: True,
                 activator: ActivatorLink | None = None):
        self.writer = writer
        self.activator = activator  # where a model at zero sends its traffic (activation.py)
        self.leading = leading  # only the leader acts (see leader.py); others keep track
        self._scrape = scraper or scrape_metrics
        self._baselines: dict[tuple[str, ...], analysis.Counts] = {}
        self._clock = clock or (lambda: dt.datetime.now(dt.UTC))
        self._locks: dict[Key, asyncio.Lock] = {}
        self._known: dict[Key, Callable[[], Observed | None]] = {}
        self._gateway: tuple[bool, float] | None = None  # (HTTPRoute served?, checked at)
        # The autoscaler's latest decision per resource (see scaling.py): the total replicas
        # that a pass splits between versions, and the status it reports.
        self.scaled: dict[Key, api.AutoscalerStatus] = {}
        # key -> (resourceVersion we wrote over, what we wrote)
        self._written: dict[tuple[str, ...], tuple[str | None, Any]] = {}

    @property
    def known(self) -> Mapping[Key, Callable[[], Observed | None]]:
        """Every resource seen, with the function that snapshots it from the indexes."""
        return self._known

    def forget(self, key: Key) -> None:
        """The resource is gone: drop what we remembered of it."""
        self._locks.pop(key, None)
        self._known.pop(key, None)
        self.scaled.pop(key, None)
        for k in [k for k in self._baselines if k[:2] == key]:
            del self._baselines[k]
        for k in [k for k in self._written if k[1:3] == key]:
            del self._written[k]

    async def reconcile(self, key: Key, snapshot: Callable[[], Observed | None]) -> None:
        """Run one pass for ``key``. ``snapshot`` reads the indexes; it is called under the
        resource's lock, so a pass never acts on a view older than the previous pass's."""
        self._known[key] = snapshot
        if not self.leading():
            return
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            observed = snapshot()
            if observed is None:
                self.forget(key)
                return
            started, ok = time.monotonic(), False
            try:
                await self._pass(observed)
                ok = True
            except GoneError as exc:
                ok = True
                log.debug("skipping %s/%s: %s", *key, exc)
            finally:
                metrics.observe_pass(time.monotonic() - started, ok)

    async def _pass(self, o: Observed) -> None:
        meta = o.resource["metadata"]
        if meta.get("deletionTimestamp"):
            return  # owner references take the children away
        owner = render.Owner(meta["name"], meta["namespace"], meta["uid"])
        key = (owner.namespace, owner.name)
        generation = int(meta.get("generation", 1))
        previous = api.parse_status(self._latest_status(o, key))
        try:
            spec = api.parse_spec(o.resource.get("spec", {}))
        except pydantic.ValidationError as exc:
            await self._report_invalid(o, owner, generation, previous, exc)
            return

        states = observe(o.deployments, o.pods)
        log.debug("%s/%s observed %s", *key, states)
        scaled = (self.scaled.get(key) or previous.autoscaler) if spec.autoscaling else None
        total = scaled.desired_replicas if scaled else render.replicas_wanted(spec)
        step = await self._plan(o, spec, states, previous, meta.get("annotations") or {},
                                total=total)
        target_replicas = step.target_replicas
        if spec.autoscaling is not None and spec.model.version in states:
            # The autoscaler's replicas go through the scale subresource only.
            target_replicas = states[spec.model.version].desired
            step.scale.setdefault(spec.model.version, step.target_replicas)
        live = {(obj["kind"], obj["metadata"]["name"]): obj
                for obj in [*_with_kind(o.deployments, "Deployment"),
                            *_with_kind(o.services, "Service"),
                            *_with_kind(o.endpoint_slices, "EndpointSlice")]}
        preview = [render.render_preview_service(owner, step.preview)] if step.preview else []
        activated = await self._activator_slice(owner, spec, states)
        gateway = await self._gateway_api()
        route = [render.render_httproute(owner, spec, _route_weights(step, states))] \
            if gateway else []
        await self._apply([
            render.render_service(owner, step.active, to_activator=bool(activated)),
            *activated,
            render.render_deployment(owner, spec, target_replicas),
            *(render.render_version_service(owner, v) for v in sorted(step.plan.keep)),
            *preview,
            *route,
        ], live, key)
        for version, replicas in step.scale.items():
            await self._scale(states[version], replicas, live, key)
        for version in sorted(step.plan.retire):
            await self._retire(states[version].deployment, live, key)
        if not preview:
            await self._retire(render.preview_service_name(owner.name), live, key)
        if not activated:
            await self._retire(render.activator_slice_name(owner.name), live, key,
                               kinds=(("EndpointSlice", "discovery.k8s.io/v1"),))

        decision = step.canary
        status, events = compute_status(
            generation=generation, spec=spec, previous=previous, observed=states,
            plan=step.plan, url=render.service_url(owner),
            selector=render.selector_string(owner.name), now=self._clock(),
            canary=_with_progress(decision.canary, len(spec.rollout.steps)) if decision else None,
            canary_message=decision.message if decision else "",
            promoted=bool(decision and decision.promoted),
            rolled_back=step.rolled_back, handled=step.handled,
            traffic_split="gateway" if gateway else "replicas",
            autoscaler=scaled,
        )
        await self._write_status(o, key, status_payload(status), events)

    async def _plan(self, o: Observed, spec: api.ModelDeploymentSpec,
                    states: Mapping[str, VersionState], previous: api.ModelDeploymentStatus,
                    annotations: Mapping[str, str], *, total: int) -> _Step:
        """Which versions run with how many replicas, and where the stable Service points:
        a canary, a blue-green preview, or a plain replacement; and the manual controls."""
        target = spec.model.version
        handled = previous.handled_requests or api.HandledRequests()
        abort = _new_request(annotations, api.ABORT_ANNOTATION, handled.abort)
        retry = _new_request(annotations, api.RETRY_ANNOTATION, handled.retry)
        handled = handled.model_copy(update={
            name: value for name, value in (("abort", abort), ("retry", retry)) if value})
        stable = rollout.stable_of(states, previous.stable_version, target)
        strategy = spec.rollout.strategy
        if strategy == api.RolloutStrategy.ROLLING_UPDATE or stable is None:
            return _Step(plan_versions(spec, states, total), total, {}, None, handled=handled)
        blue_green = strategy == api.RolloutStrategy.BLUE_GREEN
        others = frozenset(v for v in states if v not in (target, stable.version))
        both = VersionPlan(target, frozenset({target, stable.version}), others)
        back_to_stable = functools.partial(
            _Step, both, 0, {stable.version: total}, None, handled=handled,
            active=stable.version if blue_green else None)
        done = rolled_back_record(previous.versions, target)
        if done is not None and not retry:  # stays rolled back until a new version or a retry
            return back_to_stable(rolled_back=RollBack(done.reason or "rolled back",
                                                       done.analysis))
        if abort:
            log.warning("rollout of version %s aborted by a user", target)
            return back_to_stable(rolled_back=RollBack(ABORTED))
        current = previous.canary if previous.canary and previous.canary.version == target \
            and done is None else None
        # Promote on request; and going back to a version that already served (a rollback
        # to a recorded version) needs no canary steps, as Argo Rollouts' rollback window.
        served_before = any(r.version == target and r.promoted_at for r in previous.versions)
        asked = annotations.get(api.PROMOTE_ANNOTATION) == target
        action = rollout.PROMOTE if asked or served_before else None
        verdict = await self._analyse(o, spec, target, stable.version, current) \
            if current else None
        step_rollout = rollout.step_blue_green if blue_green else rollout.step_canary
        decision = step_rollout(
            spec=spec, total=total, stable=stable, target=states.get(target), current=current,
            action=action, now=self._clock(), verdict=verdict)
        if decision.rolled_back is not None:
            log.warning("%s", decision.message)
            return back_to_stable(rolled_back=RollBack(decision.rolled_back.reason,
                                                       decision.rolled_back.figures()))
        if decision.promoted:
            plan = VersionPlan(target, frozenset({target}), others | {stable.version})
            return _Step(plan, decision.replicas[target], {}, decision, handled=handled,
                         active=target if blue_green else None)
        scale = {stable.version: decision.replicas[stable.version]}
        return _Step(both, decision.replicas[target], scale, decision, handled=handled,
                     active=stable.version if blue_green else None,
                     preview=target if blue_green else None)

    async def _activator_slice(self, owner: render.Owner, spec: api.ModelDeploymentSpec,
                               states: Mapping[str, VersionState]) -> list[dict[str, Any]]:
        """The EndpointSlice that sends the stable Service's traffic to the activator, while
        a model that may scale to zero has no ready replica (empty otherwise)."""
        if self.activator is None or spec.autoscaling is None \
                or spec.autoscaling.min_replicas > 0 or any(s.ready for s in states.values()):
            return []
        found = await self.activator.endpoints()
        if found is None:
            return []
        return [render.render_activator_slice(owner, found.addresses, found.port)]

    async def _gateway_api(self) -> bool:
        """Whether the cluster has HTTPRoute; asked at most once a minute."""
        now = time.monotonic()
        if self._gateway is None or now - self._gateway[1] > GATEWAY_RECHECK_S:
            try:
                found = await asyncio.to_thread(self.writer.has_httproute)
            except Exception as exc:  # discovery failed: keep the last answer
                log.warning("could not check for the Gateway API: %s", exc)
                found = bool(self._gateway and self._gateway[0])
            if self._gateway is None or self._gateway[0] != found:
                log.info("the Gateway API is %s: canary traffic is split by %s",
                         "present" if found else "absent",
                         "HTTPRoute weights" if found else "replica ratio")
            self._gateway = (found, now)
        return self._gateway[0]

    async def _analyse(self, o: Observed, spec: api.ModelDeploymentSpec, target: str,
                       stable: str, current: api.CanaryStatus) -> analysis.Verdict | None:
        """Judge the new version over the current step's window (and, for the relative
        thresholds, the stable version over the same window), from the ready pods' /metrics.
        A pod's window starts at the first pass of this step that scraped it."""
        thresholds = spec.rollout.analysis
        if thresholds is None:
            return None
        meta = o.resource["metadata"]
        window = (meta["namespace"], meta["name"], current.started_at, str(current.step))
        for stale in [k for k in self._baselines if k[:2] == window[:2] and k[:4] != window]:
            del self._baselines[stale]
        relative = thresholds.max_error_rate_increase is not None \
            or thresholds.max_latency_p99_ratio is not None
        versions = [target, stable] if relative else [target]
        try:
            if thresholds.source == "prometheus":
                assert thresholds.prometheus_url is not None  # the CRD's rule
                async with promql.Prometheus(thresholds.prometheus_url) as prometheus:
                    start = _epoch(current.step_started_at)
                    counts = [await prometheus.window(
                        promql.VersionRef(meta["namespace"], meta["name"], v), start)
                        for v in versions]
            else:
                counts = [await self._window(o, spec, v, window) for v in versions]
        except promql.MetricsUnavailable as exc:
            return analysis.Verdict("wait", f"metrics unavailable: {exc}", 0)
        return analysis.judge(counts[0], thresholds, counts[1] if relative else None)

    async def _window(self, o: Observed, spec: api.ModelDeploymentSpec, version: str,
                      window: tuple[str, ...]) -> analysis.Counts:
        addresses = [p["status"]["podIP"] for p in o.pods
                     if p["metadata"].get("labels", {}).get(render.VERSION_LABEL) == version
                     and not p["metadata"].get("deletionTimestamp")
                     and p.get("status", {}).get("podIP") and _pod_ready(p)]
        texts = await asyncio.gather(*(self._scrape(ip, spec.runtime.port) for ip in addresses))
        seen = analysis.Counts()
        for ip, text in zip(addresses, texts, strict=True):
            if text is None:
                continue
            counts = analysis.parse_metrics(text)
            baseline = self._baselines.setdefault((*window, version, ip), counts)
            seen = seen + counts.since(baseline)
        return seen

    async def _apply(self, desired: list[dict[str, Any]],
                     live: Mapping[tuple[str, str], Mapping[str, Any]], key: Key) -> None:
        for obj in desired:
            ident = (obj["kind"], obj["metadata"]["name"])
            current = live.get(ident)
            cache_key = ("apply", *key, *ident)
            if self._fresh_enough(cache_key, current, diff.applied_hash(obj)):
                continue
            if diff.needs_apply(obj, current):
                log.info("applying %s %s/%s", obj["kind"], key[0], ident[1])
                await asyncio.to_thread(self.writer.apply, obj)
                self._written[cache_key] = (_rv(current), diff.applied_hash(obj))

    async def _scale(self, state: VersionState, replicas: int,
                     live: Mapping[tuple[str, str], Mapping[str, Any]], key: Key) -> None:
        if state.desired == replicas:
            return
        cache_key = ("scale", *key, state.deployment)
        current = live.get(("Deployment", state.deployment))
        if self._fresh_enough(cache_key, current, str(replicas)):
            return
        log.info("scaling version %s of %s/%s to %d", state.version, *key, replicas)
        await asyncio.to_thread(self.writer.scale, key[0], state.deployment, replicas)
        self._written[cache_key] = (_rv(current), str(replicas))

    async def _retire(self, name: str, live: Mapping[tuple[str, str], Mapping[str, Any]],
                      key: Key, kinds: Iterable[tuple[str, str]] = (
                          ("Deployment", "apps/v1"), ("Service", "v1"))) -> None:
        """Delete what no longer belongs: by default a finished version's Deployment and
        Service (they share its name)."""
        for kind, api_version in kinds:
            current = live.get((kind, name))
            if current is None or current.get("metadata", {}).get("deletionTimestamp"):
                continue
            cache_key = ("delete", *key, kind, name)
            if self._fresh_enough(cache_key, current, None):
                continue
            log.info("retiring %s %s/%s", kind, key[0], name)
            await asyncio.to_thread(self.writer.delete, api_version, kind, key[0], name)
            self._written[cache_key] = (_rv(current), None)

    async def resync_forever(self, interval_s: float) -> None:
        """A full pass for every known resource every ``interval_s``: a safety net for
        missed events. One task for the whole operator, so resources need no finalizer."""
        while True:
            await asyncio.sleep(interval_s)
            await self.resync_once()

    async def resync_once(self) -> None:
        """A full pass for every known resource (also run when this replica starts leading,
        so a takeover acts at once on what the previous leader left)."""
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

    def _latest_status(self, o: Observed, key: Key) -> dict[str, Any]:
        """The status as it is now: what we last wrote, until the index has caught up with
        that write (it may still deliver older versions of the object meanwhile)."""
        cache_key = ("status", *key)
        written = self._written.get(cache_key)
        if written is not None:
            if _older(_rv(o.resource), written[0]):
                return dict(written[1])
            del self._written[cache_key]
        return dict(o.resource.get("status") or {})

    async def _write_status(
        self, o: Observed, key: Key, payload: dict[str, Any], events: Iterable[Event]
    ) -> None:
        cache_key = ("status", *key)
        before = _normalise(self._latest_status(o, key))
        if _normalise(payload) == before:
            return
        log.info("status of %s/%s changed: %s", *key, _describe_change(before, payload))
        try:
            result = await asyncio.to_thread(self.writer.patch_status, key[0], key[1], payload)
        except GoneError:
            return
        self._written[cache_key] = (_rv(result), payload)
        reasons = {event.reason for event in events}
        finished: tuple[tuple[str, metrics.Outcome], ...] = (
            ("RolloutComplete", "promoted"), ("RolledBack", "rolled_back"))
        for reason, outcome in finished:
            if reason in reasons:
                metrics.rollout_finished(key[0], key[1], outcome)
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


async def scrape_metrics(ip: str, port: int) -> str | None:
    """GET a runtime pod's /metrics; None when it does not answer."""
    try:
        async with httpx.AsyncClient(timeout=2.0) as client:
            response = await client.get(f"http://{ip}:{port}/metrics")
    except httpx.HTTPError:
        return None
    return response.text if response.status_code == 200 else None


def _route_weights(step: _Step, states: Mapping[str, VersionState]) -> dict[str, int]:
    """HTTPRoute backend weights (percent) for the versions that stay.

    A canary gets its step's weight once the step is reached; while its pods come up it
    gets no more than its share of ready replicas. Blue-green and a rollback send
    everything to the active version; otherwise traffic follows ready replicas."""
    decision = step.canary
    target = step.plan.target
    if step.active is not None:
        return {v: 100 if v == step.active else 0 for v in step.plan.keep}
    if decision is not None and decision.canary is not None and len(step.plan.keep) == 2:
        [stable] = [v for v in step.plan.keep if v != target]
        canary = decision.canary
        ready = {v: states[v].ready if v in states else 0 for v in (target, stable)}
        share = 100 * ready[target] // max(1, ready[target] + ready[stable])
        weight = canary.weight if canary.reached_at else min(canary.weight, share)
        return {target: weight, stable: 100 - weight}
    if step.rolled_back is not None:
        return {v: 0 if v == target else 100 for v in step.plan.keep}
    ready = {v: states[v].ready if v in states else 0 for v in step.plan.keep}
    total = sum(ready.values())
    if total == 0:
        return {v: 100 if v == target else 0 for v in step.plan.keep}
    weights = {v: 100 * n // total for v, n in ready.items()}
    weights[max(ready, key=lambda v: ready[v])] += 100 - sum(weights.values())
    return weights


def _epoch(stamp: str) -> float:
    return dt.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC).timestamp()


def _new_request(annotations: Mapping[str, str], name: str, handled: str | None) -> str | None:
    """The value of control annotation ``name`` when it asks for something not yet done."""
    value = annotations.get(name)
    return value if value and value != handled else None


def _pod_ready(pod: Mapping[str, Any]) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in pod.get("status", {}).get("conditions", []) or [])


def _with_progress(canary: api.CanaryStatus | None, steps: int) -> api.CanaryStatus | None:
    if canary is None:
        return None
    if canary.strategy == "BlueGreen":
        return canary.model_copy(update={"progress": "preview (paused)" if canary.paused
                                         else "preview"})
    where = "promoting" if canary.step > steps else f"step {canary.step}/{steps}"
    paused = ", paused" if canary.paused else ""
    return canary.model_copy(update={"progress": f"{canary.weight}% ({where}{paused})"})


def _with_kind(objs: Iterable[Mapping[str, Any]], kind: str) -> Iterable[Mapping[str, Any]]:
    for obj in objs:
        yield {**obj, "kind": kind}


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
        elif isinstance(new, dict) or isinstance(old, dict):
            keys = sorted({*(old or {}), *(new or {})})
            moved = [f"{k} {(old or {}).get(k)} -> {(new or {}).get(k)}" for k in keys
                     if (old or {}).get(k) != (new or {}).get(k)]
            parts.append(f"{field} ({'; '.join(moved)})")
        elif isinstance(new, list) or isinstance(old, list):
            parts.append(field)
        else:
            parts.append(f"{field} {old} -> {new}")
    return ", ".join(parts)

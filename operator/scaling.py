"""The autoscaler loop: measure each autoscaled model, decide, and hand the decision to a
reconcile pass. The deciding is :mod:`.autoscale` (pure); this is the I/O around it.

Every ``tick_s`` (2 s), on the leading replica only, for each ModelDeployment whose last
pass found ``spec.autoscaling`` (:meth:`.Reconciler.autoscaled_keys`; the others cost
nothing per tick):

1. read the metric: scrape ``/metrics`` of every serving pod of the model that is Ready
   (all versions: a canary's pods carry load too), or ask Prometheus (``source:
   prometheus``), in the model's engine's series (:data:`.signals.ENGINE_SERIES`); and,
   when the metric is another, the requests in flight or waiting at the pods, which the
   idle test reads whatever the metric; requests an activator holds for a model at zero
   are its wake signal;
2. :func:`.autoscale.decide` the total replicas, from the window of samples and the
   algorithm's state (kept in ``status.autoscaler.state``, so a restarted or newly
   elected operator carries on without a jump);
3. when the decision differs from the last one, hand it over through
   :meth:`.Reconciler.autoscaled`, which runs a pass: the pass splits the total between
   versions (a canary's step weights apply to it), sets the Deployments' replicas through
   their scale subresource, records the decision in status and posts a ``Scaled`` Event
   for every change of replicas; the ModelDeployment's ``spec`` is never written.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable

import pydantic

from . import api, api_status, autoscale, promql, render, signals
from .reconcile import Key, Observed, Reconciler, scrape_metrics
from .world import pod_ready, stamp

log = logging.getLogger(__name__)

# Reads how many requests wait for a model (an activator's count); 0 when none.
WaitingSource = Callable[[Key], Awaitable[float]]


async def nobody_waits(key: Key) -> float:
    return 0.0


class Autoscaler:
    def __init__(self, reconciler: Reconciler, *,
                 scraper: Callable[[str, int], Awaitable[str | None]] = scrape_metrics,
                 waiting: WaitingSource = nobody_waits,
                 clock: Callable[[], float] = time.time):
        self.reconciler = reconciler
        self._scrape = scraper
        self._waiting = waiting
        self._clock = clock
        self._windows: dict[Key, autoscale.Window] = {}
        # requests in flight at the pods, for the idle test, when the metric is another
        self._in_flight: dict[Key, autoscale.Window] = {}
        self._states: dict[Key, autoscale.State] = {}
        self._decided: dict[Key, api_status.AutoscalerStatus] = {}  # what we last handed over

    async def run_forever(self, tick_s: float) -> None:
        while True:
            await asyncio.sleep(tick_s)
            if not self.reconciler.leading():
                self._windows.clear()  # a follower's memory would be stale on takeover
                self._in_flight.clear()
                self._states.clear()
                self._decided.clear()
                continue
            await self.tick()

    async def tick(self) -> None:
        keys = self.reconciler.autoscaled_keys()
        for key in set(self._windows) - set(keys):
            self._forget(key)  # gone, or no longer autoscaled
        for key in keys:
            try:
                await self._scale(key)
            except Exception:
                log.exception("autoscaling %s/%s failed; the next tick retries", *key)

    async def _scale(self, key: Key) -> None:
        observed = self.reconciler.observe(key)
        spec = _autoscaling(observed)
        if observed is None or spec is None or spec.autoscaling is None:
            self._forget(key)
            return
        policy = autoscale.Policy.from_spec(spec.autoscaling)
        status = api_status.parse_status(dict(observed.resource.get("status") or {}))
        reported = self._decided.get(key) or status.autoscaler
        window = self._window(self._windows, key, policy.metric, policy)
        in_flight = None if policy.metric == signals.IN_FLIGHT_SIGNAL else \
            self._window(self._in_flight, key, signals.IN_FLIGHT_SIGNAL, policy)
        state = self._states.get(key) or autoscale.State.from_dict(
            reported.state if reported else None)
        current = reported.desired_replicas if reported else \
            _running(observed) or render.replicas_wanted(spec)
        now = self._clock()
        waiting = await self._waiting(key)
        windows = (window, in_flight) if in_flight is not None else (window,)
        if spec.autoscaling.source == "prometheus":
            await self._from_prometheus(windows, key, spec, now=now, waiting=waiting,
                                        observed=observed)
        else:
            await self._from_pods(windows, spec, now, waiting, observed)
        decision = autoscale.decide(
            window.samples, now, current, state, policy,
            in_flight=in_flight.samples if in_flight is not None else ())
        self._states[key] = decision.state
        changed = decision.replicas != current
        new = api_status.AutoscalerStatus(
            desired_replicas=decision.replicas, metric=policy.metric,
            metric_value=_rounded(decision.metric_value) if changed or reported is None
            else reported.metric_value,
            reason=decision.reason if changed or reported is None else reported.reason,
            last_scale_time=_stamp(now) if changed else
            reported.last_scale_time if reported else None,
            panic=decision.panic, state=decision.state.to_dict())
        if reported is not None and new == reported:
            return
        self._decided[key] = new
        if changed:
            log.info("autoscaling %s/%s: %d -> %d replicas (%s)", *key, current,
                     decision.replicas, decision.reason)
        await self.reconciler.autoscaled(key, new)

    @staticmethod
    def _window(windows: dict[Key, autoscale.Window], key: Key, metric: str,
                policy: autoscale.Policy) -> autoscale.Window:
        window = windows.get(key)
        if window is None or window.metric != metric \
                or window.seconds != policy.stable_window_seconds:
            window = windows[key] = autoscale.Window(metric, policy.stable_window_seconds)
        return window

    def _forget(self, key: Key) -> None:
        self._windows.pop(key, None)
        self._in_flight.pop(key, None)
        self._states.pop(key, None)
        self._decided.pop(key, None)

    async def _from_pods(self, windows: tuple[autoscale.Window, ...],
                         spec: api.ModelDeploymentSpec, now: float, waiting: float,
                         observed: Observed) -> None:
        pods = [p for p in observed.pods if not p["metadata"].get("deletionTimestamp")
                and p.get("status", {}).get("podIP")]
        ready = [p for p in pods if pod_ready(p)]
        texts = await asyncio.gather(*(self._scrape(p["status"]["podIP"], spec.runtime.port)
                                       for p in ready))
        scrapes = [autoscale.parse_scrape(p["metadata"]["name"], now, text, ready=True)
                   for p, text in zip(ready, texts, strict=True) if text is not None]
        for window in windows:
            window.add(now, scrapes, waiting=waiting)

    async def _from_prometheus(self, windows: tuple[autoscale.Window, ...], key: Key,
                               spec: api.ModelDeploymentSpec, *, now: float, waiting: float,
                               observed: Observed) -> None:
        assert spec.autoscaling is not None
        assert spec.autoscaling.prometheus_url is not None
        versions = sorted({p["metadata"].get("labels", {}).get(render.VERSION_LABEL, "")
                           for p in observed.pods} - {""})
        ready = sum(1 for p in observed.pods if pod_ready(p))
        engine = str(spec.runtime.engine)
        if engine not in signals.signal(windows[0].metric).engines:
            log.warning("autoscaling %s/%s: engine %s does not export %s; holding", *key,
                        engine, windows[0].metric)  # an older CRD let it through
            return
        rate_window = promql.duration(min(60.0, spec.autoscaling.stable_window_seconds))
        try:
            async with promql.Prometheus(spec.autoscaling.prometheus_url) as prometheus:
                for window in windows:
                    signal = signals.signal(window.metric)
                    values: list[float] = []
                    for version in versions:
                        series = promql.selector(promql.VersionRef(*key, version),
                                                 prometheus.names)
                        value = promql.sample_value(await prometheus.query(
                            signal.query(series, rate_window, engine), now))
                        if value is not None:
                            values.append(value)
                    if not values and ready:
                        continue  # nothing known yet: no sample, so the decision holds
                    per_replica = signal.aggregate == "average"
                    value = (sum(values) / len(values) if values else 0.0) if per_replica \
                        else sum(values)
                    window.append(autoscale.Sample(now, ready, value, waiting))
        except promql.MetricsUnavailable as exc:
            log.warning("autoscaling %s/%s: %s; holding", *key, exc)


def _autoscaling(observed: Observed | None) -> api.ModelDeploymentSpec | None:
    if observed is None or observed.resource.get("metadata", {}).get("deletionTimestamp"):
        return None
    raw = observed.resource.get("spec") or {}
    if not raw.get("autoscaling"):
        return None  # most models: nothing to parse on every tick (#16: 91% of CPU at rest)
    try:
        return api.parse_spec(dict(raw))
    except pydantic.ValidationError:
        return None  # the reconcile pass reports it


def _running(observed: Observed) -> int:
    return sum(int(d.get("spec", {}).get("replicas", 0)) for d in observed.deployments)


def _rounded(value: float | None) -> float | None:
    return None if value is None else float(f"{value:.3g}")


def _stamp(epoch: float) -> str:
    return stamp(dt.datetime.fromtimestamp(epoch, dt.UTC))

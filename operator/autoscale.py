"""The autoscaling algorithm: pure functions of (metric samples, clock, replicas, state).

Called by the operator's autoscaler loop once per tick for each ModelDeployment with
``spec.autoscaling``: it scrapes the ready runtime pods, feeds the scrapes to a
:class:`~.samples.Window`, and hands its samples to :func:`decide`, which returns the
replicas to set and the :class:`State` to keep in the resource's status, so that a
restarted (or newly elected) operator carries on where the last one stopped. Nothing
here reads a clock, the network or Kubernetes; docs/autoscaling.md explains the
algorithm with its formulas and the traces the unit tests replay.

In short (Knative's KPA, with the HPA's tolerance):

* ``desired = ceil(load / target)``, the load averaged over the *stable window* (60 s);
* a *panic window* (10 % of it, 6 s) reacts to spikes: when its load reaches the panic
  threshold (200 %) of what the ready replicas are meant to carry, the autoscaler panics
  for a stable window: it follows the larger of the two recommendations and never scales
  down;
* no change while the load is within the tolerance (10 %) of what ``current`` replicas
  are meant to carry;
* scale-up is limited per decision (x10, or +4), scale-down waits ``scaleDownDelay``
  of lower recommendations, goes to the highest of them, and at most halves per decision;
* zero only with ``minReplicas: 0`` after the load has been nil, and no request in
  flight or waiting at the pods (whatever the metric), for the idle delay; from zero,
  any demand (requests waiting outside the pods) wakes one replica at once;
* pods still loading their model are not evidence of idleness, and no samples means
  no change.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

from . import api, signals
from .samples import Sample, Window
from .signals import Scrape, parse_scrape

__all__ = ["Decision", "Policy", "Sample", "Scrape", "State", "Window", "decide",
           "parse_scrape"]

# Metrics whose sample value is the total over the ready pods: the load they measure is
# spread over the replicas, so ``replicas = total / target``.
_EPSILON = 1e-9


@dataclass(frozen=True)
class Policy:
    """The knobs of the algorithm. ``target`` is per replica, in the metric's unit:
    requests in flight (concurrency), requests/s (rps), queued items (queueDepth),
    milliseconds (latencyP95) or percent (gpuUtilization)."""

    target: float
    min_replicas: int = 1
    max_replicas: int = 10
    metric: str = "concurrency"
    stable_window_seconds: float = 60.0
    panic_window_percentage: float = 10.0
    panic_threshold: float = 2.0  # load / what the ready replicas carry at target
    tolerance: float = 0.1
    scale_down_delay_seconds: float = 300.0
    scale_to_zero_delay_seconds: float = 300.0
    max_scale_up_rate: float = 10.0  # a decision may go to current x rate ...
    max_scale_up_step: int = 4  # ... or current + step, whichever is more
    max_scale_down_rate: float = 2.0  # a decision may go down to current / rate ...
    max_scale_down_step: int | None = None  # ... and at most this many fewer (None: any)
    startup_grace_seconds: float = 600.0  # how long starting pods are protected
    min_history: float = 0.5  # share of the stable window observed before scaling down

    def __post_init__(self) -> None:
        signals.signal(self.metric)  # an unknown one raises
        if self.target <= 0:
            raise ValueError("target must be above 0")
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ValueError("need 0 <= min_replicas <= max_replicas and max_replicas >= 1")
        if self.max_scale_up_rate < 1 or self.max_scale_down_rate < 1:
            raise ValueError("scale rates must be at least 1")
        if not 0 < self.panic_window_percentage <= 100:
            raise ValueError("panic_window_percentage must be in (0, 100]")

    @property
    def aggregate(self) -> Literal["total", "average"]:
        return signals.signal(self.metric).aggregate

    @property
    def panic_window_seconds(self) -> float:
        return self.stable_window_seconds * self.panic_window_percentage / 100

    @classmethod
    def from_spec(cls, spec: api.Autoscaling, **overrides: Any) -> Policy:
        """The policy of a ModelDeployment's ``spec.autoscaling`` (``overrides`` win)."""
        knobs: dict[str, Any] = {
            "target": spec.target, "min_replicas": spec.min_replicas,
            "max_replicas": spec.max_replicas, "metric": str(spec.metric),
            "scale_down_delay_seconds": spec.scale_down_delay_seconds,
            "scale_to_zero_delay_seconds": spec.scale_to_zero_delay_seconds,
            "stable_window_seconds": spec.stable_window_seconds,
            "panic_window_percentage": spec.panic_window_percentage,
            "panic_threshold": spec.panic_threshold_percentage / 100,
            "tolerance": spec.tolerance, "max_scale_up_rate": spec.max_scale_up_rate,
            "max_scale_down_rate": spec.max_scale_down_rate,
        }
        return cls(**(knobs | overrides))


@dataclass(frozen=True)
class State:
    """What survives between decisions and across operator restarts (kept in status).

    Outside panic mode only transitions change it (when a phase began, a recommendation
    crossing a level), never a per-tick stamp, so that a steady model costs no status
    writes; in panic, ``panic_until`` moves with every tick over the threshold. Times
    are seconds on the caller's clock.
    """

    desired: int | None = None  # the last decision; None: never decided
    panic_until: float | None = None  # panic mode holds until then
    panic_peak: int = 0  # the most replicas decided in this panic
    # The scale-down evidence, a staircase of (level, since): every recommendation since
    # ``since`` was at most ``level``. Levels rise as the times fall; all are below desired.
    low: tuple[tuple[int, float], ...] = ()
    idle_since: float | None = None  # the load has been nil since then
    starting_since: float | None = None  # some replicas have not been ready since then
    last_scale_time: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """camelCase keys, None values left out; JSON-serialisable."""
        out = {_camel(f.name): getattr(self, f.name) for f in fields(self)
               if getattr(self, f.name) is not None}
        out["low"] = [[level, since] for level, since in self.low]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> State:
        """Tolerates missing and unknown keys (older or newer operators)."""
        data = data or {}
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = data.get(_camel(f.name))
            if raw is None:
                continue
            if f.name == "low":
                values[f.name] = tuple((int(level), float(since)) for level, since in raw)
            elif f.name in {"desired", "panic_peak"}:
                values[f.name] = int(raw)
            else:
                values[f.name] = float(raw)
        return cls(**values)


@dataclass(frozen=True)
class Decision:
    replicas: int
    state: State
    reason: str
    metric_value: float | None  # the metric over the stable window, in the sample's terms
    panic: bool


@dataclass(frozen=True)
class _Seen:
    """One decision's reading of the window."""

    value: float  # mean sample value (the metric in its own terms)
    stable_load: float  # mean load over the stable window
    panic_load: float  # mean load over the panic window
    demand: bool  # any demand in the panic window
    ready: int  # ready replicas in the newest sample
    history: float  # seconds the window covers


def decide(samples: Sequence[Sample], now: float, current: int, state: State,
           policy: Policy, *, in_flight: Sequence[Sample] = ()) -> Decision:
    """The replicas the model should have now. ``current`` is what is set today (the
    Deployments' replicas); ``samples`` may span more than the stable window.

    ``in_flight`` are samples of the requests in flight or waiting at the pods (the
    ``concurrency`` signal, of whichever engine) at the same times, when the metric is
    another: a time when any request is in flight is busy whatever the metric reads, so a
    model whose metric is zero while it serves (vLLM's waiting queue while every request
    runs, a rate between two long generations) is never taken as idle."""
    window = sorted((s for s in samples
                     if now - policy.stable_window_seconds < s.time <= now),
                    key=lambda s: s.time)
    serving = frozenset(s.time for s in in_flight if s.value > 0)

    def busy(sample: Sample) -> bool:
        return sample.busy or sample.time in serving

    if state.desired is None and current > 1:
        # Nothing remembered (first sight, or status lost): hold what runs for a stable
        # window, as if panicking, rather than judge from a window not yet filled.
        state = replace(state, panic_until=now + policy.stable_window_seconds,
                        panic_peak=current)
    seen = _read(window, now, policy, busy)
    if seen is None:
        wake = current == 0 and any(busy(s) for s in window)
        replicas = _bound(1 if wake else current, policy)
        reason = "demand while at zero: waking one replica" if wake else "no metrics: holding"
        return _finish(replicas, current, now, state, reason=reason, value=None)

    # Replicas still loading their model are not evidence of idleness and are never
    # scaled away, until startup_grace_seconds: then they count as stuck, not starting.
    starting = seen.ready < current
    starting_since = (None if not starting else
                      state.starting_since if state.starting_since is not None else now)
    protected = (starting_since is not None
                 and now - starting_since < policy.startup_grace_seconds)
    idle_since = _idle_since(window, state, protected, now, busy)

    over = seen.panic_load / (max(seen.ready, 1) * policy.target) >= policy.panic_threshold
    was_panicking = _panicking(state, now)
    panic_until = (now + policy.stable_window_seconds if over
                   else state.panic_until if was_panicking else None)
    state = replace(state, panic_until=panic_until, starting_since=starting_since,
                    idle_since=idle_since, panic_peak=state.panic_peak if was_panicking else 0)
    want = _recommend(seen, current, state, policy)
    lower = max(policy.min_replicas, 1) if current > 0 or seen.demand else policy.min_replicas
    want = min(max(want, lower), policy.max_replicas)
    what = (f"{policy.metric} {seen.value:.3g} over {policy.stable_window_seconds:.0f} s "
            f"(target {policy.target:g} per replica)")
    may_lower = state.panic_until is None and not protected
    observed = seen.history >= policy.stable_window_seconds * policy.min_history

    if (policy.min_replicas == 0 and current > 0 and idle_since is not None and may_lower
            and observed and now - idle_since >= policy.scale_to_zero_delay_seconds):
        replicas, reason = 0, f"idle for {now - idle_since:.0f} s: scaling to zero"
        state = replace(state, low=())
    elif want > current:
        replicas = _up(current, want, policy)
        verb = ("waking" if current == 0 else
                "panic: scaling up" if state.panic_until is not None else "scaling up")
        reason = f"{what}: {verb} to {replicas}"
        state = replace(state, low=())
    elif want < current and may_lower:
        replicas, state, reason = _down(current, want, lower, observed=observed, now=now,
                                       state=state, policy=policy)
        reason = f"{what}: {reason}"
    else:
        replicas = current
        why = "panic" if state.panic_until is not None else "replicas starting"
        reason = f"{what}: {why}, no scale-down" if want < current else f"{what}: holding"
        state = replace(state, low=())
    if state.panic_until is not None:
        state = replace(state, panic_peak=max(state.panic_peak, replicas))
    return _finish(_bound(replicas, policy), current, now, state, reason=reason,
                   value=seen.value)


def _read(window: list[Sample], now: float, policy: Policy,
          busy: Callable[[Sample], bool]) -> _Seen | None:
    known = [(s, load) for s in window if (load := _load(s, policy)) is not None]
    if not known:
        return None
    start = now - policy.panic_window_seconds
    recent = [load for s, load in known if s.time > start]
    latest = window[-1]
    return _Seen(
        value=sum(s.value for s in window) / len(window),
        stable_load=sum(load for _, load in known) / len(known),
        panic_load=sum(recent) / len(recent) if recent else known[-1][1],
        demand=busy(latest) or any(busy(s) for s in window if s.time > start),
        ready=latest.ready_replicas,
        history=now - window[0].time,
    )


def _recommend(seen: _Seen, current: int, state: State, policy: Policy) -> int:
    """ceil(load / target) over the stable window; in panic the largest of that, the
    panic window's, this panic's peak and ``current``. A load within the tolerance of
    what ``current`` replicas carry recommends ``current``."""

    def replicas(load: float) -> int:
        if current > 0 and abs(load / (current * policy.target) - 1) <= policy.tolerance:
            return current
        return _ceil(load / policy.target)

    stable = replicas(seen.stable_load)
    if state.panic_until is None:
        return stable
    return max(stable, replicas(seen.panic_load), state.panic_peak, current)


def _up(current: int, want: int, policy: Policy) -> int:
    base = max(current, 1)
    limit = max(math.ceil(base * policy.max_scale_up_rate), base + policy.max_scale_up_step)
    return min(want, limit)


def _down(current: int, want: int, lower: int, *, observed: bool, now: float, state: State,
          policy: Policy) -> tuple[int, State, str]:
    """Hold until the highest recommendation of the last scaleDownDelay is below
    ``current``, then go to it (at most current / rate, or current - step, per decision)."""
    low = _record(state.low, want, now, current)
    state = replace(state, low=low)
    if not observed:
        return current, state, f"{want} wanted, too little history to scale down"
    delay = policy.scale_down_delay_seconds
    proven = next((level for level, since in low if now - since >= delay), None)
    if proven is None:
        left = delay - (now - low[-1][1])
        return current, state, f"{want} wanted, scale-down delayed {left:.0f} s more"
    limit = math.floor(current / policy.max_scale_down_rate)
    if policy.max_scale_down_step is not None:
        limit = max(limit, current - policy.max_scale_down_step)
    replicas = max(proven, limit, lower)
    state = replace(state, low=tuple(step for step in low if step[0] < replicas))
    return replicas, state, f"at most {proven} wanted for {delay:.0f} s: scaling down to {replicas}"


def _record(low: tuple[tuple[int, float], ...], want: int, now: float,
            current: int) -> tuple[tuple[int, float], ...]:
    """Add a recommendation below ``current`` to the staircase: levels below it are
    broken, levels at or above it hold, and its own level starts now if it is new."""
    kept = tuple(step for step in low if want <= step[0] < current)
    if kept and kept[0][0] == want:
        return kept
    return ((want, now), *kept)


def provisioning(trace: Sequence[tuple[float, float]], replicas: Sequence[tuple[float, int]],
                 target: float) -> tuple[float, float]:
    """(over, under) replica-seconds of ``replicas`` (ready replicas as (time, count)
    steps) against the load of ``trace`` ((time, load) steps, each replica serving
    ``target``), from the trace's first to its last time. A step holds its value
    until the next one; before its first step ``replicas`` is 0."""
    if len(trace) < 2:
        return 0.0, 0.0
    start, end = trace[0][0], trace[-1][0]
    times = sorted({t for t, _ in trace} | {t for t, _ in replicas if start < t < end})
    over = under = 0.0
    load_at, count_at = _stepper(trace), _stepper(replicas)
    for begin, finish in itertools.pairwise(times):
        needed = _ceil(load_at(begin) / target)
        have = count_at(begin)
        span = finish - begin
        over += max(0.0, have - needed) * span
        under += max(0.0, needed - have) * span
    return over, under


# ------------------------------------------------------------------------- helpers


def _load(sample: Sample, policy: Policy) -> float | None:
    """The sample's load in 'total' terms, or None when it says nothing about load."""
    if policy.aggregate == "total":
        return sample.value + sample.waiting
    if sample.ready_replicas == 0:
        return None  # an average over no pods: unknown (waiting requests still wake)
    return sample.value * sample.ready_replicas


def _idle_since(window: list[Sample], state: State, protected: bool,
                now: float, is_busy: Callable[[Sample], bool]) -> float | None:
    """Since when the load has been nil: a transition time, kept as it is while idle."""
    if protected:
        return None
    busy = [s.time for s in window if is_busy(s)]
    if busy and (state.idle_since is None or busy[-1] >= state.idle_since):
        after = [s.time for s in window if s.time > busy[-1]]
        return after[0] if after else None
    if state.idle_since is not None:
        return state.idle_since
    # Idle throughout: evidence from the first sample, or from now if pods were
    # starting until now (their zeros were not evidence).
    return now if state.starting_since is not None else window[0].time


def _panicking(state: State, now: float) -> bool:
    return state.panic_until is not None and now <= state.panic_until


def _bound(replicas: int, policy: Policy) -> int:
    return min(max(replicas, policy.min_replicas), policy.max_replicas)


def _finish(replicas: int, current: int, now: float, state: State, *, reason: str,
            value: float | None) -> Decision:
    scaled = now if replicas != current else state.last_scale_time
    return Decision(replicas, replace(state, desired=replicas, last_scale_time=scaled),
                    reason, value, _panicking(state, now))


def _ceil(x: float) -> int:
    return max(0, math.ceil(x - _EPSILON))


def _stepper(steps: Sequence[tuple[float, float]]) -> Callable[[float], float]:
    """The step function through ``steps``: 0 before the first, then each value until
    the next step."""
    ordered = sorted(steps)
    times = [t for t, _ in ordered]

    def at(t: float) -> float:
        index = bisect.bisect_right(times, t)
        return ordered[index - 1][1] if index else 0.0

    return at


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)

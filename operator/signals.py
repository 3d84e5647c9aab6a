"""Autoscaling signals: one registry entry each.

A :class:`Signal` says everything the operator needs to scale on it: its name (the value of
``spec.autoscaling.metric``, and so the CRD's enum), its unit, whether its value is a total
over the ready pods or a per-replica figure, how to read it from a round of runtime pod
scrapes, and its PromQL. :mod:`.autoscale` (the algorithm), :mod:`.scaling` (the loop, with
either source) and :mod:`.api` (validation) all read :data:`SIGNALS`; adding a signal is
one entry here. A name that is not registered is a validation error, never a default.

Also the reading of one pod's ``/metrics`` (:func:`parse_scrape`) that the entries share.
Pure: imports no Kubernetes client.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from prometheus_client.parser import text_string_to_metric_families

from modelyard import contract

INFLIGHT = contract.INFLIGHT
QUEUE_DEPTH = contract.QUEUE_DEPTH
REQUESTS = f"{contract.REQUESTS}_total"
LATENCY = f"{contract.REQUEST_DURATION}_bucket"
GPU_UTILIZATION = contract.GPU_UTILIZATION


@dataclass(frozen=True)
class Scrape:
    """One runtime pod's ``/metrics`` at one time, reduced to what autoscaling reads."""

    pod: str
    time: float
    ready: bool
    inflight: float = 0.0
    queue_depth: float = 0.0
    requests: float = 0.0  # the counter: answered requests since the process started
    latency: tuple[tuple[float, float], ...] = ()  # (upper bound s, cumulative count)
    gpu_utilization: float | None = None  # 0..1, mean over the pod's devices


def parse_scrape(pod: str, time: float, text: str, *, ready: bool) -> Scrape:
    """Read the runtime's exposition text (the names in :mod:`modelyard.contract`)."""
    inflight = queue = requests = 0.0
    buckets: dict[float, float] = {}
    gpus: list[float] = []
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == INFLIGHT:
                inflight += s.value
            elif s.name == QUEUE_DEPTH:
                queue += s.value
            elif s.name == REQUESTS:
                requests += s.value
            elif s.name == LATENCY:
                bound = float(s.labels["le"])
                buckets[bound] = buckets.get(bound, 0.0) + s.value
            elif s.name == GPU_UTILIZATION:
                gpus.append(s.value)
    return Scrape(pod, time, ready, inflight, queue, requests, tuple(sorted(buckets.items())),
                  sum(gpus) / len(gpus) if gpus else None)


def quantile(buckets: tuple[tuple[float, float], ...], q: float) -> float | None:
    """PromQL ``histogram_quantile`` over cumulative buckets; None without observations."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound  # beyond the last finite bucket: its bound is all we know
            if count == lower_count:
                return bound
            share = (rank - lower_count) / (count - lower_count)
            return lower_bound + (bound - lower_bound) * share
        lower_bound, lower_count = bound, count
    return None


# (ready scrapes of this round, each pod's previous scrape) -> the value, or None: unknown yet
FromScrapes = Callable[[Sequence[Scrape], Mapping[str, Scrape]], float | None]
# (series selector, rate window such as "60s") -> an instant query for the value
PromQL = Callable[[str, str], str]


@dataclass(frozen=True)
class Signal:
    name: str
    unit: str
    aggregate: Literal["total", "average"]  # total over ready pods, or per replica
    from_scrapes: FromScrapes
    promql: PromQL
    description: str = ""


def _pairs(ready: Sequence[Scrape], previous: Mapping[str, Scrape]
           ) -> list[tuple[Scrape, Scrape]] | None:
    """(before, now) per pod scraped twice: rates need two scrapes. None: no pair yet."""
    pairs = [(previous[s.pod], s) for s in ready
             if s.pod in previous and s.time > previous[s.pod].time]
    return pairs or None


def _since(now: float, before: float) -> float:
    """A counter's increase; one that went down restarted from zero."""
    return now if now < before else now - before


def _rps(ready: Sequence[Scrape], previous: Mapping[str, Scrape]) -> float | None:
    if not ready:
        return 0.0
    pairs = _pairs(ready, previous)
    if pairs is None:
        return None
    rates = [_since(now.requests, before.requests) / (now.time - before.time)
             for before, now in pairs]
    return sum(rates) * len(ready) / len(pairs)  # a fresh pod carries the average


def _latency_p95_ms(ready: Sequence[Scrape], previous: Mapping[str, Scrape]) -> float | None:
    if not ready:
        return 0.0
    pairs = _pairs(ready, previous)
    if pairs is None:
        return None
    merged: dict[float, float] = {}  # the interval's histogram, all pods
    for before, now in pairs:
        old = dict(before.latency)
        reset = now.requests < before.requests
        for bound, count in now.latency:
            delta = count if reset else count - old.get(bound, 0.0)
            merged[bound] = merged.get(bound, 0.0) + delta
    p95 = quantile(tuple(sorted(merged.items())), 0.95)
    return 0.0 if p95 is None else p95 * 1000


def _gpu_percent(ready: Sequence[Scrape], previous: Mapping[str, Scrape]) -> float | None:
    known = [s.gpu_utilization for s in ready if s.gpu_utilization is not None]
    return 100 * sum(known) / len(known) if known else (0.0 if not ready else None)


SIGNALS: Mapping[str, Signal] = {s.name: s for s in (
    Signal("concurrency", "requests in flight", "total",
           lambda ready, _: sum(s.inflight for s in ready),
           lambda sel, _: f"sum({INFLIGHT}{sel})",
           "requests being handled, including those queued for a batch"),
    Signal("rps", "requests/s", "total", _rps,
           lambda sel, window: f"sum(rate({REQUESTS}{sel}[{window}]))",
           "answered requests per second"),
    Signal("queueDepth", "queued items", "total",
           lambda ready, _: sum(s.queue_depth for s in ready),
           lambda sel, _: f"sum({QUEUE_DEPTH}{sel})",
           "items waiting for a batch"),
    Signal("latencyP95", "ms", "average", _latency_p95_ms,
           lambda sel, window: "1000 * histogram_quantile(0.95, sum by (le) "
                               f"(rate({LATENCY}{sel}[{window}])))",
           "95th percentile of request latency"),
    Signal("gpuUtilization", "%", "average", _gpu_percent,
           lambda sel, _: f"100 * avg({GPU_UTILIZATION}{sel})",
           "mean GPU utilisation of the ready pods"),
)}
NAMES: tuple[str, ...] = tuple(SIGNALS)


class UnknownSignal(ValueError):
    pass


def signal(name: str) -> Signal:
    """The registered signal ``name``; :class:`UnknownSignal` (a ValueError) if none."""
    try:
        return SIGNALS[name]
    except KeyError:
        raise UnknownSignal(f"unknown metric {name!r} (no such autoscaling signal); one of "
                            f"{', '.join(NAMES)}") from None

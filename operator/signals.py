"""Autoscaling signals: one registry entry each; and what a pod's ``/metrics`` says.

A :class:`Signal` says everything the operator needs to scale on it: its name (the value of
``spec.autoscaling.metric``, and so the CRD's enum), its unit, whether its value is a total
over the ready pods or a per-replica figure, the engines whose pods export it, how to read
it from a round of pod scrapes, and its PromQL. :mod:`.autoscale` (the algorithm),
:mod:`.scaling` (the loop, with either source) and :mod:`.api` (validation) all read
:data:`SIGNALS`; adding a signal is one entry here. A name that is not registered is a
validation error, never a default.

Signals mean the same on every engine. Where each engine exports a figure is one mapping,
:data:`ENGINE_SERIES` (the names are :mod:`modelyard.contract`'s): ``concurrency`` is the
modelyard runtime's in-flight gauge and vLLM's running plus waiting requests, ``queueDepth``
its batch queue and vLLM's waiting requests, and so on. :func:`read_exposition` reads one
pod's ``/metrics`` through that mapping, whichever engine wrote it (a pod exports one
engine's names); :func:`parse_scrape` (autoscaling) and :func:`.analysis.parse_metrics`
(canary analysis) both start from it.

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

MODELYARD, VLLM = "modelyard", "vllm"  # the values of spec.runtime.engine
ENGINES = (MODELYARD, VLLM)
# The signal the idle test reads whatever the scaling metric: requests in flight or
# waiting at the pods (scale to zero needs none for scaleToZeroDelaySeconds).
IN_FLIGHT_SIGNAL = "concurrency"

Buckets = tuple[tuple[float, float], ...]  # (upper bound, cumulative count), sorted


@dataclass(frozen=True)
class EngineSeries:
    """Where one engine's pods export each figure the operator reads (names as scraped)."""

    in_flight: tuple[str, ...]  # gauges, summed: requests being handled or waiting
    waiting: tuple[str, ...]  # gauges, summed: requests (items) waiting to be taken
    requests: str  # counter: requests answered
    error_label: str  # the label of requests holding the HTTP status ("5..", "5xx")
    latency: str  # histogram: request latency, arrival to reply
    inference_handlers: tuple[str, ...] = ()  # requests' handler label values; () all
    ttft: str | None = None  # histogram: time to first token
    itl: str | None = None  # histogram: inter-token latency
    gpu_utilization: str | None = None  # gauge 0..1 per device
    kv_cache_usage: str | None = None  # gauge 0..1

    def inference_matcher(self) -> str:
        """PromQL label matchers that keep only inference requests ('' when all are)."""
        if not self.inference_handlers:
            return ""
        return f'handler=~"{"|".join(self.inference_handlers)}"'

    def error_matcher(self) -> str:
        """The PromQL label matcher of a server error (5xx) answer."""
        return f'{self.error_label}=~"5.."'


ENGINE_SERIES: Mapping[str, EngineSeries] = {
    MODELYARD: EngineSeries(
        in_flight=(INFLIGHT,), waiting=(QUEUE_DEPTH,), requests=REQUESTS,
        error_label="code", latency=LATENCY, gpu_utilization=GPU_UTILIZATION),
    VLLM: EngineSeries(
        in_flight=(contract.VLLM_RUNNING, contract.VLLM_WAITING),
        waiting=(contract.VLLM_WAITING,), requests=f"{contract.VLLM_HTTP_REQUESTS}_total",
        error_label="status", latency=f"{contract.VLLM_E2E}_bucket",
        inference_handlers=contract.VLLM_INFERENCE_HANDLERS,
        ttft=f"{contract.VLLM_TTFT}_bucket", itl=f"{contract.VLLM_ITL}_bucket",
        kv_cache_usage=contract.VLLM_KV_CACHE_USAGE),
}


def series_of(engine: str) -> EngineSeries:
    try:
        return ENGINE_SERIES[engine]
    except KeyError:
        raise ValueError(f"unknown engine {engine!r}; one of {', '.join(ENGINES)}") from None


@dataclass(frozen=True)
class Exposition:
    """One pod's ``/metrics`` reduced to the figures the operator reads, in the same
    terms whichever engine wrote it (see :data:`ENGINE_SERIES`)."""

    requests: float = 0.0  # counter: inference requests answered since the process started
    errors: float = 0.0  # counter: of which server errors (5xx)
    in_flight: float = 0.0  # requests being handled or waiting
    waiting: float = 0.0  # requests (items) waiting to be taken
    latency: Buckets = ()
    ttft: Buckets = ()
    itl: Buckets = ()
    gpu_utilization: float | None = None  # 0..1, mean over the pod's devices
    kv_cache_usage: float | None = None  # 0..1


# What a sample counts toward, by its name; a name may count in two places (vLLM's
# waiting requests are in flight too).
Role = Literal["in_flight", "waiting", "requests", "errors", "latency", "ttft", "itl", "gpu",
               "kv"]


def _by_name() -> dict[str, list[tuple[Role, EngineSeries]]]:
    roles: dict[str, list[tuple[Role, EngineSeries]]] = {}
    for series in ENGINE_SERIES.values():
        named: list[tuple[Role, str | None]] = [
            *(("in_flight", n) for n in series.in_flight),
            *(("waiting", n) for n in series.waiting),
            ("requests", series.requests), ("latency", series.latency),
            ("ttft", series.ttft), ("itl", series.itl), ("gpu", series.gpu_utilization),
            ("kv", series.kv_cache_usage)]
        for role, name in named:
            if name is not None:
                roles.setdefault(name, []).append((role, series))
    return roles


_BY_NAME = _by_name()
# The counters and histograms of every engine, in order (what a Prometheus window fetches).
COUNTERS = tuple(dict.fromkeys(
    name for e in ENGINE_SERIES.values() for name in (e.requests, e.latency, e.ttft, e.itl)
    if name is not None))


def roles(name: str, labels: Mapping[str, str]) -> list[Role]:
    """What a sample (or series) of ``name`` with ``labels`` counts toward: an answered
    request only on an inference handler, and an error when its status is a 5xx."""
    out: list[Role] = []
    for role, series in _BY_NAME.get(name, ()):
        if role == "requests":
            handlers = series.inference_handlers
            if handlers and labels.get("handler") not in handlers:
                continue
            if labels.get(series.error_label, "").startswith("5"):
                out.append("errors")
        out.append(role)
    return out


def read_exposition(text: str) -> Exposition:
    """Read one pod's exposition text (Prometheus' text format, parsed by
    ``prometheus_client``'s own parser)."""
    sums: dict[str, float] = {"in_flight": 0.0, "waiting": 0.0, "requests": 0.0,
                              "errors": 0.0}
    histograms: dict[str, dict[float, float]] = {"latency": {}, "ttft": {}, "itl": {}}
    gauges: dict[str, list[float]] = {"gpu": [], "kv": []}
    for family in text_string_to_metric_families(_read_only(text)):
        for s in family.samples:
            for role in roles(s.name, s.labels):
                if role in sums:
                    sums[role] += s.value
                elif role in histograms:
                    bound = float(s.labels["le"])
                    histograms[role][bound] = histograms[role].get(bound, 0.0) + s.value
                else:
                    gauges[role].append(s.value)
    return Exposition(
        requests=sums["requests"], errors=sums["errors"], in_flight=sums["in_flight"],
        waiting=sums["waiting"], latency=_sorted(histograms["latency"]),
        ttft=_sorted(histograms["ttft"]), itl=_sorted(histograms["itl"]),
        gpu_utilization=_mean(gauges["gpu"]), kv_cache_usage=_mean(gauges["kv"]))


def _read_only(text: str) -> str:
    """The sample lines of the series read: a vLLM scrape has some 1,000 lines, of which
    about 80 are read, and parsing the rest would be most of the cost."""
    return "\n".join(line for line in text.splitlines()
                     if line.partition("{")[0].partition(" ")[0] in _BY_NAME) + "\n"


def _sorted(buckets: dict[float, float]) -> Buckets:
    return tuple(sorted(buckets.items()))


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


@dataclass(frozen=True)
class Scrape:
    """One serving pod's ``/metrics`` at one time, reduced to what autoscaling reads."""

    pod: str
    time: float
    ready: bool
    inflight: float = 0.0  # requests being handled or waiting (vLLM: running + waiting)
    queue_depth: float = 0.0  # waiting to be taken (vLLM: requests waiting)
    requests: float = 0.0  # the counter: answered requests since the process started
    latency: Buckets = ()  # (upper bound s, cumulative count)
    gpu_utilization: float | None = None  # 0..1, mean over the pod's devices
    kv_cache_usage: float | None = None  # 0..1 (vLLM)


def parse_scrape(pod: str, time: float, text: str, *, ready: bool) -> Scrape:
    """Read a pod's exposition text (the names in :mod:`modelyard.contract`)."""
    seen = read_exposition(text)
    return Scrape(pod, time, ready, seen.in_flight, seen.waiting, seen.requests, seen.latency,
                  seen.gpu_utilization, seen.kv_cache_usage)


def quantile(buckets: Buckets, q: float) -> float | None:
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
# (series selector, rate window such as "60s", the engine's series) -> an instant query
PromQL = Callable[[str, str, EngineSeries], str]


@dataclass(frozen=True)
class Signal:
    name: str
    unit: str
    aggregate: Literal["total", "average"]  # total over ready pods, or per replica
    from_scrapes: FromScrapes
    promql: PromQL
    description: str = ""
    engines: tuple[str, ...] = ENGINES  # the engines whose pods export it

    def summary(self) -> str:
        """``name (unit)``, with the engines when not every engine exports it."""
        only = "" if self.engines == ENGINES else f"; engine {', '.join(self.engines)}"
        return f"{self.name} ({self.unit}{only})"

    def query(self, selector: str, window: str, engine: str) -> str:
        """The instant PromQL query of this signal for ``engine``'s series."""
        if engine not in self.engines:
            raise ValueError(f"metric {self.name} is not exported by engine {engine} "
                             f"(only by {', '.join(self.engines)})")
        return self.promql(selector, window, series_of(engine))


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


def _mean_percent(ready: Sequence[Scrape], values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return 100 * sum(known) / len(known) if known else (0.0 if not ready else None)


def _gpu_percent(ready: Sequence[Scrape], previous: Mapping[str, Scrape]) -> float | None:
    return _mean_percent(ready, [s.gpu_utilization for s in ready])


def _kv_percent(ready: Sequence[Scrape], previous: Mapping[str, Scrape]) -> float | None:
    return _mean_percent(ready, [s.kv_cache_usage for s in ready])


def _with(selector: str, *matchers: str) -> str:
    """``selector`` (``{a="1",...}``) with more label matchers."""
    extra = ",".join(m for m in matchers if m)
    return selector if not extra else f"{selector[:-1]},{extra}}}"


def _of(names: tuple[str, ...], selector: str) -> str:
    """The series of any of ``names`` matching ``selector``."""
    if len(names) == 1:
        return f"{names[0]}{selector}"
    return _with("{" + f'__name__=~"{"|".join(names)}"' + "}", selector[1:-1])


SIGNALS: Mapping[str, Signal] = {s.name: s for s in (
    Signal("concurrency", "requests in flight", "total",
           lambda ready, _: sum(s.inflight for s in ready),
           lambda sel, _, e: f"sum({_of(e.in_flight, sel)})",
           "requests being handled or waiting (vLLM: running plus waiting)"),
    Signal("rps", "requests/s", "total", _rps,
           lambda sel, window, e: f"sum(rate({e.requests}{_with(sel, e.inference_matcher())}"
                                  f"[{window}]))",
           "answered inference requests per second, those refused for overload (503) "
           "included: the load offered"),
    Signal("queueDepth", "queued items", "total",
           lambda ready, _: sum(s.queue_depth for s in ready),
           lambda sel, _, e: f"sum({_of(e.waiting, sel)})",
           "items waiting for a batch (vLLM: requests waiting to be scheduled)"),
    Signal("latencyP95", "ms", "average", _latency_p95_ms,
           lambda sel, window, e: "1000 * histogram_quantile(0.95, sum by (le) "
                                  f"(rate({e.latency}{sel}[{window}])))",
           "95th percentile of request latency (vLLM: arrival to last token)"),
    Signal("gpuUtilization", "%", "average", _gpu_percent,
           lambda sel, _, e: f"100 * avg({e.gpu_utilization}{sel})",
           "mean GPU utilisation of the ready pods", engines=(MODELYARD,)),
    Signal("kvCacheUsage", "%", "average", _kv_percent,
           lambda sel, _, e: f"100 * avg({e.kv_cache_usage}{sel})",
           "mean KV-cache usage of the ready pods (vLLM's share of cache blocks in use)",
           engines=(VLLM,)),
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



def for_engine(engine: str) -> tuple[str, ...]:
    """The names of the signals ``engine``'s pods export."""
    return tuple(s.name for s in SIGNALS.values() if engine in s.engines)

"""Read one model version's metrics from a Prometheus server's HTTP API.

The second metrics source beside scraping the pods directly (:func:`.analysis.parse_metrics`
in ``reconcile``): canary analysis uses it when the resource names a Prometheus URL
(``spec.rollout.analysis.prometheusUrl``), the autoscaler when
``spec.autoscaling.prometheusUrl`` is set. It assumes the series carry the target labels
``namespace``, ``model_deployment`` and ``version`` (what :mod:`.devcluster.prometheus`
and the chart's scrape configuration attach; see :class:`LabelNames` to read others).

Pure builders and readers are apart from the I/O: :func:`selector`,
:func:`window_expr` and :func:`load_exprs` write PromQL; :func:`window_counts` and
:func:`sample_value` read decoded answers. :class:`Prometheus` is the async client
(``POST /api/v1/query`` with ``time=``).

Errors never crash the caller; it catches one type and waits::

    MetricsUnavailable            "inconclusive": judge or scale later
    ├── PrometheusUnreachable     no connection, timeout, a 5xx or a reply not from the API
    └── QueryFailed               Prometheus refused the query or answered another shape

**Exact windows, not** ``increase()``. :meth:`Prometheus.window` returns the same
:class:`~.analysis.Counts` a pair of direct scrapes gives, so :func:`.analysis.judge`
works unchanged on either source. PromQL's ``increase()`` would not do: it
extrapolates the first and last samples in the range to the range's edges, so it
returns fractions (12.4 requests), counts requests made before the window began when
the first sample inside it is late, and invents some when a series is young. Instead
one instant query fetches the raw samples of the request counters and the latency
buckets (of every engine: the runtime's, and vLLM's requests, end-to-end latency, time
to first token and inter-token latency, :data:`.signals.COUNTERS`) over
``[start - lookback, end]`` and, per series (counted as a pod's scrape counts it,
:func:`.signals.roles`):

* the **baseline** is the last sample at or before ``start`` (what an instant query at
  ``start`` returns);
* every later sample adds its rise over the previous one, and a sample *below* the
  previous one is a counter reset (the process restarted from zero) and adds its whole
  value, as ``increase()`` and :meth:`.analysis.Counts.since` do;
* a series with **no sample in the lookback before** ``start`` counts from zero: right
  for a pod that started inside the window (its counters began at zero there), and an
  over-count for a pod that served before Prometheus first scraped it (a window that
  starts before Prometheus discovered a pod, e.g. right after Prometheus itself
  started). The lookback defaults to five minutes, Prometheus's own staleness horizon.

The figures are exact at scrape granularity: a request counts in the window when the
first scrape after it is later than ``start``, and is seen once a scrape after it
happened (up to one scrape interval after ``end``). The autoscaler's figures (each
signal's query in :mod:`.signals`, for the model's engine; :meth:`Prometheus.load` for the
runtime's) are ordinary instant queries, ``rate()`` included: a rate is a rate, its
extrapolation is harmless there.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import httpx

from modelyard import contract

from .analysis import Counts
from .signals import COUNTERS, ENGINE_SERIES, roles

__all__ = [
    "LabelNames",
    "Load",
    "MetricsUnavailable",
    "Prometheus",
    "PrometheusUnreachable",
    "QueryFailed",
    "VersionRef",
    "api_data",
    "load_exprs",
    "sample_value",
    "selector",
    "window_counts",
    "window_expr",
]

REQUESTS_TOTAL = ENGINE_SERIES["modelyard"].requests
LATENCY_BUCKET = ENGINE_SERIES["modelyard"].latency
INFLIGHT = contract.INFLIGHT
QUEUE_DEPTH = contract.QUEUE_DEPTH
MODEL_READY = contract.MODEL_READY
GPU_UTILIZATION = contract.GPU_UTILIZATION
DEFAULT_LOOKBACK_S = 300.0


class MetricsUnavailable(Exception):
    """Prometheus could not say: the caller treats the figures as unknown, and waits."""


class PrometheusUnreachable(MetricsUnavailable):
    """No answer from the Prometheus API (connection, timeout, 5xx, not its JSON)."""


class QueryFailed(MetricsUnavailable):
    """Prometheus answered with an error, or with a result of an unexpected shape."""


@dataclass(frozen=True)
class VersionRef:
    """One version of one ModelDeployment: ``namespace/name`` serving ``version``."""

    namespace: str
    name: str
    version: str


@dataclass(frozen=True)
class LabelNames:
    """The series' label names for the namespace, the ModelDeployment and the version."""

    namespace: str = "namespace"
    deployment: str = "model_deployment"
    version: str = "version"


@dataclass(frozen=True)
class Load:
    """The autoscaler's view of one version at one instant; None where no series says."""

    inflight: float | None  # requests being handled, summed over pods
    rps: float | None  # answered requests per second over the rate window, every code
    queue_depth: float | None  # items waiting for a batch, summed over pods
    latency_p95_s: float | None  # over the rate window; None without requests
    gpu_utilization: float | None  # mean over pods and devices, 0..1; None without GPUs
    ready_replicas: int  # pods whose model answers (modelyard_model_ready == 1)


# -- pure: PromQL ---------------------------------------------------------------------

def _quote(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def selector(ref: VersionRef, names: LabelNames = LabelNames(),
             metrics: Sequence[str] = ()) -> str:
    """``{namespace="ns",model_deployment="name",version="v"}``, optionally of ``metrics``."""
    matchers = []
    if metrics:
        matchers.append(f"__name__=~{_quote('|'.join(metrics))}")
    matchers += [f"{names.namespace}={_quote(ref.namespace)}",
                 f"{names.deployment}={_quote(ref.name)}",
                 f"{names.version}={_quote(ref.version)}"]
    return "{" + ",".join(matchers) + "}"


def duration(seconds: float) -> str:
    """A PromQL duration (milliseconds, at least 1)."""
    return f"{max(1, math.ceil(seconds * 1000))}ms"


def window_expr(ref: VersionRef, start: float, end: float,
                names: LabelNames = LabelNames(),
                lookback_s: float = DEFAULT_LOOKBACK_S) -> str:
    """The raw samples a window needs, to evaluate at ``end``: the request counters and
    the latency buckets of every engine (a version's pods export one engine's)."""
    if end < start:
        raise ValueError(f"the window ends ({end}) before it starts ({start})")
    series = selector(ref, names, COUNTERS)
    return f"{series}[{duration(end - start + lookback_s)}]"


def load_exprs(ref: VersionRef, names: LabelNames = LabelNames(),
               rate_window_s: float = 60.0) -> dict[str, str]:
    """One instant query per :class:`Load` figure, by field name."""
    sel = selector(ref, names)
    window = duration(rate_window_s)
    return {
        "inflight": f"sum({INFLIGHT}{sel})",
        "rps": f"sum(rate({REQUESTS_TOTAL}{sel}[{window}]))",
        "queue_depth": f"sum({QUEUE_DEPTH}{sel})",
        "latency_p95_s": "histogram_quantile(0.95, sum by (le) "
                         f"(rate({LATENCY_BUCKET}{sel}[{window}])))",
        "gpu_utilization": f"avg({GPU_UTILIZATION}{sel})",
        "ready_replicas": f"count({MODEL_READY}{sel} == 1)",
    }


# -- pure: reading answers ------------------------------------------------------------

def _increase(samples: Sequence[tuple[float, float]], start: float) -> float:
    """The exact rise of one counter after ``start``; resets count their whole value."""
    previous = 0.0  # no sample at or before start: the series began inside the window
    rise = 0.0
    for stamp, value in samples:
        if stamp <= start:
            previous = value
            continue
        rise += value - previous if value >= previous else value
        previous = value
    return rise


def window_counts(data: Mapping[str, Any], start: float) -> Counts:
    """:class:`Counts` of the window after ``start`` from :func:`window_expr`'s answer;
    each series counts as the same series scraped from a pod would
    (:func:`.signals.roles`)."""
    if data.get("resultType") != "matrix":
        raise QueryFailed(f"expected a range vector, got {data.get('resultType')!r}")
    sums = {"requests": 0.0, "errors": 0.0}
    histograms: dict[str, dict[float, float]] = {"latency": {}, "ttft": {}, "itl": {}}
    try:
        for series in data["result"]:
            labels = series["metric"]
            samples = sorted((float(t), float(v)) for t, v in series["values"])
            rise = _increase(samples, start)
            for role in roles(labels["__name__"], labels):
                if role in sums:
                    sums[role] += rise
                elif role in histograms:
                    bound = float(labels["le"])
                    histograms[role][bound] = histograms[role].get(bound, 0.0) + rise
    except (KeyError, TypeError, ValueError) as error:
        raise QueryFailed(f"unexpected series in the answer: {error!r}") from error
    latency, ttft, itl = (tuple(sorted(histograms[h].items())) for h in ("latency", "ttft", "itl"))
    return Counts(sums["requests"], sums["errors"], latency, ttft, itl)


def sample_value(data: Mapping[str, Any]) -> float | None:
    """The value of an aggregation's answer: None when empty or not a number (NaN)."""
    kind = data.get("resultType")
    try:
        if kind == "scalar":
            value = float(data["result"][1])
        elif kind == "vector":
            result = data["result"]
            if not result:
                return None
            if len(result) > 1:
                raise QueryFailed(f"expected one series, got {len(result)}")
            value = float(result[0]["value"][1])
        else:
            raise QueryFailed(f"expected an instant vector, got {kind!r}")
    except (KeyError, IndexError, TypeError, ValueError) as error:
        raise QueryFailed(f"unexpected answer: {error!r}") from error
    return None if math.isnan(value) or math.isinf(value) else value


def api_data(status: int, body: bytes) -> dict[str, Any]:
    """The ``data`` of an API reply, or the :class:`MetricsUnavailable` it amounts to."""
    try:
        decoded = json.loads(body)
    except ValueError:
        decoded = None
    if not isinstance(decoded, dict) or "status" not in decoded:
        raise PrometheusUnreachable(f"HTTP {status} without a Prometheus API answer: "
                                    f"{body[:200]!r}")
    if decoded["status"] != "success":
        message = f"{decoded.get('errorType', 'error')}: {decoded.get('error', '(no message)')}"
        if status >= 500:  # unavailable, internal, a query timeout: the server's trouble
            raise PrometheusUnreachable(f"HTTP {status}, {message}")
        raise QueryFailed(message)
    data = decoded.get("data")
    if not isinstance(data, dict):
        raise QueryFailed(f"no data in the answer: {body[:200]!r}")
    return data


# -- I/O ------------------------------------------------------------------------------

class Prometheus:
    """An async client of one Prometheus server. ``async with Prometheus(url) as p: ...``"""

    def __init__(self, url: str, *, timeout_s: float = 5.0, names: LabelNames = LabelNames(),
                 lookback_s: float = DEFAULT_LOOKBACK_S,
                 transport: httpx.AsyncBaseTransport | None = None):
        self.url = url.rstrip("/")
        self.names = names
        self.lookback_s = lookback_s
        self._http = httpx.AsyncClient(timeout=timeout_s, transport=transport)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def query(self, expr: str, at: float) -> dict[str, Any]:
        """``data`` of an instant query evaluated at ``at`` (Unix seconds)."""
        try:
            reply = await self._http.post(f"{self.url}/api/v1/query",
                                          data={"query": expr, "time": f"{at:.3f}"})
        except (httpx.HTTPError, httpx.InvalidURL) as error:
            raise PrometheusUnreachable(f"{self.url}: {type(error).__name__}: {error}") \
                from error
        return api_data(reply.status_code, reply.content)

    async def window(self, ref: VersionRef, start: float, end: float | None = None) -> Counts:
        """Requests, 5xx errors and latency buckets of ``ref`` over ``[start, end]``."""
        end = time.time() if end is None else end
        data = await self.query(window_expr(ref, start, end, self.names, self.lookback_s), end)
        return window_counts(data, start)

    async def load(self, ref: VersionRef, *, at: float | None = None,
                   rate_window_s: float = 60.0) -> Load:
        """In-flight, rate, queue, p95 latency, GPU use and ready pods of ``ref`` now."""
        at = time.time() if at is None else at
        exprs = load_exprs(ref, self.names, rate_window_s)
        answers = await asyncio.gather(*(self.query(e, at) for e in exprs.values()))
        v = dict(zip(exprs, (sample_value(a) for a in answers), strict=True))
        return Load(inflight=v["inflight"], rps=v["rps"], queue_depth=v["queue_depth"],
                    latency_p95_s=v["latency_p95_s"], gpu_utilization=v["gpu_utilization"],
                    ready_replicas=int(v["ready_replicas"] or 0))

"""Judge a canary from the serving pods' own Prometheus metrics (pure: text in, verdict out).

Called by :mod:`.measure` at every pass of a canary with ``rollout.analysis`` set.
:func:`parse_metrics` reads one scrape into :class:`Counts`, whichever engine wrote it
(through :func:`.signals.read_exposition`): answered inference requests and their server
errors (the modelyard runtime's ``modelyard_requests_total{code}``; vLLM's
``http_requests_total{handler,status}`` of its OpenAI endpoints), request latency (the
runtime's ``modelyard_request_duration_seconds``; vLLM's end-to-end latency) and, for a
generative engine, time to first token and inter-token latency. The counts of several
pods add up, and the difference between two scrapes is the window a step is judged on.

:func:`judge` says:

* ``wait`` while the window holds fewer than ``minRequests`` (at least one) requests,
  from each version when a threshold compares with the stable version;
* ``fail`` when the share of 5xx answers exceeds ``maxErrorRate``; when a percentile
  (interpolated within histogram buckets, as PromQL's ``histogram_quantile`` does)
  exceeds its limit (``maxLatencyP99Ms``, ``maxTtftP95Ms``, ``maxItlP95Ms``); or when a
  figure is too far above the stable version's over the same window
  (``maxErrorRateIncrease``, ``maxLatencyP99Ratio``, ``maxTtftP95Ratio``, ``maxItlP95Ratio``);
* ``pass`` otherwise.

Client errors (4xx) are the caller's mistakes, not the model's, and do not count as
errors. A verdict carries the figures it was reached on, and the stable version's when it
compared them; a rollback's ledger entry keeps both. Imports no Kubernetes client.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from . import api, api_status
from .signals import Buckets, quantile, read_exposition


def _plus(a: Buckets, b: Buckets) -> Buckets:
    merged = dict(a)
    for bound, count in b:
        merged[bound] = merged.get(bound, 0.0) + count
    return tuple(sorted(merged.items()))


def _minus(now: Buckets, before: Buckets) -> Buckets:
    old = dict(before)
    return tuple((bound, count - old.get(bound, 0.0)) for bound, count in now)


@dataclass(frozen=True)
class Counts:
    """Counters of one version: answered requests, 5xx among them, and the cumulative
    buckets of request latency (``buckets``), time to first token and inter-token
    latency (both empty for an engine that does not generate tokens)."""

    requests: float = 0.0
    errors: float = 0.0
    buckets: Buckets = ()  # (upper bound s, cumulative count), sorted
    ttft: Buckets = ()
    itl: Buckets = ()

    def __add__(self, other: Counts) -> Counts:
        return Counts(self.requests + other.requests, self.errors + other.errors,
                      _plus(self.buckets, other.buckets), _plus(self.ttft, other.ttft),
                      _plus(self.itl, other.itl))

    def since(self, before: Counts) -> Counts:
        """The window between two scrapes; a counter that went down restarted from zero."""
        if self.requests < before.requests:
            return self
        return Counts(self.requests - before.requests, self.errors - before.errors,
                      _minus(self.buckets, before.buckets), _minus(self.ttft, before.ttft),
                      _minus(self.itl, before.itl))


@dataclass(frozen=True)
class Figures:
    """What a window measured: the figures a verdict reports (None: nothing observed)."""

    requests: int
    error_rate: float | None = None
    p99_ms: float | None = None
    ttft_p95_ms: float | None = None
    itl_p95_ms: float | None = None

    def record(self) -> api_status.WindowFigures:
        return api_status.WindowFigures(
            requests=self.requests, error_rate=self.error_rate, p99_ms=self.p99_ms,
            ttft_p95_ms=self.ttft_p95_ms, itl_p95_ms=self.itl_p95_ms)


@dataclass(frozen=True)
class Verdict:
    outcome: Literal["pass", "fail", "wait"]
    reason: str
    requests: int
    error_rate: float | None = None
    p99_ms: float | None = None
    ttft_p95_ms: float | None = None
    itl_p95_ms: float | None = None
    stable: Figures | None = None  # the stable version's, when compared

    def figures(self) -> api_status.AnalysisFigures:
        return api_status.AnalysisFigures(
            requests=self.requests, error_rate=self.error_rate, p99_ms=self.p99_ms,
            ttft_p95_ms=self.ttft_p95_ms, itl_p95_ms=self.itl_p95_ms,
            stable=self.stable.record() if self.stable else None)


def parse_metrics(text: str) -> Counts:
    seen = read_exposition(text)
    return Counts(seen.requests, seen.errors, seen.latency, seen.ttft, seen.itl)


def total(counts: Iterable[Counts]) -> Counts:
    out = Counts()
    for c in counts:
        out = out + c
    return out


@dataclass(frozen=True)
class _Percentile:
    """One latency figure: its quantile, where its buckets are, its two thresholds."""

    label: str
    q: float
    buckets: Callable[[Counts], Buckets]
    limit_ms: Callable[[api.Analysis], float | None]
    ratio: Callable[[api.Analysis], float | None]


_PERCENTILES = (
    _Percentile("p99 latency", 0.99, lambda c: c.buckets,
                lambda a: a.max_latency_p99_ms, lambda a: a.max_latency_p99_ratio),
    _Percentile("TTFT p95", 0.95, lambda c: c.ttft,
                lambda a: a.max_ttft_p95_ms, lambda a: a.max_ttft_p95_ratio),
    _Percentile("ITL p95", 0.95, lambda c: c.itl,
                lambda a: a.max_itl_p95_ms, lambda a: a.max_itl_p95_ratio),
)


def _ms(counts: Counts, p: _Percentile) -> float | None:
    value = quantile(p.buckets(counts), p.q)
    return None if value is None else value * 1000


def figures(counts: Counts) -> Figures:
    """The figures of a window, rounded as status shows them."""
    def rounded(p: _Percentile) -> float | None:
        value = _ms(counts, p)
        return None if value is None else round(value, 1)

    error_rate = counts.errors / counts.requests if counts.requests else None
    p99, ttft, itl = (rounded(p) for p in _PERCENTILES)
    return Figures(int(counts.requests), None if error_rate is None else round(error_rate, 4),
                   p99, ttft, itl)


def _summary(counts: Counts) -> str:
    """``1.0%, p99 25 ms``, with the generative figures where there are any."""
    parts = [f"{counts.errors / counts.requests if counts.requests else 0.0:.1%}"]
    for p in _PERCENTILES:
        value = _ms(counts, p)
        if p is _PERCENTILES[0]:
            parts.append(f"p99 {'n/a' if value is None else f'{value:.0f} ms'}")
        elif value is not None:
            parts.append(f"{p.label} {value:.0f} ms")
    return ", ".join(parts)


def judge(window: Counts, analysis: api.Analysis, stable: Counts | None = None) -> Verdict:
    """The verdict on the new version's ``window``; ``stable`` is the stable version's window
    over the same interval, for the relative thresholds (canary versus stable)."""
    needed = max(analysis.min_requests, 1)
    requests = int(window.requests)
    if requests < needed:
        return Verdict("wait", f"{requests} of {needed} requests needed to judge", requests)
    relative = analysis.compares_with_stable
    if relative and (stable is None or int(stable.requests) < needed):
        seen = int(stable.requests) if stable else 0
        return Verdict("wait", f"the stable version served {seen} of {needed} requests needed "
                               "to compare with it", requests)
    compared = stable if relative else None
    mine = figures(window)
    theirs = figures(compared) if compared is not None else None

    def verdict(outcome: Literal["pass", "fail"], reason: str) -> Verdict:
        return Verdict(outcome, f"{reason} over {requests} requests", requests,
                       mine.error_rate, mine.p99_ms, mine.ttft_p95_ms, mine.itl_p95_ms, theirs)

    error_rate = window.errors / window.requests
    if error_rate > analysis.max_error_rate:
        return verdict("fail", f"error rate {error_rate:.1%} above "
                               f"{analysis.max_error_rate:.1%}")
    for p in _PERCENTILES:
        value, limit = _ms(window, p), p.limit_ms(analysis)
        if limit is not None and value is not None and value > limit:
            return verdict("fail", f"{p.label} {value:.0f} ms above {limit:.0f} ms")
    if compared is not None:
        stable_rate = compared.errors / compared.requests
        increase = analysis.max_error_rate_increase
        if increase is not None and error_rate > stable_rate + increase:
            return verdict("fail", f"error rate {error_rate:.1%} above the stable version's "
                                   f"{stable_rate:.1%} + {increase:.1%}")
        for p in _PERCENTILES:
            value, theirs_ms, ratio = _ms(window, p), _ms(compared, p), p.ratio(analysis)
            if ratio is not None and value is not None and theirs_ms \
                    and value > theirs_ms * ratio:
                return verdict("fail", f"{p.label} {value:.0f} ms above {ratio:g}x the "
                                       f"stable version's {theirs_ms:.0f} ms")
        return verdict("pass", f"error rate {_summary(window)} (stable: {_summary(compared)})")
    return verdict("pass", f"error rate {_summary(window)}")

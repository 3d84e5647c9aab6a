"""Judge a canary from the runtime's own Prometheus metrics (pure: text in, verdict out).

Called by :mod:`.reconcile` at every pass of a canary with ``rollout.analysis`` set.
The runtime exports ``modelyard_requests_total{code}`` and the histogram
``modelyard_request_duration_seconds``; :func:`parse_metrics` reads one scrape (with
``prometheus_client``'s own parser) into :class:`Counts`, the counts of several pods
add up, and the difference between two scrapes is the window a step is judged on.

:func:`judge` says:

* ``wait`` while the window holds fewer than ``minRequests`` (at least one) requests;
* ``fail`` when the share of 5xx answers exceeds ``maxErrorRate`` or the p99 latency
  (interpolated within histogram buckets, as PromQL's ``histogram_quantile`` does)
  exceeds ``maxLatencyP99Ms``;
* ``pass`` otherwise.

Client errors (4xx) are the caller's mistakes, not the model's, and do not count.
Imports no Kubernetes client.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from prometheus_client.parser import text_string_to_metric_families

from modelyard import contract

from . import api, api_status
from .signals import quantile

REQUESTS = contract.REQUESTS
LATENCY = contract.REQUEST_DURATION


@dataclass(frozen=True)
class Counts:
    requests: float = 0.0
    errors: float = 0.0
    buckets: tuple[tuple[float, float], ...] = ()  # (upper bound, cumulative count), sorted

    def __add__(self, other: Counts) -> Counts:
        merged: dict[float, float] = dict(self.buckets)
        for bound, count in other.buckets:
            merged[bound] = merged.get(bound, 0.0) + count
        return Counts(self.requests + other.requests, self.errors + other.errors,
                      tuple(sorted(merged.items())))

    def since(self, before: Counts) -> Counts:
        """The window between two scrapes; a counter that went down restarted from zero."""
        if self.requests < before.requests:
            return self
        old = dict(before.buckets)
        return Counts(self.requests - before.requests, self.errors - before.errors,
                      tuple((b, c - old.get(b, 0.0)) for b, c in self.buckets))


@dataclass(frozen=True)
class Verdict:
    outcome: Literal["pass", "fail", "wait"]
    reason: str
    requests: int
    error_rate: float | None = None
    p99_ms: float | None = None

    def figures(self) -> api_status.AnalysisFigures:
        return api_status.AnalysisFigures(requests=self.requests, error_rate=self.error_rate,
                                   p99_ms=self.p99_ms)


def parse_metrics(text: str) -> Counts:
    requests = errors = 0.0
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == f"{REQUESTS}_total":
                requests += sample.value
                if sample.labels.get("code", "").startswith("5"):
                    errors += sample.value
            elif sample.name == f"{LATENCY}_bucket":
                bound = float(sample.labels["le"])
                buckets[bound] = buckets.get(bound, 0.0) + sample.value
    return Counts(requests, errors, tuple(sorted(buckets.items())))


def total(counts: Iterable[Counts]) -> Counts:
    out = Counts()
    for c in counts:
        out = out + c
    return out


def judge(window: Counts, analysis: api.Analysis, stable: Counts | None = None) -> Verdict:
    """The verdict on the new version's ``window``; ``stable`` is the stable version's window
    over the same interval, for the relative thresholds (canary versus stable)."""
    needed = max(analysis.min_requests, 1)
    requests = int(window.requests)
    if requests < needed:
        return Verdict("wait", f"{requests} of {needed} requests needed to judge", requests)
    error_rate = window.errors / window.requests
    p99 = quantile(window.buckets, 0.99)
    p99_ms = None if p99 is None else p99 * 1000
    relative = analysis.max_error_rate_increase is not None \
        or analysis.max_latency_p99_ratio is not None
    if relative and (stable is None or int(stable.requests) < needed):
        seen = int(stable.requests) if stable else 0
        return Verdict("wait", f"the stable version served {seen} of {needed} requests needed "
                               "to compare with it", requests)

    def verdict(outcome: Literal["pass", "fail"], reason: str) -> Verdict:
        return Verdict(outcome, f"{reason} over {requests} requests", requests,
                       round(error_rate, 4), None if p99_ms is None else round(p99_ms, 1))

    if error_rate > analysis.max_error_rate:
        return verdict("fail", f"error rate {error_rate:.1%} above "
                               f"{analysis.max_error_rate:.1%}")
    limit = analysis.max_latency_p99_ms
    if limit is not None and p99_ms is not None and p99_ms > limit:
        return verdict("fail", f"p99 latency {p99_ms:.0f} ms above {limit:.0f} ms")
    compared = ""
    if relative and stable is not None:
        stable_rate = stable.errors / stable.requests
        increase = analysis.max_error_rate_increase
        if increase is not None and error_rate > stable_rate + increase:
            return verdict("fail", f"error rate {error_rate:.1%} above the stable version's "
                                   f"{stable_rate:.1%} + {increase:.1%}")
        stable_p99 = quantile(stable.buckets, 0.99)
        ratio = analysis.max_latency_p99_ratio
        if ratio is not None and p99 is not None and stable_p99 and p99 > stable_p99 * ratio:
            return verdict("fail", f"p99 latency {p99_ms:.0f} ms above {ratio:g}x the "
                                   f"stable version's {stable_p99 * 1000:.0f} ms")
        shown_stable = "n/a" if stable_p99 is None else f"{stable_p99 * 1000:.0f} ms"
        compared = f" (stable: {stable_rate:.1%}, p99 {shown_stable})"
    shown = "n/a" if p99_ms is None else f"{p99_ms:.0f} ms"
    return verdict("pass", f"error rate {error_rate:.1%}, p99 {shown}{compared}")

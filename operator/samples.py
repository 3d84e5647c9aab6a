"""Scrapes into samples: what the autoscaler's :func:`.autoscale.decide` reads.

A :class:`Window` per model accumulates rounds of scrapes of its ready pods (or values
measured by Prometheus) into :class:`Sample` s, one per tick, and keeps a stable window of
them. How each signal turns scrapes into a value is its entry in :mod:`.signals`.
Pure: nothing here reads a clock, the network or Kubernetes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from . import signals
from .signals import Scrape


@dataclass(frozen=True)
class Sample:
    """The metric of one model at one time. ``value`` is the total over the ready pods
    for a signal whose aggregate is ``total``, and the per-replica value otherwise
    (:mod:`.signals`).
    ``waiting`` counts requests held outside the pods (an activator, a gateway queue):
    demand that no ready pod reports yet, the signal that wakes a model from zero."""

    time: float
    ready_replicas: int
    value: float
    waiting: float = 0.0

    @property
    def busy(self) -> bool:
        return self.value > 0 or self.waiting > 0


@dataclass
class Window:
    """Accumulates scrapes into samples for one model; keeps ``seconds`` of them.

    Gauges (in-flight, queue depth, GPU utilisation) need one scrape; rates (rps) and
    latency percentiles need two scrapes of a pod (counter deltas over the interval).
    Only ready pods count. A pod with no previous scrape yet is assumed to carry the
    average of the others (a fresh pod's counters say nothing about its rate).
    """

    metric: str
    seconds: float = 60.0
    _previous: dict[str, Scrape] = field(default_factory=dict)
    _samples: deque[Sample] = field(default_factory=deque)

    @property
    def samples(self) -> tuple[Sample, ...]:
        return tuple(self._samples)

    def add(self, time: float, scrapes: Iterable[Scrape], *, waiting: float = 0.0
            ) -> Sample | None:
        """Add one round of scrapes (a pod that could not be scraped is left out, and so
        counts as not ready); returns the sample it made, if the metric is known yet."""
        ready = [s for s in scrapes if s.ready]
        value = self._value(ready)
        self._previous = {s.pod: s for s in ready}
        if value is None:
            return None
        sample = Sample(time, len(ready), value, waiting)
        self.append(sample)
        return sample

    def append(self, sample: Sample) -> None:
        """Add a sample measured elsewhere (e.g. a Prometheus query)."""
        self._samples.append(sample)
        while self._samples and self._samples[0].time <= sample.time - self.seconds:
            self._samples.popleft()

    def _value(self, ready: list[Scrape]) -> float | None:
        return signals.signal(self.metric).from_scrapes(ready, self._previous)

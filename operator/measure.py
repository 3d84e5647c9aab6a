"""Measure a canary before planning: the I/O half of rollout analysis.

:class:`CanaryJudge` answers an :class:`~.rollout.AnalysisRequest` with a
:class:`~.analysis.Verdict` over the current step's window, from the ready pods'
``/metrics`` (each pod's window starts at the first pass of the step that scraped it) or
from Prometheus (``source: prometheus``, the window starting at ``stepStartedAt``, so it
survives a restart). The judging itself is :func:`.analysis.judge` (pure). Metrics that
cannot be read mean waiting, never a rollback.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import httpx

from . import analysis, promql
from .rollout import AnalysisRequest
from .world import Key, World, parse_stamp

Scraper = Callable[[str, int], Awaitable[str | None]]


async def scrape_metrics(ip: str, port: int) -> str | None:
    """GET a runtime pod's /metrics; None when it does not answer.

    A pod serving TLS only (spec.tls) drops plain HTTP: then over https, encrypted but
    without verifying the pod's certificate: the operator dials a pod IP and holds no CA
    (it never reads Secrets), and the metrics carry counts, never a payload."""
    async with httpx.AsyncClient(timeout=2.0, verify=False) as client:
        for scheme in ("http", "https"):
            try:
                response = await client.get(f"{scheme}://{ip}:{port}/metrics")
            except (httpx.RemoteProtocolError, httpx.ReadError):
                continue  # a TLS listener hung up on plain HTTP
            except httpx.HTTPError:
                return None
            return response.text if response.status_code == 200 else None
    return None


class CanaryJudge:
    def __init__(self, scraper: Scraper | None = None):
        self._scrape = scraper or scrape_metrics
        # (namespace, name, startedAt, step, version, pod IP) -> counts at first scrape
        self._baselines: dict[tuple[str, ...], analysis.Counts] = {}

    def forget(self, key: Key) -> None:
        for k in [k for k in self._baselines if k[:2] == key]:
            del self._baselines[k]

    async def verdict(self, world: World, request: AnalysisRequest) -> analysis.Verdict:
        thresholds, current = request.thresholds, request.canary
        window = (*world.key, current.started_at, str(current.step))
        for stale in [k for k in self._baselines if k[:2] == world.key and k[:4] != window]:
            del self._baselines[stale]
        relative = thresholds.compares_with_stable  # every threshold relative to stable
        versions = [request.target, request.stable] if relative else [request.target]
        try:
            if thresholds.source == "prometheus":
                assert thresholds.prometheus_url is not None  # the CRD's rule
                async with promql.Prometheus(thresholds.prometheus_url) as prometheus:
                    start = parse_stamp(current.step_started_at).timestamp()
                    counts = [await prometheus.window(promql.VersionRef(*world.key, v), start)
                              for v in versions]
            else:
                counts = [await self._window(world, v, window) for v in versions]
        except promql.MetricsUnavailable as exc:
            return analysis.Verdict("wait", f"metrics unavailable: {exc}", 0)
        return analysis.judge(counts[0], thresholds, counts[1] if relative else None)

    async def _window(self, world: World, version: str,
                      window: tuple[str, ...]) -> analysis.Counts:
        assert world.spec is not None
        addresses = world.ready_pod_ips(version)
        texts = await asyncio.gather(*(self._scrape(ip, world.spec.runtime.port)
                                       for ip in addresses))
        seen = analysis.Counts()
        for ip, text in zip(addresses, texts, strict=True):
            if text is None:
                continue
            counts = analysis.parse_metrics(text)
            baseline = self._baselines.setdefault((*window, version, ip), counts)
            seen = seen + counts.since(baseline)
        return seen

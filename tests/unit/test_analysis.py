"""Canary analysis from the runtime's Prometheus text."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from modelyard.operator import analysis, api


def scrape(ok: int, errors: int, client_errors: int = 0, latency_s: float = 0.02) -> str:
    """What a runtime exports after answering these requests (its own metric names)."""
    registry = CollectorRegistry()
    requests = Counter("modelyard_requests", "", ["model", "version", "protocol", "code"],
                       registry=registry)
    latency = Histogram("modelyard_request_duration_seconds", "", ["model", "version", "protocol"],
                        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
                        registry=registry)
    for code, n in (("200", ok), ("500", errors), ("400", client_errors)):
        if n:
            requests.labels("m", "2", "v2", code).inc(n)
    for _ in range(ok + errors + client_errors):
        latency.labels("m", "2", "v2").observe(latency_s)
    return generate_latest(registry).decode()


THRESHOLDS = api.Analysis(max_error_rate=0.05, max_latency_p99_ms=100, min_requests=50)


def test_healthy_canary_passes() -> None:
    verdict = analysis.judge(analysis.parse_metrics(scrape(200, 2)), THRESHOLDS)
    assert verdict.outcome == "pass"
    assert verdict.error_rate == pytest.approx(2 / 202, abs=1e-4)
    assert verdict.p99_ms is not None
    assert 10 < verdict.p99_ms <= 25


def test_errors_fail_and_client_errors_do_not_count() -> None:
    assert analysis.judge(analysis.parse_metrics(scrape(90, 10)), THRESHOLDS).outcome == "fail"
    fine = analysis.judge(analysis.parse_metrics(scrape(90, 0, client_errors=40)), THRESHOLDS)
    assert fine.outcome == "pass"


def test_slow_canary_fails_on_p99() -> None:
    verdict = analysis.judge(analysis.parse_metrics(scrape(100, 0, latency_s=0.4)), THRESHOLDS)
    assert verdict.outcome == "fail"
    assert "p99 latency" in verdict.reason


def test_too_few_requests_waits() -> None:
    verdict = analysis.judge(analysis.parse_metrics(scrape(10, 5)), THRESHOLDS)
    assert verdict.outcome == "wait"
    assert verdict.reason == "15 of 50 requests needed to judge"


def test_windows_are_deltas_and_pods_add_up() -> None:
    before = analysis.parse_metrics(scrape(100, 0))
    after = analysis.parse_metrics(scrape(160, 40))
    window = after.since(before)
    assert window.requests == 100
    assert window.errors == 40
    two_pods = analysis.total([before, before])
    assert two_pods.requests == 200
    restarted = analysis.parse_metrics(scrape(5, 0))
    assert restarted.since(before).requests == 5  # a counter reset starts a new window


def test_quantile_interpolates_like_promql() -> None:
    buckets = ((0.1, 50.0), (0.2, 100.0), (float("inf"), 100.0))
    assert analysis.quantile(buckets, 0.5) == pytest.approx(0.1)
    assert analysis.quantile(buckets, 0.75) == pytest.approx(0.15)
    assert analysis.quantile((), 0.99) is None


RELATIVE = api.Analysis(max_error_rate=0.5, max_error_rate_increase=0.02,
                        max_latency_p99_ratio=1.5, min_requests=50)


def test_canary_is_judged_against_the_stable_version_over_the_same_window() -> None:
    stable = analysis.parse_metrics(scrape(190, 10, latency_s=0.02))  # 5 % errors, p99 ~25 ms
    same = analysis.judge(analysis.parse_metrics(scrape(188, 12, latency_s=0.02)), RELATIVE,
                          stable)
    assert same.outcome == "pass", same.reason
    assert "stable: 5.0%" in same.reason
    worse = analysis.judge(analysis.parse_metrics(scrape(180, 20)), RELATIVE, stable)
    assert worse.outcome == "fail"
    assert "above the stable version's 5.0% + 2.0%" in worse.reason
    slower = analysis.judge(analysis.parse_metrics(scrape(190, 10, latency_s=0.2)), RELATIVE,
                            stable)
    assert slower.outcome == "fail"
    assert "1.5x the stable version's" in slower.reason


def test_comparing_waits_until_the_stable_version_has_enough_requests() -> None:
    canary = analysis.parse_metrics(scrape(100, 0))
    verdict = analysis.judge(canary, RELATIVE, analysis.parse_metrics(scrape(10, 0)))
    assert verdict.outcome == "wait"
    assert "stable version served 10 of 50" in verdict.reason

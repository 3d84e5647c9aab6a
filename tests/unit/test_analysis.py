"""Canary analysis from the serving pods' Prometheus text: the modelyard runtime's, and
vLLM's (real scrapes, ``vllm_scrapes``)."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from vllm_scrapes import SCRAPES

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


# ------------------------------------------------------- generative models (vLLM's scrapes)


def vllm_window(version: str, **replaced: str) -> analysis.Counts:
    """The counts of ``version`` between two real scrapes of its vLLM (``replaced``: text
    substituted in the later one, for what the capture could not make happen)."""
    after = SCRAPES[(version, "after")]
    for old, new in replaced.items():
        assert old in after
        after = after.replace(old, new)
    return analysis.parse_metrics(after).since(analysis.parse_metrics(SCRAPES[(version,
                                                                                "before")]))


def test_a_vllm_scrape_gives_requests_errors_and_token_latencies() -> None:
    stable = vllm_window("v1")
    # 12 streamed completions, 1 plain, 1 chat, 1 for a model it does not serve (a 404)
    assert (stable.requests, stable.errors) == (15, 0)
    figures = analysis.figures(stable)
    assert figures.requests == 15
    assert figures.ttft_p95_ms == pytest.approx(55.3, abs=0.1)
    assert figures.itl_p95_ms == pytest.approx(24.2, abs=0.1)
    assert figures.p99_ms == pytest.approx(297.0, abs=0.1)  # end to end
    slow = analysis.figures(vllm_window("v2"))
    assert slow.ttft_p95_ms is not None
    assert slow.ttft_p95_ms > 10 * figures.ttft_p95_ms  # 32 wider layers


def test_only_5xx_answers_of_the_openai_endpoints_count_as_errors() -> None:
    failing = vllm_window("v1", **{'/v1/completions",method="POST",status="4xx"} 1.0':
                                   '/v1/completions",method="POST",status="5xx"} 3.0'})
    assert (failing.requests, failing.errors) == (17, 3)  # the 404 made three 5xx
    elsewhere = vllm_window("v1", **{'handler="/v1/chat/completions",method="POST"':
                                     'handler="/v1/models",method="GET"'})
    assert elsewhere.requests == 14  # listing models is no inference request
    verdict = analysis.judge(failing, api.Analysis(max_error_rate=0.05, min_requests=10))
    assert verdict.outcome == "fail"
    assert verdict.reason == "error rate 17.6% above 5.0% over 17 requests"


def test_a_slow_generative_canary_fails_on_its_time_to_first_token_against_stable() -> None:
    thresholds = api.Analysis(max_ttft_p95_ratio=2, min_requests=10)
    assert thresholds.compares_with_stable
    verdict = analysis.judge(vllm_window("v2"), thresholds, vllm_window("v1"))
    assert verdict.outcome == "fail"
    assert verdict.reason == ("TTFT p95 662 ms above 2x the stable version's 55 ms over 15 "
                              "requests")
    record = verdict.figures()  # what the ledger keeps
    assert record.model_dump(by_alias=True, exclude_none=True) == {
        "requests": 15, "errorRate": 0.0, "p99Ms": 993.0, "ttftP95Ms": 662.5,
        "itlP95Ms": 198.7,
        "stable": {"requests": 15, "errorRate": 0.0, "p99Ms": 297.0, "ttftP95Ms": 55.3,
                   "itlP95Ms": 24.2}}
    same = analysis.judge(vllm_window("v1"), thresholds, vllm_window("v1"))
    assert same.outcome == "pass"
    assert same.reason == ("error rate 0.0%, p99 297 ms, TTFT p95 55 ms, ITL p95 24 ms "
                           "(stable: 0.0%, p99 297 ms, TTFT p95 55 ms, ITL p95 24 ms) over 15 "
                           "requests")
    itl = analysis.judge(vllm_window("v2"), api.Analysis(max_itl_p95_ratio=5, min_requests=10),
                         vllm_window("v1"))
    assert itl.reason.startswith("ITL p95 199 ms above 5x the stable version's 24 ms")


def test_absolute_token_latency_limits() -> None:
    limits = api.Analysis(max_ttft_p95_ms=300, max_itl_p95_ms=100, min_requests=10)
    assert not limits.compares_with_stable
    assert analysis.judge(vllm_window("v1"), limits).outcome == "pass"
    slow = analysis.judge(vllm_window("v2"), limits)
    assert (slow.outcome, slow.reason) == ("fail", "TTFT p95 662 ms above 300 ms over 15 "
                                                   "requests")
    assert slow.stable is None
    assert slow.figures().stable is None
    itl = analysis.judge(vllm_window("v2"), api.Analysis(max_itl_p95_ms=100, min_requests=10))
    assert itl.reason == "ITL p95 199 ms above 100 ms over 15 requests"


def test_token_thresholds_skip_an_engine_without_tokens() -> None:
    """A modelyard runtime exports no token latencies: nothing to judge them on (the CRD
    refuses these thresholds there; an older CRD let them through)."""
    verdict = analysis.judge(analysis.parse_metrics(scrape(100, 0)),
                             api.Analysis(max_ttft_p95_ms=1, max_itl_p95_ms=1, min_requests=50))
    assert verdict.outcome == "pass"
    assert verdict.ttft_p95_ms is None
    assert "TTFT" not in verdict.reason


def test_the_spec_rule_names_every_generative_threshold() -> None:
    """The CEL rule that refuses token thresholds on engine modelyard lists them all."""
    generative = {f.alias for name, f in api.Analysis.model_fields.items()
                  if "ttft" in name or "itl" in name}
    assert set(api.Analysis.GENERATIVE_FIELDS) == generative
    rule = api.Analysis.engine_rule()["rule"]
    assert all(f"has(self.rollout.analysis.{name})" in rule for name in generative)


def test_the_judge_measures_stable_for_a_ratio_on_token_latency_alone() -> None:
    """The operator's judge (pods' /metrics, each window from its first scrape) measures the
    stable version whenever a threshold is relative, the token-latency ratios included: with
    only ``maxTtftP95Ratio`` set, a canary slow to its first token fails against stable."""
    import asyncio
    from types import SimpleNamespace

    from modelyard.operator.api_status import CanaryStatus
    from modelyard.operator.measure import CanaryJudge
    from modelyard.operator.rollout import AnalysisRequest

    pods = {"10.0.0.1": "v1", "10.0.0.2": "v2"}  # stable, canary
    moment = {"now": "before"}

    async def scraper(ip: str, port: int) -> str | None:
        return SCRAPES[(pods[ip], moment["now"])]

    world = SimpleNamespace(
        key=("ns", "chat"), spec=SimpleNamespace(runtime=SimpleNamespace(port=8080)),
        ready_pod_ips=lambda version: [ip for ip, v in pods.items() if v == f"v{version}"])
    canary = CanaryStatus(version="2", weight=50, step=1, started_at="2026-12-06T00:00:00Z",
                          step_started_at="2026-12-06T00:00:00Z")
    request = AnalysisRequest("2", "1", canary,
                              api.Analysis(max_ttft_p95_ratio=2, min_requests=10))
    judge = CanaryJudge(scraper)

    async def scenario() -> tuple[analysis.Verdict, analysis.Verdict]:
        first = await judge.verdict(world, request)  # type: ignore[arg-type]
        moment["now"] = "after"  # 15 requests later, on both
        return first, await judge.verdict(world, request)  # type: ignore[arg-type]

    first, then = asyncio.run(scenario())
    assert first.outcome == "wait"
    assert then.outcome == "fail", then
    assert then.reason.startswith("TTFT p95 662 ms above 2x the stable version's 55 ms")

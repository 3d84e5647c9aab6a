"""The Prometheus source's pure half: PromQL it writes, and how it reads answers into Counts.

The answers below have the shape ``/api/v1/query`` returns (the cluster test checks the
same code against a real Prometheus)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from vllm_scrapes import SCRAPES

from modelyard.operator import analysis, api, promql, signals
from modelyard.operator.devcluster.prometheus import (
    PrometheusConfig,
    StaticTargets,
    scrape_config,
)

REF = promql.VersionRef("vision", "resnet", "3")


def series(name: str, values: list[tuple[float, float]], **labels: str) -> dict[str, Any]:
    return {"metric": {"__name__": name, "namespace": "vision", "model_deployment": "resnet",
                       "version": "3", **labels},
            "values": [[t, str(v)] for t, v in values]}


def matrix(*result: dict[str, Any]) -> dict[str, Any]:
    return {"resultType": "matrix", "result": list(result)}


def test_selector_quotes_label_values() -> None:
    ref = promql.VersionRef('we"ird', "a\\b", "1")
    assert promql.selector(ref) == \
        '{namespace="we\\"ird",model_deployment="a\\\\b",version="1"}'
    assert promql.selector(REF, metrics=("x", "y")).startswith('{__name__=~"x|y",')


def test_window_expr_reaches_back_for_the_baseline() -> None:
    expr = promql.window_expr(REF, start=1000.0, end=1060.5, lookback_s=300)
    assert expr.endswith("[360500ms]")
    assert "modelyard_requests_total|modelyard_request_duration_seconds_bucket" in expr
    with pytest.raises(ValueError, match="before it starts"):
        promql.window_expr(REF, start=10.0, end=5.0)


def test_window_counts_the_rise_after_start_exactly() -> None:
    start = 100.0
    data = matrix(
        # a baseline of 40 at start, then +10: requests before the window do not count
        series("modelyard_requests_total", [(90, 30), (100, 40), (105, 45), (110, 50)],
               code="200"),
        # first seen inside the window: a pod started there, its counter began at zero
        series("modelyard_requests_total", [(104, 2), (109, 3)], code="500"),
        # restarted inside the window (7 -> 1): the rise is 2 before, then 1 and 3 after
        series("modelyard_requests_total", [(99, 5), (103, 7), (106, 1), (111, 4)],
               code="200", pod="b"),
        series("modelyard_request_duration_seconds_bucket", [(100, 10), (110, 25)], le="0.1"),
        series("modelyard_request_duration_seconds_bucket", [(100, 40), (110, 58)], le="+Inf"),
    )
    counts = promql.window_counts(data, start)
    assert counts.requests == 10 + 3 + (2 + 1 + 3)
    assert counts.errors == 3
    assert counts.buckets == ((0.1, 15.0), (float("inf"), 18.0))


def test_window_counts_agree_with_two_direct_scrapes() -> None:
    before = analysis.Counts(40, 4, ((0.1, 30.0), (float("inf"), 40.0)))
    after = analysis.Counts(140, 9, ((0.1, 120.0), (float("inf"), 140.0)))
    data = matrix(
        series("modelyard_requests_total", [(1, 36), (5, 131)], code="200"),
        series("modelyard_requests_total", [(1, 4), (5, 9)], code="503"),
        series("modelyard_request_duration_seconds_bucket", [(1, 30), (5, 120)], le="0.1"),
        series("modelyard_request_duration_seconds_bucket", [(1, 40), (5, 140)], le="+Inf"),
    )
    window = promql.window_counts(data, start=2.0)
    assert window == after.since(before)
    thresholds = api.Analysis(max_error_rate=0.01, min_requests=50)
    assert analysis.judge(window, thresholds) == analysis.judge(after.since(before), thresholds)


def test_an_empty_window_is_zero_and_judged_wait() -> None:
    counts = promql.window_counts(matrix(), start=0.0)
    assert counts == analysis.Counts()
    assert analysis.judge(counts, api.Analysis(min_requests=1)).outcome == "wait"


def test_unexpected_answers_are_query_failures() -> None:
    with pytest.raises(promql.QueryFailed, match="range vector"):
        promql.window_counts({"resultType": "vector", "result": []}, 0.0)
    with pytest.raises(promql.QueryFailed):
        promql.window_counts(matrix({"metric": {}, "values": [[1, "2"]]}), 0.0)
    with pytest.raises(promql.QueryFailed, match="one series"):
        promql.sample_value({"resultType": "vector", "result": [
            {"metric": {}, "value": [1, "1"]}, {"metric": {}, "value": [1, "2"]}]})


def test_sample_value_reads_aggregations() -> None:
    assert promql.sample_value({"resultType": "vector", "result": []}) is None
    assert promql.sample_value({"resultType": "vector",
                                "result": [{"metric": {}, "value": [1, "NaN"]}]}) is None
    assert promql.sample_value({"resultType": "vector",
                                "result": [{"metric": {}, "value": [1, "2.5"]}]}) == 2.5
    assert promql.sample_value({"resultType": "scalar", "result": [1, "4"]}) == 4.0


def test_load_exprs_cover_every_figure() -> None:
    exprs = promql.load_exprs(REF, rate_window_s=30)
    assert set(exprs) == {"inflight", "rps", "queue_depth", "latency_p95_s", "gpu_utilization",
                          "ready_replicas"}
    assert exprs["rps"] == ('sum(rate(modelyard_requests_total{namespace="vision",'
                            'model_deployment="resnet",version="3"}[30000ms]))')
    assert exprs["latency_p95_s"].startswith("histogram_quantile(0.95, sum by (le)")


def test_api_errors_map_to_metrics_unavailable() -> None:
    ok = json.dumps({"status": "success", "data": {"resultType": "vector", "result": []}})
    assert promql.api_data(200, ok.encode()) == {"resultType": "vector", "result": []}
    bad = json.dumps({"status": "error", "errorType": "bad_data", "error": "parse error"})
    with pytest.raises(promql.QueryFailed, match="bad_data: parse error"):
        promql.api_data(400, bad.encode())
    busy = json.dumps({"status": "error", "errorType": "unavailable", "error": "not ready"})
    with pytest.raises(promql.PrometheusUnreachable):
        promql.api_data(503, busy.encode())
    with pytest.raises(promql.PrometheusUnreachable, match="without a Prometheus API answer"):
        promql.api_data(502, b"<html>Bad Gateway</html>")


def test_static_targets_config() -> None:
    config = scrape_config(PrometheusConfig(scrape_interval_s=1), None,
                           [StaticTargets(["127.0.0.1:8080"], {"namespace": "bench"})])
    assert config["global"]["scrape_interval"] == "1000ms"
    [job] = config["scrape_configs"]
    assert job["static_configs"] == [{"targets": ["127.0.0.1:8080"],
                                      "labels": {"namespace": "bench"}}]


# ------------------------------------------------------- generative models (vLLM's series)


def as_prometheus_series(before: str, after: str) -> dict[str, Any]:
    """The range vector Prometheus would hold of a version's pod scraped at t=1 and t=5,
    for the window query's names: each sample a series, with the target labels added."""
    def samples(text: str) -> dict[tuple[tuple[str, str], ...], float]:
        return {(("__name__", s.name), *sorted(s.labels.items())): s.value
                for f in text_string_to_metric_families(text) for s in f.samples
                if s.name in signals.COUNTERS}

    old, new = samples(before), samples(after)
    return matrix(*(series(dict(key)["__name__"],
                           ([(1, old[key])] if key in old else []) + [(5, value)],
                           **{k: v for k, v in key if k != "__name__"})
                    for key, value in new.items()))


def test_a_vllm_window_from_prometheus_equals_the_direct_scrapes() -> None:
    before, after = SCRAPES[("v2", "before")], SCRAPES[("v2", "after")]
    expr = promql.window_expr(REF, start=2.0, end=5.0)
    for name in ("http_requests_total", "vllm:time_to_first_token_seconds_bucket",
                 "vllm:inter_token_latency_seconds_bucket",
                 "vllm:e2e_request_latency_seconds_bucket"):
        assert name in expr
    window = promql.window_counts(as_prometheus_series(before, after), start=2.0)
    direct = analysis.parse_metrics(after).since(analysis.parse_metrics(before))
    assert window == direct
    assert window.requests == 15
    thresholds = api.Analysis(max_ttft_p95_ms=300, min_requests=10)
    assert analysis.judge(window, thresholds) == analysis.judge(direct, thresholds)


def test_vllm_errors_in_prometheus_are_5xx_of_the_openai_endpoints() -> None:
    data = matrix(
        series("http_requests_total", [(1, 10), (5, 30)], handler="/v1/completions",
               method="POST", status="2xx"),
        series("http_requests_total", [(1, 0), (5, 2)], handler="/v1/chat/completions",
               method="POST", status="5xx"),
        series("http_requests_total", [(1, 0), (5, 1)], handler="/v1/completions",
               method="POST", status="4xx"),
        series("http_requests_total", [(1, 0), (5, 9)], handler="/v1/models", method="GET",
               status="5xx"),
    )
    counts = promql.window_counts(data, start=2.0)
    assert (counts.requests, counts.errors) == (23, 2)


def test_every_signal_has_its_query_in_each_engine_series() -> None:
    sel = '{namespace="vision",model_deployment="chat",version="3"}'
    queries = {s.name: s.query(sel, "30000ms", "vllm") for s in signals.SIGNALS.values()
               if "vllm" in s.engines}
    assert queries == {
        "concurrency": 'sum({__name__=~"vllm:num_requests_running|vllm:num_requests_waiting",'
                       'namespace="vision",model_deployment="chat",version="3"})',
        "rps": 'sum(rate(http_requests_total{namespace="vision",model_deployment="chat",'
               'version="3",handler=~"/v1/completions|/v1/chat/completions|/v1/responses|'
               '/v1/embeddings"}[30000ms]))',
        "queueDepth": 'sum(vllm:num_requests_waiting{namespace="vision",'
                      'model_deployment="chat",version="3"})',
        "latencyP95": "1000 * histogram_quantile(0.95, sum by (le) (rate("
                      'vllm:e2e_request_latency_seconds_bucket{namespace="vision",'
                      'model_deployment="chat",version="3"}[30000ms])))',
        "kvCacheUsage": '100 * avg(vllm:kv_cache_usage_perc{namespace="vision",'
                        'model_deployment="chat",version="3"})',
    }
    assert signals.signal("concurrency").query(sel, "30000ms", "modelyard") == \
        f"sum(modelyard_inflight_requests{sel})"
    with pytest.raises(ValueError, match="not exported by engine vllm"):
        signals.signal("gpuUtilization").query(sel, "30000ms", "vllm")

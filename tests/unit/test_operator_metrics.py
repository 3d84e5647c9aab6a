"""The operator's /metrics: what Prometheus reads, parsed with prometheus_client's own parser.

The ModelDeployment statuses come from :func:`status.compute_status` (what the operator
writes), so the series follow the real status shape, not a copy of it."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from worlds import plain_step, world_of

from modelyard.operator import api, api_status, metrics
from modelyard.operator.rollout import RollBack
from modelyard.operator.status import compute_status, status_payload
from modelyard.operator.world import VersionState

T0 = dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.UTC)
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape(m: metrics.OperatorMetrics) -> Samples:
    return samples(generate_latest(m.registry).decode())


def value(found: Samples, metric: str, /, **labels: str) -> float | None:
    return found.get((metric, frozenset(labels.items())))


def named(found: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (n, labels), v in found.items() if n == name}


def status_of(version: str, observed: dict[str, VersionState], *, replicas: int = 2,
              previous: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """The status the operator writes for this spec and what the cluster shows."""
    spec = api.parse_spec({"model": {"version": version, "uri": f"s3://m/{version}"},
                           "replicas": replicas})
    world = world_of(spec, observed, previous=api_status.parse_status(previous))
    autoscaler = extra.pop("autoscaler", None)
    status, _ = compute_status(world, plain_step(world, replicas, **extra),
                               autoscaler=autoscaler, now=T0)
    return status_payload(status)


def serving(version: str, n: int = 2, **kw: Any) -> VersionState:
    return VersionState(version, f"m-v{version}", desired=n, replicas=n, ready=n, updated=n,
                        **kw)


@pytest.fixture
def m() -> metrics.OperatorMetrics:
    return metrics.OperatorMetrics(process=False)


def test_reconcile_passes_are_counted_by_result_and_timed(m: metrics.OperatorMetrics) -> None:
    found = scrape(m)
    assert value(found, "modelyard_operator_reconcile_total", result="ok") == 0
    assert value(found, "modelyard_operator_reconcile_total", result="error") == 0
    m.observe_pass(0.004, ok=True)
    m.observe_pass(0.2, ok=True)
    m.observe_pass(3.0, ok=False)
    found = scrape(m)
    assert value(found, "modelyard_operator_reconcile_total", result="ok") == 2
    assert value(found, "modelyard_operator_reconcile_total", result="error") == 1
    assert value(found, "modelyard_operator_reconcile_seconds_count") == 3
    assert value(found, "modelyard_operator_reconcile_seconds_sum") == pytest.approx(3.204)
    assert value(found, "modelyard_operator_reconcile_seconds_bucket", le="0.005") == 1
    assert value(found, "modelyard_operator_reconcile_seconds_bucket", le="0.25") == 2
    assert value(found, "modelyard_operator_reconcile_seconds_bucket", le="+Inf") == 3


def test_leader_gauge_follows_the_election(m: metrics.OperatorMetrics) -> None:
    assert value(scrape(m), "modelyard_operator_leader") == 0
    m.set_leader(True)
    assert value(scrape(m), "modelyard_operator_leader") == 1
    m.set_leader(False)
    assert value(scrape(m), "modelyard_operator_leader") == 0


def test_leader_gauge_can_ask_the_election_at_scrape_time(m: metrics.OperatorMetrics) -> None:
    election = {"leading": False}
    m.set_leader(lambda: election["leading"])
    m.set_models_provider(lambda: [("vision", "resnet", status_of("1", {}))])
    assert value(scrape(m), "modelyard_operator_leader") == 0
    election["leading"] = True  # won the Lease: no call needed
    found = scrape(m)
    assert value(found, "modelyard_operator_leader") == 1
    assert named(found, "modelyard_modeldeployment_ready")
    election["leading"] = False  # stepped down
    found = scrape(m)
    assert value(found, "modelyard_operator_leader") == 0
    assert not named(found, "modelyard_modeldeployment_ready")


def test_a_serving_model_reports_its_status(m: metrics.OperatorMetrics) -> None:
    first = status_of("1", {})
    status = status_of("1", {"1": serving("1", 3, gpus=3)}, replicas=3, previous=first)
    m.set_models_provider(lambda: [("vision", "resnet", status)])
    m.set_leader(True)
    found = scrape(m)
    key = {"namespace": "vision", "name": "resnet"}
    assert value(found, "modelyard_modeldeployment_ready", **key, reason="Serving") == 1
    assert value(found, "modelyard_modeldeployment_degraded", **key, reason="AsExpected") == 0
    assert value(found, "modelyard_modeldeployment_replicas", **key) == 3
    assert value(found, "modelyard_modeldeployment_ready_replicas", **key) == 3
    assert value(found, "modelyard_modeldeployment_gpus", **key) == 3
    assert value(found, "modelyard_modeldeployment_rollout_in_progress", **key,
                 strategy="") == 0  # an empty label: Prometheus stores none
    assert named(found, "modelyard_autoscaler_desired_replicas") == {}


def test_scrapes_follow_the_status_without_any_call(m: metrics.OperatorMetrics) -> None:
    statuses: dict[tuple[str, str], dict[str, Any]] = {}
    m.set_models_provider(lambda: [(*k, s) for k, s in statuses.items()])
    m.set_leader(True)
    assert named(scrape(m), "modelyard_modeldeployment_ready") == {}
    statuses[("a", "one")] = status_of("1", {})
    statuses[("b", "two")] = status_of("1", {"1": serving("1")})
    found = named(scrape(m), "modelyard_modeldeployment_ready")
    assert found == {
        frozenset({"namespace": "a", "name": "one", "reason": "NoReadyReplicas"}.items()): 0,
        frozenset({"namespace": "b", "name": "two", "reason": "Serving"}.items()): 1,
    }
    del statuses[("a", "one")]  # deleted: its series go with it, at once
    assert {dict(labels)["name"] for labels in
            named(scrape(m), "modelyard_modeldeployment_ready")} == {"two"}


def test_scaled_to_zero_is_not_ready_on_purpose(m: metrics.OperatorMetrics) -> None:
    zero = VersionState("1", "m-v1", desired=0)
    status = status_of("1", {"1": zero}, replicas=0)
    m.set_models_provider(lambda: [("vision", "resnet", status)])
    m.set_leader(True)
    found = scrape(m)
    assert named(found, "modelyard_modeldeployment_ready") == {
        frozenset({"namespace": "vision", "name": "resnet", "reason": "ScaledToZero"}.items()): 0}
    assert value(found, "modelyard_modeldeployment_replicas", namespace="vision",
                 name="resnet") == 0


def test_an_unschedulable_model_is_degraded_with_the_reason(m: metrics.OperatorMetrics) -> None:
    stuck = VersionState("1", "m-v1", desired=1, replicas=1,
                         unschedulable="0/3 nodes have enough nvidia.com/gpu")
    status = status_of("1", {"1": stuck}, replicas=1)
    m.set_models_provider(lambda: [("vision", "resnet", status)])
    m.set_leader(True)
    assert named(scrape(m), "modelyard_modeldeployment_degraded") == {
        frozenset({"namespace": "vision", "name": "resnet", "reason": "Unschedulable"}.items()):
            1}


def test_rollouts_in_progress_by_strategy(m: metrics.OperatorMetrics) -> None:
    stable = status_of("1", {"1": serving("1")}, previous=status_of("1", {}))
    rolling = status_of("2", {"1": serving("1"), "2": VersionState("2", "m-v2", 2, 1, 0, 1)},
                        previous=stable)
    canary = status_of("2", {"1": serving("1"), "2": serving("2", 1)}, previous=stable,
                       canary=api_status.CanaryStatus(version="2", weight=10, step=1,
                                               started_at="2026-11-25T12:00:00Z",
                                               step_started_at="2026-11-25T12:00:00Z"))
    first = status_of("1", {})  # the first version of a resource: no rollout
    m.set_models_provider(lambda: [("ns", "stable", stable), ("ns", "rolling", rolling),
                                   ("ns", "canary", canary), ("ns", "first", first)])
    m.set_leader(True)
    found = named(scrape(m), "modelyard_modeldeployment_rollout_in_progress")
    assert {(dict(k)["name"], dict(k).get("strategy", "")): v for k, v in found.items()} == {
        ("stable", ""): 0, ("rolling", "RollingUpdate"): 1, ("canary", "Canary"): 1,
        ("first", ""): 0}


def test_rollouts_are_counted_by_outcome_from_zero(m: metrics.OperatorMetrics) -> None:
    stable = status_of("1", {"1": serving("1")}, previous=status_of("1", {}))
    rolled_back = status_of("2", {"1": serving("1"), "2": serving("2", 1)}, previous=stable,
                            rolled_back=RollBack("error rate 0.2 above 0.01"))
    models = {("ns", "a"): stable, ("ns", "b"): rolled_back}
    m.set_models_provider(lambda: [(*k, s) for k, s in models.items()])
    m.set_leader(True)
    key = {"namespace": "ns", "name": "b"}
    # Both series exist at 0 before anything happens: increase() sees the first rollback.
    before = scrape(m)
    assert value(before, "modelyard_rollouts_total", **key, outcome="rolled_back") == 0
    assert value(before, "modelyard_rollouts_total", **key, outcome="promoted") == 0
    m.rollout_finished("ns", "a", "promoted")
    m.rollout_finished("ns", "b", "rolled_back")
    m.rollout_finished("ns", "b", "rolled_back")
    found = scrape(m)
    assert value(found, "modelyard_rollouts_total", **key, outcome="rolled_back") == 2
    assert value(found, "modelyard_rollouts_total", namespace="ns", name="a",
                 outcome="promoted") == 1
    assert value(found, "modelyard_modeldeployment_degraded", **key, reason="RolledBack") == 1
    del models[("ns", "b")]  # deleted, then created again: it starts over
    scrape(m)
    models[("ns", "b")] = rolled_back
    assert value(scrape(m), "modelyard_rollouts_total", **key, outcome="rolled_back") == 0
    with pytest.raises(ValueError, match="outcome"):
        m.rollout_finished("ns", "a", "failed")  # type: ignore[arg-type]


def test_autoscaler_desired_replicas(m: metrics.OperatorMetrics) -> None:
    scaled = api_status.AutoscalerStatus(desired_replicas=5, metric="concurrency")
    status = status_of("1", {"1": serving("1", 3)}, replicas=3, autoscaler=scaled)
    m.set_models_provider(lambda: [("vision", "resnet", status)])
    m.set_leader(True)
    assert value(scrape(m), "modelyard_autoscaler_desired_replicas", namespace="vision",
                 name="resnet") == 5


def test_only_the_leader_exports_the_models(m: metrics.OperatorMetrics) -> None:
    status = status_of("1", {"1": serving("1")})
    m.set_models_provider(lambda: [("vision", "resnet", status)])
    m.rollout_finished("vision", "resnet", "promoted")
    standby = scrape(m)
    assert value(standby, "modelyard_operator_leader") == 0
    assert not [n for n, _ in standby if n.startswith(("modelyard_modeldeployment",
                                                       "modelyard_rollouts"))]
    m.set_leader(True)
    assert value(scrape(m), "modelyard_modeldeployment_ready", namespace="vision",
                 name="resnet", reason="Serving") == 1


def test_a_failing_provider_leaves_the_operator_series(m: metrics.OperatorMetrics) -> None:
    def broken() -> Iterator[metrics.ModelStatus]:
        raise RuntimeError("dictionary changed size during iteration")
        yield  # pragma: no cover

    m.set_models_provider(broken)
    m.set_leader(True)
    m.observe_pass(0.01, ok=True)
    found = scrape(m)
    assert value(found, "modelyard_operator_reconcile_total", result="ok") == 1
    assert named(found, "modelyard_modeldeployment_ready") == {}


def test_the_http_endpoint_serves_the_registry() -> None:
    m = metrics.OperatorMetrics()
    server = m.start(0, "127.0.0.1")
    try:
        m.set_leader(True)
        m.observe_pass(0.05, ok=False)
        response = httpx.get(f"http://127.0.0.1:{server.port}/metrics", timeout=5)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        found = samples(response.text)
        assert value(found, "modelyard_operator_leader") == 1
        assert value(found, "modelyard_operator_reconcile_total", result="error") == 1
        assert value(found, "process_resident_memory_bytes")  # the process collector
    finally:
        server.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{server.port}/metrics", timeout=5)


def test_the_module_functions_act_on_the_process_metrics() -> None:
    before = value(scrape(metrics.METRICS), "modelyard_operator_reconcile_total", result="ok")
    try:
        metrics.observe_pass(0.01, ok=True)
        metrics.set_leader(True)
        metrics.set_models_provider(lambda: [("ns", "x", status_of("1", {}))])
        metrics.rollout_finished("ns", "x", "promoted")
        found = scrape(metrics.METRICS)
        assert value(found, "modelyard_operator_reconcile_total", result="ok") == \
            (before or 0) + 1
        assert value(found, "modelyard_operator_leader") == 1
        assert value(found, "modelyard_rollouts_total", namespace="ns", name="x",
                     outcome="promoted") == 1
    finally:
        metrics.set_leader(False)
        metrics.set_models_provider(lambda: ())

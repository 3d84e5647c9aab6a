"""The controller's plan stage, driven through whole rollouts against a simulated cluster.

No API server: :class:`Cluster` carries out each :class:`~.plan.Plan` (Deployments come up
ready one pass later, as pods would), and the next pass runs when the cluster changed (a
watch event) or when the plan asked for it (``recheck_after``), never on a resync timer.
A rollout that only a resync would move on stalls here and fails the test.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import pytest
from worlds import world_of

from modelyard.operator import api, api_status, plan, rollout
from modelyard.operator.analysis import Verdict
from modelyard.operator.world import ActivatorEndpoints, VersionState, World

T0 = dt.datetime(2026, 12, 5, 12, 0, tzinfo=dt.UTC)
EVENT_LAG_S = 1.0  # a changed child's watch event reaches the operator this much later


def model(version: str = "1", *, replicas: int = 4, rollout_: dict[str, Any] | None = None,
          **more: Any) -> dict[str, Any]:
    return {"model": {"version": version, "uri": f"s3://m/{version}"}, "replicas": replicas,
            "resources": {"gpu": {"count": 1}}, "rollout": rollout_ or {}, **more}


class Cluster:
    """Deployments by version; a Deployment's pods are ready one pass after it asks."""

    def __init__(self, spec: dict[str, Any]):
        self.spec = spec
        self.annotations: dict[str, str] = {}
        self.desired: dict[str, int] = {}
        self.ready: dict[str, int] = {}
        self.status = api_status.ModelDeploymentStatus()
        self.now = T0
        self.verdict: Verdict | None = None
        self.scale_request: api_status.AutoscalerStatus | None = None
        self.passes: list[plan.Plan] = []
        self.history: list[dict[str, int]] = []  # replicas per version after each pass

    def world(self) -> World:
        versions = {v: VersionState(v, f"m-v{v}", desired=n, replicas=n,
                                    ready=self.ready.get(v, 0), updated=n)
                    for v, n in self.desired.items()}
        live = {("Deployment", f"m-v{v}"): {"metadata": {"name": f"m-v{v}"}}
                for v in self.desired}
        live |= {("Service", f"m-v{v}"): {"metadata": {"name": f"m-v{v}"}}
                 for v in self.desired}
        return world_of(self.spec, versions, previous=self.status,
                        annotations=dict(self.annotations), live=live)

    def run_pass(self) -> plan.Plan:
        """One pass; then the cluster carries it out. Returns the plan."""
        world = self.world()
        request = rollout.analysis_request(world)
        verdict = self.verdict if request is not None else None
        todo = plan.plan(world, verdict, self.scale_request, self.now)
        before = (dict(self.desired), dict(self.ready))
        for version in list(self.desired):  # pods of the last pass's asks are ready now
            self.ready[version] = self.desired[version]
        for obj in todo.apply:
            if obj["kind"] == "Deployment":
                version = obj["metadata"]["labels"]["modelyard.dev/version"]
                self.desired[version] = obj["spec"]["replicas"]
                self.ready.setdefault(version, 0)
        for name, replicas in todo.scale.items():
            self.desired[name.removeprefix("m-v")] = replicas
        for gone in todo.retire:
            if gone.kind == "Deployment":
                version = gone.name.removeprefix("m-v")
                self.desired.pop(version, None)
                self.ready.pop(version, None)
        assert todo.status is not None
        self.status = todo.status
        self.passes.append(todo)
        self.history.append(dict(self.desired))
        self._changed = (dict(self.desired), dict(self.ready)) != before
        return todo

    def settle(self, *, until: dt.timedelta = dt.timedelta(hours=1), max_passes: int = 500
               ) -> None:
        """Pass after pass, each when a watch event or the plan's own recheck calls for it,
        until nothing is due. Fails if that takes longer than ``until``."""
        for _ in range(max_passes):
            todo = self.run_pass()
            waits = [t for t in (todo.recheck_after,
                                 EVENT_LAG_S if self._changed else None) if t is not None]
            if not waits:
                return
            self.now += dt.timedelta(seconds=min(waits))
            assert self.now - T0 <= until, f"still going after {until}: {self.history[-3:]}"
        raise AssertionError(f"no rest after {max_passes} passes: {self.history[-3:]}")

    def phases(self) -> list[tuple[str, str]]:
        return [(r.version, r.phase.value) for r in self.status.versions]

    def condition(self, kind: str) -> api_status.Condition:
        return next(c for c in self.status.conditions if c.type == kind)


def started(spec: dict[str, Any]) -> Cluster:
    cluster = Cluster(spec)
    cluster.settle()
    assert cluster.phases() == [("1", "Stable")]
    return cluster


def bump(cluster: Cluster, version: str = "2") -> None:
    cluster.spec = {**cluster.spec, "model": {"version": version, "uri": f"s3://m/{version}"}}
    cluster.now += dt.timedelta(seconds=1)


def test_a_canary_walks_its_pauses_on_its_own_timers() -> None:
    """The defect a shipped operator had: pauses waited for the 300 s resync."""
    cluster = started(model(rollout_={"strategy": "Canary", "steps": [
        {"weight": 25, "pauseSeconds": 10}, {"weight": 50, "pauseSeconds": 10}]}))
    begin = cluster.now
    bump(cluster)
    cluster.settle(until=dt.timedelta(minutes=5))
    took = (cluster.now - begin).total_seconds()
    assert cluster.phases() == [("2", "Stable"), ("1", "Superseded")]
    assert 20 <= took <= 40, took  # both pauses, plus the pods coming up and draining
    assert {"1": 3, "2": 1} in cluster.history
    assert {"1": 2, "2": 2} in cluster.history
    assert cluster.desired == {"2": 4}
    assert all(sum(r.values()) <= 5 for r in cluster.history)  # 4 + one replica of surge


def test_a_paused_step_waits_for_promote_and_asks_for_no_timer() -> None:
    cluster = started(model(rollout_={"strategy": "Canary", "steps": [{"weight": 50}]}))
    bump(cluster)
    cluster.settle()
    assert cluster.passes[-1].recheck_after is None  # nothing falls due: no timer
    assert cluster.status.canary is not None
    assert cluster.status.canary.paused
    assert cluster.status.canary.progress == "50% (step 1/1, paused)"
    cluster.annotations[api.PROMOTE_ANNOTATION] = "2"
    cluster.settle()
    assert cluster.phases() == [("2", "Stable"), ("1", "Superseded")]


def test_blue_green_auto_promotes_when_its_time_falls_due() -> None:
    cluster = started(model(replicas=2, rollout_={"strategy": "BlueGreen",
                                                  "autoPromoteSeconds": 30}))
    begin = cluster.now
    bump(cluster)
    cluster.settle()
    took = (cluster.now - begin).total_seconds()
    assert cluster.phases() == [("2", "Stable"), ("1", "Superseded")]
    assert 30 <= took <= 36, took
    switched = next(p for p in cluster.passes if any(
        o["kind"] == "Service" and o["metadata"]["name"] == "m"
        and o["spec"]["selector"].get("modelyard.dev/version") == "2" for o in p.apply))
    assert switched.status is not None


def test_a_failing_analysis_rolls_back_within_its_interval_not_at_the_pause_end() -> None:
    cluster = started(model(rollout_={
        "strategy": "Canary", "steps": [{"weight": 25, "pauseSeconds": 600}],
        "analysis": {"maxErrorRate": 0.01, "minRequests": 10}}))
    bump(cluster)
    for _ in range(6):  # the canary comes up and its step is reached
        cluster.run_pass()
        cluster.now += dt.timedelta(seconds=1)
    assert cluster.passes[-1].recheck_after == rollout.ANALYSIS_INTERVAL_S
    cluster.verdict = Verdict("fail", "error rate 0.5 above 0.01", 40, 0.5)
    cluster.now += dt.timedelta(seconds=rollout.ANALYSIS_INTERVAL_S)
    cluster.settle()
    assert cluster.phases()[0] == ("2", "RolledBack")
    assert cluster.status.versions[0].analysis is not None
    assert cluster.status.versions[0].analysis.error_rate == 0.5
    assert cluster.desired == {"1": 4, "2": 0}
    assert cluster.condition("Degraded").reason == "RolledBack"
    assert any(e.reason == "RolledBack" for p in cluster.passes for e in p.events)


def test_an_inconclusive_analysis_is_rechecked_until_its_deadline() -> None:
    cluster = started(model(rollout_={
        "strategy": "Canary", "steps": [{"weight": 25, "pauseSeconds": 10}],
        "analysis": {"minRequests": 100, "maxWaitSeconds": 30}}))
    begin = cluster.now
    bump(cluster)
    cluster.verdict = Verdict("wait", "3 of 100 requests needed to judge", 3)
    cluster.settle()
    took = (cluster.now - begin).total_seconds()
    assert cluster.phases()[0] == ("2", "RolledBack")
    assert "inconclusive after waiting 30 s" in (cluster.status.versions[0].reason or "")
    assert 40 <= took <= 50, took  # the pause, then the wait, then at most one interval


def test_abort_then_retry() -> None:
    cluster = started(model(rollout_={"strategy": "Canary",
                                      "steps": [{"weight": 50, "pauseSeconds": 60}]}))
    bump(cluster)
    for _ in range(10):  # until the step is reached
        cluster.run_pass()
        cluster.now += dt.timedelta(seconds=1)
        if cluster.desired == {"1": 2, "2": 2}:
            break
    assert cluster.desired == {"1": 2, "2": 2}
    cluster.annotations[api.ABORT_ANNOTATION] = "first"
    cluster.settle()
    assert cluster.phases()[0] == ("2", "RolledBack")
    assert cluster.desired == {"1": 4, "2": 0}
    assert cluster.status.handled_requests == api_status.HandledRequests(abort="first")
    again = len(cluster.passes)
    cluster.settle()  # stays rolled back: the abort is handled once
    assert cluster.phases()[0] == ("2", "RolledBack")
    assert len(cluster.passes) == again + 1
    cluster.annotations[api.RETRY_ANNOTATION] = "go"
    cluster.settle()
    assert cluster.phases()[0] == ("2", "Stable")
    assert ("1", "Superseded") in cluster.phases()
    assert cluster.status.handled_requests == api_status.HandledRequests(abort="first", retry="go")


def test_the_autoscalers_total_is_split_by_the_step_through_scale_only() -> None:
    spec = model(replicas=2, rollout_={"strategy": "Canary", "steps": [{"weight": 50}]},
                 autoscaling={"minReplicas": 2, "maxReplicas": 8, "target": 4})
    cluster = started(spec)
    bump(cluster)
    cluster.settle()
    assert cluster.desired == {"1": 1, "2": 1}
    cluster.scale_request = api_status.AutoscalerStatus(
        desired_replicas=4, metric="concurrency", reason="load 16 > 4 per replica",
        last_scale_time="2026-12-05T12:05:00Z")
    cluster.settle()
    assert cluster.desired == {"1": 2, "2": 2}
    grown = next(p for p in cluster.passes if p.scale.get("m-v2") == 2)
    [rendered] = [o for o in grown.apply if o["kind"] == "Deployment"]
    assert rendered["spec"]["replicas"] == 1  # the target grows through scale, not the render
    events = [e for p in cluster.passes for e in p.events if e.reason == "Scaled"]
    assert [e.message for e in events] == ["2 -> 4 replicas: load 16 > 4 per replica"]
    assert cluster.status.canary is not None  # the canary keeps its step


def test_an_invalid_spec_is_reported_and_nothing_is_touched() -> None:
    cluster = started(model())
    broken = dataclasses.replace(cluster.world(), spec=None,
                                 spec_error="spec.model.uri: Field required")
    todo = plan.plan(broken, None, None, T0)
    assert (todo.apply, todo.scale, todo.retire) == ((), {}, ())
    assert todo.status is not None
    degraded = next(c for c in todo.status.conditions if c.type == "Degraded")
    assert (degraded.reason, degraded.message) == ("InvalidSpec", "spec.model.uri: Field required")
    assert todo.status.versions == cluster.status.versions  # the ledger is kept


@pytest.mark.parametrize("strategy", [
    {"strategy": "Canary", "steps": [{"weight": 50}]}, {"strategy": "BlueGreen"},
    {"strategy": "RollingUpdate"}])
def test_at_rest_a_pass_plans_no_change_and_no_timer(strategy: dict[str, Any]) -> None:
    cluster = started(model(rollout_=strategy))
    bump(cluster)
    cluster.annotations[api.PROMOTE_ANNOTATION] = "2"
    cluster.settle()
    last = cluster.status
    todo = cluster.run_pass()
    assert (todo.scale, todo.retire, todo.recheck_after) == ({}, (), None)
    assert todo.status == last
    assert todo.events == ()


def test_a_model_at_zero_looks_again_for_an_activator_that_is_not_ready_yet() -> None:
    spec = model(replicas=1, autoscaling={"minReplicas": 0, "maxReplicas": 2, "target": 4})
    waiting = world_of(spec, {}, activator_configured=True)
    todo = plan.plan(waiting, None, None, T0)
    assert todo.recheck_after == plan.ACTIVATOR_RECHECK_S
    assert not any(o["kind"] == "EndpointSlice" for o in todo.apply)
    found = dataclasses.replace(waiting, activator=ActivatorEndpoints(("10.0.0.9",), 8080, 9090))
    todo = plan.plan(found, None, None, T0)
    assert todo.recheck_after == plan.AT_ZERO_RECHECK_S  # the activator may move meanwhile
    [endpoints] = [o for o in todo.apply if o["kind"] == "EndpointSlice"]
    assert [e["addresses"] for e in endpoints["endpoints"]] == [["10.0.0.9"]]

"""Status and version planning as pure functions of what the cluster shows."""

from __future__ import annotations

import datetime as dt
from typing import Any

from worlds import plain_step, world_of

from modelyard.operator import api, api_status
from modelyard.operator.rollout import plan_versions
from modelyard.operator.status import compute_status, status_payload
from modelyard.operator.world import VersionState
from modelyard.operator.world import observe_versions as observe

T0 = dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.UTC)


def spec(version: str = "2", replicas: int = 2) -> api.ModelDeploymentSpec:
    return api.parse_spec({"model": {"version": version, "uri": f"s3://m/{version}"},
                           "replicas": replicas})


def run(s: api.ModelDeploymentSpec, observed: dict[str, VersionState],
        previous: api_status.ModelDeploymentStatus | None = None, now: dt.datetime = T0,
        ) -> tuple[api_status.ModelDeploymentStatus, list[Any]]:
    world = world_of(s, observed, previous=previous, generation=4)
    return compute_status(world, plain_step(world, s.replicas), autoscaler=None, now=now)


def cond(status: api_status.ModelDeploymentStatus, kind: str) -> api_status.Condition:
    return next(c for c in status.conditions if c.type == kind)


def test_new_version_is_pending_until_available_then_stable() -> None:
    s = spec("1")
    status, events = run(s, {})
    assert [(v.version, v.phase) for v in status.versions] == [("1", "Pending")]
    assert cond(status, "Progressing").reason == "Creating"
    assert [e.reason for e in events] == ["RolloutStarted"]

    up = {"1": VersionState("1", "m-v1", desired=2, replicas=2, ready=2, updated=2)}
    status, events = run(s, up, previous=status, now=T0 + dt.timedelta(seconds=5))
    assert status.stable_version == "1"
    assert status.versions[0].phase == "Stable"
    assert cond(status, "Ready").status == "True"
    assert cond(status, "Progressing").reason == "Complete"
    assert {e.reason for e in events} == {"RolloutComplete", "Ready"}


def test_unchanged_world_gives_an_identical_status() -> None:
    s = spec("1")
    up = {"1": VersionState("1", "m-v1", desired=2, replicas=2, ready=2, updated=2)}
    first, _ = run(s, {})
    second, _ = run(s, up, previous=first)
    third, events = run(s, up, previous=second, now=T0 + dt.timedelta(hours=1))
    assert status_payload(third) == status_payload(second)
    assert events == []


def test_old_version_serves_until_the_new_one_is_available() -> None:
    s = spec("2")
    prev, _ = run(spec("1"), {"1": VersionState("1", "m-v1", 2, 2, 2, 2)})
    rolling = {"1": VersionState("1", "m-v1", 2, 2, 2, 2),
               "2": VersionState("2", "m-v2", 2, 1, 0, 1)}
    plan = plan_versions(s.model.version, rolling, s.replicas)
    assert plan.keep == {"1", "2"}
    assert not plan.retire
    status, _ = run(s, rolling, previous=prev)
    assert cond(status, "Ready").status == "True"  # version 1 still answers
    assert cond(status, "Progressing").reason == "RollingOut"
    assert [(v.version, v.phase) for v in status.versions] == [("2", "Pending"), ("1", "Stable")]

    done = {"1": VersionState("1", "m-v1", 2, 2, 2, 2),
            "2": VersionState("2", "m-v2", 2, 2, 2, 2)}
    assert plan_versions(s.model.version, done, s.replicas).retire == {"1"}
    status, _ = run(s, done, previous=status)
    assert [(v.version, v.phase) for v in status.versions] == [("2", "Stable"),
                                                               ("1", "Superseded")]
    assert status.versions[1].reason == "replaced by version 2"


def test_a_version_replaced_before_it_served_is_superseded() -> None:
    prev, _ = run(spec("2"), {})
    status, _ = run(spec("3"), {}, previous=prev)
    assert [(v.version, v.phase) for v in status.versions] == [("3", "Pending"),
                                                               ("2", "Superseded")]


def test_history_is_bounded() -> None:
    prev = api_status.ModelDeploymentStatus()
    for i in range(api.HISTORY_LIMIT + 5):
        prev, _ = run(spec(str(i)), {str(i): VersionState(str(i), f"m-{i}", 1, 1, 1, 1)},
                      previous=prev)
    assert len(prev.versions) == api.HISTORY_LIMIT
    assert prev.versions[0].version == str(api.HISTORY_LIMIT + 4)


def _pod(version: str, node: str | None, **status: Any) -> dict[str, Any]:
    return {"metadata": {"labels": {"modelyard.dev/version": version}},
            "spec": {"nodeName": node, "containers": [
                {"resources": {"limits": {"nvidia.com/gpu": "2"}}}]},
            "status": status}


def test_unschedulable_pods_degrade_with_the_schedulers_message() -> None:
    message = "0/4 nodes are available: 3 Insufficient nvidia.com/gpu."
    deployments = [{"metadata": {"name": "m-v1", "labels": {"modelyard.dev/version": "1"},
                                 "generation": 1},
                    "spec": {"replicas": 1}, "status": {"observedGeneration": 1}}]
    pods = [_pod("1", None, phase="Pending", conditions=[
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
         "message": message}])]
    observed = observe(deployments, pods)
    status, events = run(spec("1", 1), observed)
    degraded = cond(status, "Degraded")
    assert degraded.status == "True"
    assert degraded.reason == "Unschedulable"
    assert message in degraded.message
    assert any(e.type == "Warning" and e.reason == "Unschedulable" for e in events)
    assert status.gpus == 0  # nothing is scheduled, nothing is held


def test_gpus_count_scheduled_pods_only() -> None:
    deployments = [{"metadata": {"name": "m-v1", "labels": {"modelyard.dev/version": "1"}},
                    "spec": {"replicas": 2}, "status": {"replicas": 2}}]
    observed = observe(deployments, [_pod("1", "gpu-0"), _pod("1", None)])
    assert observed["1"].gpus == 2


def test_crash_looping_pods_degrade() -> None:
    deployments = [{"metadata": {"name": "m-v1", "labels": {"modelyard.dev/version": "1"}},
                    "spec": {"replicas": 1}, "status": {}}]
    pods = [_pod("1", "n", containerStatuses=[{"state": {"waiting": {
        "reason": "CrashLoopBackOff", "message": "back-off restarting"}}}])]
    status, _ = run(spec("1", 1), observe(deployments, pods))
    assert cond(status, "Degraded").reason == "CrashLoopBackOff"


def test_transition_time_moves_only_when_the_status_flips() -> None:
    s = spec("1")
    a, _ = run(s, {"1": VersionState("1", "m", 2, 2, 1, 2)})
    b, _ = run(s, {"1": VersionState("1", "m", 2, 2, 2, 2)}, previous=a,
               now=T0 + dt.timedelta(minutes=1))
    assert cond(a, "Ready").last_transition_time == cond(b, "Ready").last_transition_time
    flipped = cond(b, "Progressing").last_transition_time
    assert flipped != cond(a, "Progressing").last_transition_time


def test_history_shows_what_a_conversion_measured() -> None:
    from modelyard.operator.usercli import history_lines

    status = api_status.parse_status({"versions": [
        {"version": "3", "uri": "s3://m/3/model.pt2", "phase": "Failed",
         "deployedAt": "2026-12-06T10:02:00Z", "reason": "ConversionFailed",
         "conversion": {"job": "m-convert-c", "key": "c", "phase": "Failed",
                        "startedAt": "2026-12-06T10:02:00Z", "message": "dynamic batch"}},
        {"version": "2", "uri": "s3://m/2/model.pt2", "phase": "Stable",
         "deployedAt": "2026-12-06T10:01:00Z",
         "conversion": {"job": "m-convert-b", "key": "b", "phase": "Converted",
                        "startedAt": "2026-12-06T10:00:00Z", "speedup": 8.4,
                        "speedupBatch1": 1.46, "accuracyDelta": 0.0}},
        {"version": "1", "uri": "s3://m/1/model.pt2", "phase": "Superseded",
         "deployedAt": "2026-12-06T09:00:00Z"},
    ]})
    header, failed, converted, plain = history_lines(status)
    assert header.split() == ["VERSION", "PHASE", "DEPLOYED", "FINISHED", "CONVERSION",
                              "REASON"]
    assert failed.split()[:2] == ["3", "Failed"]
    assert failed.split()[-2:] == ["Failed", "ConversionFailed"]  # its conversion, its reason
    assert converted.split()[:2] == ["2", "Stable"]
    assert "aoti x8.40 b1:x1.46 delta:0" in converted
    assert plain.split() == ["1", "Superseded", "2026-12-06T09:00:00Z"]

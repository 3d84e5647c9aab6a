"""The canary step machine, driven through whole rollouts against a simulated cluster."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from modelyard.operator import api, rollout
from modelyard.operator.api_status import CanaryStatus
from modelyard.operator.world import VersionState

T0 = dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.UTC)


def spec(steps: list[dict[str, Any]], replicas: int = 4, gpus: int = 2,
         surge_gpus: int | None = None) -> api.ModelDeploymentSpec:
    return api.parse_spec({
        "model": {"version": "2", "uri": "s3://m/2"}, "replicas": replicas,
        "resources": {"gpu": {"count": gpus}},
        "rollout": {"strategy": "Canary", "steps": steps, "maxSurgeGPUs": surge_gpus},
    })


def simulate(s: api.ModelDeploymentSpec, *, action_at: int | None = None,
             max_passes: int = 200) -> tuple[list[dict[str, int]], int, rollout.CanaryDecision]:
    """Each pass: decide, then the 'cluster' makes the requested pods exist and be ready."""
    n = s.replicas
    stable = VersionState("1", "m-v1", desired=n, replicas=n, ready=n, updated=n)
    target: VersionState | None = None
    canary: CanaryStatus | None = None
    history: list[dict[str, int]] = []
    now = T0
    for i in range(max_passes):
        action = rollout.PROMOTE if action_at is not None and i >= action_at else None
        decision = rollout.step_canary(spec=s, total=n, stable=stable, target=target,
                                       current=canary, action=action, now=now)
        history.append(dict(decision.replicas))
        if decision.promoted:
            return history, i, decision
        canary = decision.canary
        want_t = decision.replicas["2"]
        want_s = decision.replicas["1"]
        # pods go away at once; new pods are ready by the next pass
        stable = VersionState("1", "m-v1", want_s, want_s, min(stable.ready, want_s), want_s)
        ready_t = min(target.desired, want_t) if target else 0
        target = VersionState("2", "m-v2", want_t, want_t, ready_t, want_t)
        now += dt.timedelta(seconds=1)
    raise AssertionError(f"not promoted after {max_passes} passes: {history[-3:]}")


@pytest.mark.parametrize("steps", [
    [{"weight": 25, "pauseSeconds": 3}, {"weight": 50, "pauseSeconds": 3}],
    [{"weight": 10, "pauseSeconds": 0}, {"weight": 100, "pauseSeconds": 2}],
    [{"weight": 75, "pauseSeconds": 1}],
])
@pytest.mark.parametrize("surge_gpus", [None, 2, 4])
def test_gpu_budget_and_capacity_hold_through_a_whole_canary(
        steps: list[dict[str, Any]], surge_gpus: int | None) -> None:
    s = spec(steps, replicas=4, gpus=2, surge_gpus=surge_gpus)
    surge = rollout.surge_replicas(s)
    history, _, final = simulate(s)
    for replicas in history:
        assert sum(replicas.values()) <= 4 + surge, history  # never over the GPU budget
    assert final.replicas == {"2": 4, "1": 0}
    assert max(sum(r.values()) for r in history) == 4 + surge  # the surge is used


def test_steps_hold_their_pause_then_advance() -> None:
    s = spec([{"weight": 25, "pauseSeconds": 5}, {"weight": 50, "pauseSeconds": 5}])
    history, passes, _ = simulate(s)
    at_25 = [r for r in history if r == {"1": 3, "2": 1}]
    at_50 = [r for r in history if r == {"1": 2, "2": 2}]
    assert len(at_25) >= 5  # held for its pause
    assert len(at_50) >= 5
    assert passes > 10


def test_a_step_without_pause_waits_for_promote() -> None:
    s = spec([{"weight": 50}])
    with pytest.raises(AssertionError, match="not promoted"):
        simulate(s, max_passes=60)
    history, passes, decision = simulate(s, action_at=30)
    assert decision.promoted
    assert passes >= 30
    assert history[29] == {"1": 2, "2": 2}  # holding at 50% until the promote


def test_split_is_at_least_one_canary_replica() -> None:
    assert rollout.split(4, 10) == (3, 1)
    assert rollout.split(4, 50) == (2, 2)
    assert rollout.split(4, 100) == (0, 4)
    assert rollout.split(4, 0) == (4, 0)
    assert rollout.split(1, 10) == (0, 1)


def test_one_replica_keeps_the_stable_version_beside_its_canary_when_the_budget_allows(
        ) -> None:
    """One replica at 50 %: the canary gets the surge room and the stable version keeps its
    replica, so the step is the split it says (and the canary is judged against stable)."""
    s = spec([{"weight": 50, "pauseSeconds": 3}], replicas=1, gpus=1)
    history, _, final = simulate(s)
    assert history.count({"1": 1, "2": 1}) >= 3, history  # held through its pause
    first_canary = next(i for i, r in enumerate(history) if r.get("2"))
    assert history[first_canary] == {"1": 1, "2": 1}, history  # never the canary alone
    assert all(sum(r.values()) <= 2 for r in history), history
    assert final.replicas == {"2": 1, "1": 0}


def test_surge_defaults_to_one_replica() -> None:
    assert rollout.surge_replicas(spec([{"weight": 10}], gpus=2)) == 1
    assert rollout.surge_replicas(spec([{"weight": 10}], gpus=2, surge_gpus=4)) == 2
    assert rollout.surge_replicas(spec([{"weight": 10}], gpus=0)) == 1


def _at_step(s: api.ModelDeploymentSpec, *, failure: tuple[str, str] | None = None,
             verdict: Any = None, held_s: int = 0) -> rollout.CanaryDecision:
    stable = VersionState("1", "m-v1", 2, 2, 2, 2)
    target = VersionState("2", "m-v2", 2, 2, 2, 2, pod_failure=failure)
    reached = T0 - dt.timedelta(seconds=held_s)
    stamp = reached.strftime("%Y-%m-%dT%H:%M:%SZ")
    current = CanaryStatus(version="2", weight=50, step=1, started_at=stamp,
                               step_started_at=stamp, reached_at=stamp)
    return rollout.step_canary(spec=s, total=4, stable=stable, target=target, current=current,
                               action=None, now=T0, verdict=verdict)


def test_a_crash_looping_canary_is_rolled_back() -> None:
    s = spec([{"weight": 50, "pauseSeconds": 60}])
    decision = _at_step(s, failure=("CrashLoopBackOff", "exit code 1"))
    assert decision.rolled_back is not None
    assert "CrashLoopBackOff" in decision.rolled_back.reason
    assert decision.replicas == {"1": 4, "2": 0}


def test_inconclusive_analysis_waits_then_rolls_back_at_its_deadline() -> None:
    from modelyard.operator.analysis import Verdict

    s = api.parse_spec({
        "model": {"version": "2", "uri": "s3://m/2"}, "replicas": 4,
        "rollout": {"strategy": "Canary", "steps": [{"weight": 50, "pauseSeconds": 10}],
                    "analysis": {"minRequests": 100, "maxWaitSeconds": 30}}})
    waiting = Verdict("wait", "3 of 100 requests needed to judge", 3)
    assert _at_step(s, verdict=waiting, held_s=20).rolled_back is None  # still waiting
    decision = _at_step(s, verdict=waiting, held_s=45)
    assert decision.rolled_back is not None
    assert "inconclusive after waiting 30 s" in decision.rolled_back.reason


def blue_green(replicas: int = 3, auto_promote: int | None = None,
               surge_gpus: int | None = None) -> api.ModelDeploymentSpec:
    return api.parse_spec({
        "model": {"version": "2", "uri": "s3://m/2"}, "replicas": replicas,
        "resources": {"gpu": {"count": 1}},
        "rollout": {"strategy": "BlueGreen", "autoPromoteSeconds": auto_promote,
                    "maxSurgeGPUs": surge_gpus},
    })


def run_blue_green(s: api.ModelDeploymentSpec, *, promote_at: int | None = None,
                   passes: int = 30) -> list[rollout.CanaryDecision]:
    n = s.replicas
    stable = VersionState("1", "m-v1", desired=n, replicas=n, ready=n, updated=n)
    target: VersionState | None = None
    current: CanaryStatus | None = None
    decisions = []
    for i in range(passes):
        action = rollout.PROMOTE if promote_at is not None and i >= promote_at else None
        decision = rollout.step_blue_green(spec=s, total=n, stable=stable, target=target,
                                           current=current, action=action,
                                           now=T0 + dt.timedelta(seconds=i))
        decisions.append(decision)
        if decision.promoted or decision.rolled_back:
            break
        current = decision.canary
        want = decision.replicas["2"]
        target = VersionState("2", "m-v2", want, want, min(target.desired, want) if target
                              else 0, want)
    return decisions


def test_blue_green_previews_a_full_copy_and_waits_for_a_manual_promote() -> None:
    decisions = run_blue_green(blue_green(replicas=3))
    last = decisions[-1]
    assert not last.promoted
    assert last.replicas == {"1": 3, "2": 3}  # stable keeps serving everything
    assert last.canary is not None
    assert last.canary.paused
    assert last.canary.strategy == "BlueGreen"
    assert all(d.replicas["1"] == 3 for d in decisions)


def test_blue_green_promotes_at_once_on_request_once_the_preview_is_ready() -> None:
    decisions = run_blue_green(blue_green(replicas=2), promote_at=0)
    assert decisions[0].promoted is False  # nothing ready yet: the switch must wait
    last = decisions[-1]
    assert last.promoted
    assert last.replicas == {"1": 0, "2": 2}


def test_blue_green_auto_promotes_after_the_preview_held_ready() -> None:
    decisions = run_blue_green(blue_green(replicas=2, auto_promote=5))
    promoted_at = next(i for i, d in enumerate(decisions) if d.promoted)
    ready_at = next(i for i, d in enumerate(decisions)
                    if d.canary is not None and d.canary.reached_at)
    assert promoted_at - ready_at >= 5


def test_blue_green_preview_respects_a_gpu_cap() -> None:
    decisions = run_blue_green(blue_green(replicas=4, surge_gpus=1))
    assert max(d.replicas["2"] + d.replicas["1"] for d in decisions) == 5


def test_blue_green_failing_preview_rolls_back() -> None:
    s = blue_green(replicas=2)
    stable = VersionState("1", "m-v1", desired=2, replicas=2, ready=2, updated=2)
    broken = VersionState("2", "m-v2", 2, 2, 0, 2, pod_failure=("CrashLoopBackOff", "boom"))
    decision = rollout.step_blue_green(spec=s, total=2, stable=stable, target=broken,
                                       current=None, action=None, now=T0)
    assert decision.rolled_back is not None
    assert decision.replicas == {"1": 2, "2": 0}
    assert "CrashLoopBackOff" in decision.message


def test_a_step_follows_a_growing_total_within_the_budget() -> None:
    """The autoscaler raises the total mid-step: both versions grow to their shares."""
    s = spec([{"weight": 50}], replicas=2, gpus=1)
    stable = VersionState("1", "m-v1", desired=1, replicas=1, ready=1, updated=1)
    target = VersionState("2", "m-v2", desired=1, replicas=1, ready=1, updated=1)
    current = CanaryStatus(version="2", weight=50, step=1, started_at="2026-11-25T12:00:00Z",
                               step_started_at="2026-11-25T12:00:00Z",
                               reached_at="2026-11-25T12:00:00Z")
    decision = rollout.step_canary(spec=s, total=4, stable=stable, target=target,
                                   current=current, action=None, now=T0)
    assert decision.replicas == {"1": 2, "2": 2}
    assert sum(decision.replicas.values()) <= 4 + rollout.surge_replicas(s)

"""The canary step machine: pure functions of (spec, canary status, observed versions, clock).

Called by :mod:`.reconcile` when ``spec.rollout.strategy`` is ``Canary`` and a new version
is being rolled out next to a stable one. Traffic is split by replica ratio behind the
stable Service (every ready pod of the model receives its share), so a step's weight
becomes a replica count for each version:

* ``canary = ceil(N * weight / 100)`` (at least one while the weight is above 0), and
  ``stable = N - canary``, where N is the replicas the model should have;
* **GPU budget**: the two versions together never request more than
  ``N + surge`` replicas' worth of GPUs, where ``surge`` is ``rollout.maxSurgeGPUs``
  divided by the GPUs of one replica (default: one replica). The canary grows only
  into room the stable version has already given up, and the stable version shrinks
  only as far as the canary's *ready* pods can take over, so serving capacity never
  drops below N ready replicas;
* a step is *reached* when both versions stand at their counts with every pod ready;
  it then holds ``pauseSeconds`` (or, with no ``pauseSeconds``, until a manual
  promote), and the next step starts;
* after the last step, or on promote, the canary takes all N replicas, the stable
  version drains to zero, and the canary becomes the stable version.

Imports no Kubernetes client.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping
from dataclasses import dataclass

from . import api
from .analysis import Verdict
from .status import VersionState

PROMOTE = "promote"


@dataclass(frozen=True)
class CanaryDecision:
    """What the canary wants now."""

    replicas: dict[str, int]  # version -> desired replicas
    canary: api.CanaryStatus | None  # None once promoted or rolled back
    promoted: bool
    message: str
    rolled_back: Verdict | None = None  # the failed analysis that rolled it back


def surge_replicas(spec: api.ModelDeploymentSpec) -> int:
    gpus = spec.resources.gpu.count if spec.resources.gpu else 0
    surge = spec.rollout.max_surge_gpus
    if surge is None or gpus == 0:
        return 1
    return surge // gpus


def split(total: int, weight: int) -> tuple[int, int]:
    """(stable, canary) replicas for ``weight`` percent of ``total``."""
    if weight <= 0:
        return total, 0
    canary = min(total, max(1, math.ceil(total * weight / 100)))
    return total - canary, canary


def step_canary(
    *,
    spec: api.ModelDeploymentSpec,
    total: int,
    stable: VersionState,
    target: VersionState | None,
    current: api.CanaryStatus | None,
    action: str | None,
    now: dt.datetime,
    verdict: Verdict | None = None,
) -> CanaryDecision:
    """The next move. ``verdict`` is the analysis of the current step's window (None
    without ``rollout.analysis``): a failure rolls back at once, and a step's pause
    completes only once the analysis passes."""
    version = spec.model.version
    steps = spec.rollout.steps
    stamp = _stamp(now)
    if current is None or current.version != version:
        current = api.CanaryStatus(version=version, weight=steps[0].weight, step=1,
                                   started_at=stamp, step_started_at=stamp)
    verdict = _failing_pods(target) or verdict  # a version that cannot even serve fails
    if verdict is not None and verdict.outcome == "fail":
        return CanaryDecision({stable.version: total, version: 0}, None, False,
                              f"version {version} rolled back: {verdict.reason}", verdict)
    promote = action == PROMOTE or current.step > len(steps)
    weight = 100 if promote else steps[current.step - 1].weight
    want_stable, want_canary = split(total, weight)

    have_stable = stable.desired
    have_canary = target.desired if target else 0
    ready_canary = target.ready if target else 0
    budget = total + surge_replicas(spec)
    # Grow the canary into the room the stable version left; shrink the stable version
    # only as far as ready canary pods take over its traffic.
    canary_replicas = min(want_canary, max(have_canary, budget - have_stable))
    # The stable version shrinks only as far as ready canary pods take over; it grows to its
    # share when the total grows (the autoscaler sets the total, the step splits it).
    stable_replicas = max(want_stable, min(have_stable, total - ready_canary))
    stable_replicas = min(stable_replicas, budget - canary_replicas)

    reached = (target is not None and target.up_to_date and canary_replicas == want_canary
               and ready_canary >= want_canary and stable_replicas == want_stable
               and stable.ready >= want_stable and stable.desired == want_stable)
    replicas = {stable.version: stable_replicas, version: canary_replicas}
    if promote:
        if reached:
            return CanaryDecision({version: total, stable.version: 0}, None, True,
                                  f"version {version} promoted")
        return CanaryDecision(replicas, current.model_copy(update={"weight": 100}), False,
                              f"promoting version {version}: {ready_canary}/{total} ready")
    step = steps[current.step - 1]
    if not reached:
        return CanaryDecision(replicas, current.model_copy(update={"weight": weight}), False,
                              f"step {current.step}/{len(steps)}: moving to {weight}% "
                              f"({ready_canary}/{want_canary} canary replicas ready)")
    reached_at = current.reached_at or stamp
    holding = current.model_copy(update={"weight": weight, "reached_at": reached_at})
    where = f"step {current.step}/{len(steps)}: {weight}% of traffic"
    held = _hold(spec, step.pause_seconds, now - _parse(reached_at), verdict=verdict,
                 holding=holding, where=where)
    if isinstance(held, Verdict):
        return CanaryDecision({stable.version: total, version: 0}, None, False,
                              f"version {version} rolled back: {held.reason}", held)
    if held is not None:
        return CanaryDecision(replicas, held[0], False, held[1])
    following = current.step + 1
    next_weight = 100 if following > len(steps) else steps[following - 1].weight
    return CanaryDecision(replicas, current.model_copy(update={
        "step": following, "weight": next_weight, "step_started_at": stamp, "reached_at": None,
    }), False, f"step {current.step}/{len(steps)} done")


def step_blue_green(
    *,
    spec: api.ModelDeploymentSpec,
    total: int,
    stable: VersionState,
    target: VersionState | None,
    current: api.CanaryStatus | None,
    action: str | None,
    now: dt.datetime,
    verdict: Verdict | None = None,
) -> CanaryDecision:
    """The next move of a blue-green rollout: the new version comes up beside the stable
    one with :func:`preview_replicas` replicas, reachable only through the preview
    Service; promotion (manual, or ``autoPromoteSeconds`` after the preview is fully
    ready with its analysis passed) points the stable Service at it in one step and
    drains the old version."""
    version = spec.model.version
    stamp = _stamp(now)
    if current is None or current.version != version:
        current = api.CanaryStatus(version=version, strategy="BlueGreen", weight=0, step=1,
                                   started_at=stamp, step_started_at=stamp)
    verdict = _failing_pods(target) or verdict
    if verdict is not None and verdict.outcome == "fail":
        return CanaryDecision({stable.version: total, version: 0}, None, False,
                              f"version {version} rolled back: {verdict.reason}", verdict)
    preview = preview_replicas(spec, total)
    ready = target.ready if target else 0
    reached = target is not None and target.up_to_date and target.desired == preview \
        and ready >= preview
    replicas = {stable.version: total, version: preview}
    if not reached:
        return CanaryDecision(replicas, current.model_copy(update={"progress": "preview"}),
                              False, f"preview of version {version}: {ready}/{preview} "
                                     f"replicas ready")
    if action == PROMOTE:
        return _switched(version, stable, total)
    reached_at = current.reached_at or stamp
    holding = current.model_copy(update={"reached_at": reached_at})
    where = f"preview of version {version} ready"
    held = _hold(spec, spec.rollout.auto_promote_seconds, now - _parse(reached_at),
                 verdict=verdict, holding=holding, where=where)
    if isinstance(held, Verdict):
        return CanaryDecision({stable.version: total, version: 0}, None, False,
                              f"version {version} rolled back: {held.reason}", held)
    if held is not None:
        return CanaryDecision(replicas, held[0], False, held[1])
    return _switched(version, stable, total)


def preview_replicas(spec: api.ModelDeploymentSpec, total: int) -> int:
    """Replicas of a blue-green preview: a full copy, unless ``maxSurgeGPUs`` caps it."""
    if spec.rollout.max_surge_gpus is None:
        return max(total, 1)
    return max(1, min(total, surge_replicas(spec)))


def _switched(version: str, stable: VersionState, total: int) -> CanaryDecision:
    return CanaryDecision({version: total, stable.version: 0}, None, True,
                          f"version {version} promoted: the stable Service now selects it")


def _failing_pods(target: VersionState | None) -> Verdict | None:
    if target is None or target.pod_failure is None:
        return None
    reason, message = target.pod_failure
    return Verdict("fail", f"its pods are failing ({reason}: {message})", 0)


def _hold(
    spec: api.ModelDeploymentSpec, pause_seconds: int | None, held_for: dt.timedelta, *,
    verdict: Verdict | None, holding: api.CanaryStatus, where: str,
) -> tuple[api.CanaryStatus, str] | Verdict | None:
    """Whether a reached step (or a ready preview) must still hold: ``(status, message)``
    to keep holding, a failed :class:`Verdict` when the analysis waited too long, or None
    when it may move on. No ``pause_seconds`` means hold until a manual promote."""
    held = held_for.total_seconds()
    if pause_seconds is None:
        return (holding.model_copy(update={"paused": True}),
                f"{where}; waiting for promote")
    if held < pause_seconds:
        return holding, f"{where}, {pause_seconds - held:.0f} s left"
    if verdict is not None and verdict.outcome == "wait":
        limit = spec.rollout.analysis.max_wait_seconds if spec.rollout.analysis else 0
        if held - pause_seconds > limit:
            return Verdict("fail", f"analysis inconclusive after waiting {limit} s "
                                   f"({verdict.reason})", verdict.requests)
        return holding, f"{where}; analysis: {verdict.reason}"
    return None


def stable_of(versions: Mapping[str, VersionState], stable: str | None,
              target: str) -> VersionState | None:
    if stable is None or stable == target:
        return None
    return versions.get(stable)


def _stamp(now: dt.datetime) -> str:
    return now.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse(stamp: str) -> dt.datetime:
    return dt.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)

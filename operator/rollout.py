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
    if target is not None and target.pod_failure is not None:  # it cannot even serve
        reason, message = target.pod_failure
        verdict = Verdict("fail", f"its pods are failing ({reason}: {message})", 0)
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
    stable_replicas = max(want_stable, total - ready_canary)
    stable_replicas = min(stable_replicas, have_stable, budget - canary_replicas)

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
    held = (now - _parse(reached_at)).total_seconds()
    if step.pause_seconds is None:
        return CanaryDecision(replicas, current.model_copy(
            update={"weight": weight, "reached_at": reached_at}), False,
            f"step {current.step}/{len(steps)}: {weight}% of traffic; waiting for promote")
    if held < step.pause_seconds:
        return CanaryDecision(replicas, current.model_copy(
            update={"weight": weight, "reached_at": reached_at}), False,
            f"step {current.step}/{len(steps)}: {weight}% of traffic, "
            f"{step.pause_seconds - held:.0f} s left")
    if verdict is not None and verdict.outcome == "wait":
        limit = spec.rollout.analysis.max_wait_seconds if spec.rollout.analysis else 0
        if held - step.pause_seconds > limit:
            failed = Verdict("fail", f"analysis inconclusive after waiting {limit} s "
                                     f"({verdict.reason})", verdict.requests)
            return CanaryDecision({stable.version: total, version: 0}, None, False,
                                  f"version {version} rolled back: {failed.reason}", failed)
        return CanaryDecision(replicas, current.model_copy(
            update={"weight": weight, "reached_at": reached_at}), False,
            f"step {current.step}/{len(steps)}: {weight}% of traffic; analysis: "
            f"{verdict.reason}")
    following = current.step + 1
    next_weight = 100 if following > len(steps) else steps[following - 1].weight
    return CanaryDecision(replicas, current.model_copy(update={
        "step": following, "weight": next_weight, "step_started_at": stamp, "reached_at": None,
    }), False, f"step {current.step}/{len(steps)} done")


def wanted_total(spec: api.ModelDeploymentSpec) -> int:
    if spec.autoscaling is not None:
        return max(spec.autoscaling.min_replicas, 1)
    return spec.replicas


def stable_of(versions: Mapping[str, VersionState], stable: str | None,
              target: str) -> VersionState | None:
    if stable is None or stable == target:
        return None
    return versions.get(stable)


def _stamp(now: dt.datetime) -> str:
    return now.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse(stamp: str) -> dt.datetime:
    return dt.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)

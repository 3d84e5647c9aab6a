"""Rollouts: which versions run, with how many replicas, and where traffic goes.

The one module that shapes a rollout (:class:`~.CanaryStatus` included). Pure
functions of (spec, observed versions, previous status, verdict, clock); called by
:mod:`.plan`:

* :func:`plan_rollout` handles the strategy and the manual controls (promote, abort,
  retry, a rollback that stays rolled back) and returns a :class:`Step`;
* :func:`step_canary` is the canary step machine, :func:`step_blue_green` the blue-green
  preview; each says when it next needs a pass (``recheck_after``: a pause ending, an
  analysis due), so nothing that falls due waits for the resync;
* :func:`route_weights` turns a step into HTTPRoute weights (Gateway API clusters);
* :func:`hold` keeps what runs while the target waits for its conversion.

Traffic is split by replica ratio behind the stable Service without a Gateway, so a
canary step's weight becomes a replica count for each version:

* ``canary = ceil(N * weight / 100)`` (at least one while the weight is above 0), and
  ``stable = N - canary``, where N is the replicas the model should have; when that leaves
  the stable version none below 100 % (one replica at 50 %), it keeps one in the surge
  room, so the canary never takes all the traffic before its last step;
* **GPU budget**: the two versions together never request more than ``N + surge``
  replicas' worth of GPUs, where ``surge`` is ``rollout.maxSurgeGPUs`` divided by the GPUs
  of one replica (default: one replica). The canary grows only into room the stable
  version has already given up, and the stable version shrinks only as far as the
  canary's *ready* pods can take over, so serving capacity never drops below N;
* a step is *reached* when both versions stand at their counts with every pod ready; it
  then holds ``pauseSeconds`` (or, with no ``pauseSeconds``, until a manual promote);
* after the last step, or on promote, the canary takes all N replicas, the stable version
  drains to zero, and the canary becomes the stable version.

Imports no Kubernetes client.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from . import api
from .analysis import Verdict
from .api_status import AnalysisFigures, CanaryStatus, HandledRequests, VersionPhase, VersionRecord
from .world import VersionState, World, parse_stamp, stamp

log = logging.getLogger(__name__)

PROMOTE = "promote"
ABORTED = "aborted by a user (modelyard.dev/abort)"
# While a canary with analysis runs, it is judged at least this often: a failing canary is
# rolled back within this, not at the end of its pause.
ANALYSIS_INTERVAL_S = 5.0
# After a step completes, the next pass sets the next step's replicas at once.
NEXT_STEP_S = 0.5


@dataclass(frozen=True)
class CanaryDecision:
    """What a canary (or blue-green preview) wants now."""

    replicas: dict[str, int]  # version -> desired replicas
    canary: CanaryStatus | None  # None once promoted or rolled back
    promoted: bool
    message: str
    rolled_back: Verdict | None = None  # the failed analysis that rolled it back
    recheck_after: float | None = None  # seconds until something falls due


@dataclass(frozen=True)
class RollBack:
    """Why the target version was rolled back, and what analysis measured."""

    reason: str
    figures: AnalysisFigures | None = None


@dataclass(frozen=True)
class VersionPlan:
    target: str
    keep: frozenset[str]  # versions whose Deployments should exist
    retire: frozenset[str]  # versions whose Deployments are to be deleted


@dataclass(frozen=True)
class Step:
    """This pass's rollout: the versions, their replicas, and what status says of it."""

    versions: VersionPlan
    replicas: Mapping[str, int]  # every kept version -> the replicas it should have
    canary: CanaryStatus | None = None  # a rollout in progress (progress filled in)
    message: str = ""  # the Progressing condition's message while a rollout runs
    promoted: bool = False
    rolled_back: RollBack | None = None
    handled: HandledRequests = field(default_factory=HandledRequests)
    active: str | None = None  # the one version the stable Service selects (None: all)
    preview: str | None = None  # the version the preview Service selects (blue-green)
    recheck_after: float | None = None


@dataclass(frozen=True)
class AnalysisRequest:
    """What to measure before planning: the canary's window (and stable's, to compare)."""

    target: str
    stable: str
    canary: CanaryStatus
    thresholds: api.Analysis


def analysis_request(world: World) -> AnalysisRequest | None:
    """The analysis this pass needs, if a canary or preview with analysis is running."""
    spec = world.spec
    if spec is None or spec.rollout.analysis is None \
            or spec.rollout.strategy == api.RolloutStrategy.ROLLING_UPDATE:
        return None
    target = spec.model.version
    stable = stable_of(world.versions, world.previous.stable_version, target)
    current = world.previous.canary
    if stable is None or current is None or current.version != target \
            or rolled_back_record(world.previous.versions, target) is not None:
        return None
    return AnalysisRequest(target, stable.version, current, spec.rollout.analysis)


def plan_rollout(world: World, verdict: Verdict | None, total: int,
                 now: dt.datetime) -> Step:
    """Which versions run with how many replicas, and where the stable Service points: a
    canary, a blue-green preview, or a plain replacement; and the manual controls."""
    spec = world.spec
    assert spec is not None
    target = spec.model.version
    previous = world.previous
    handled = previous.handled_requests or HandledRequests()
    abort = _new_request(world.annotations, api.ABORT_ANNOTATION, handled.abort)
    retry = _new_request(world.annotations, api.RETRY_ANNOTATION, handled.retry)
    handled = handled.model_copy(update={
        name: value for name, value in (("abort", abort), ("retry", retry)) if value})
    stable = stable_of(world.versions, previous.stable_version, target)
    strategy = spec.rollout.strategy
    if strategy == api.RolloutStrategy.ROLLING_UPDATE or stable is None:
        versions = plan_versions(target, world.versions, total)
        return Step(versions, {target: total}, handled=handled)
    blue_green = strategy == api.RolloutStrategy.BLUE_GREEN
    others = frozenset(v for v in world.versions if v not in (target, stable.version))
    both = VersionPlan(target, frozenset({target, stable.version}), others)

    def back_to_stable(why: RollBack) -> Step:
        return Step(both, {target: 0, stable.version: total}, rolled_back=why, handled=handled,
                    active=stable.version if blue_green else None)

    done = rolled_back_record(previous.versions, target)
    if done is not None and not retry:  # stays rolled back until a new version or a retry
        return back_to_stable(RollBack(done.reason or "rolled back", done.analysis))
    if abort:
        log.warning("rollout of version %s aborted by a user", target)
        return back_to_stable(RollBack(ABORTED))
    current = previous.canary if previous.canary and previous.canary.version == target \
        and done is None else None
    # Promote on request; and going back to a version that already served (a rollback to a
    # recorded version) needs no canary steps, as Argo Rollouts' rollback window.
    served_before = any(r.version == target and r.promoted_at for r in previous.versions)
    asked = world.annotations.get(api.PROMOTE_ANNOTATION) == target
    step_rollout = step_blue_green if blue_green else step_canary
    decision = step_rollout(
        spec=spec, total=total, stable=stable, target=world.versions.get(target),
        current=current, action=PROMOTE if asked or served_before else None, now=now,
        verdict=verdict if current else None)
    if decision.rolled_back is not None:
        log.warning("%s", decision.message)
        return back_to_stable(RollBack(decision.rolled_back.reason,
                                       decision.rolled_back.figures()))
    if decision.promoted:
        return Step(VersionPlan(target, frozenset({target}), others | {stable.version}),
                    {target: decision.replicas[target]}, promoted=True,
                    message=decision.message, handled=handled,
                    active=target if blue_green else None)
    canary = _with_progress(decision.canary, len(spec.rollout.steps))
    recheck = decision.recheck_after
    if spec.rollout.analysis is not None and canary is not None:
        recheck = min(recheck if recheck is not None else ANALYSIS_INTERVAL_S,
                      ANALYSIS_INTERVAL_S)
    return Step(both, decision.replicas, canary=canary, message=decision.message,
                handled=handled, active=stable.version if blue_green else None,
                preview=target if blue_green else None, recheck_after=recheck)


def hold(world: World, total: int) -> Step:
    """The target may not start yet (its conversion runs or failed, see
    :mod:`.conversion`): whatever runs keeps running, the stable version at all
    ``total`` replicas, and nothing is retired."""
    spec = world.spec
    assert spec is not None
    target = spec.model.version
    stable = stable_of(world.versions, world.previous.stable_version, target)
    blue_green = spec.rollout.strategy == api.RolloutStrategy.BLUE_GREEN
    return Step(VersionPlan(target, frozenset(world.versions), frozenset()),
                {stable.version: total} if stable is not None else {},
                handled=world.previous.handled_requests or HandledRequests(),
                active=stable.version if blue_green and stable is not None else None)


def plan_versions(target: str, observed: Mapping[str, VersionState],
                  wanted: int) -> VersionPlan:
    """A plain replacement: the target always runs; older versions run until it is fully
    available (or, asked to run at zero, until it stands at zero)."""
    others = frozenset(v for v in observed if v != target)
    state = observed.get(target)
    if state is not None and (state.available or (wanted == 0 and state.up_to_date)):
        return VersionPlan(target, frozenset({target}), others)
    return VersionPlan(target, frozenset({target}) | others, frozenset())


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
    current: CanaryStatus | None,
    action: str | None,
    now: dt.datetime,
    verdict: Verdict | None = None,
) -> CanaryDecision:
    """The next move. ``verdict`` is the analysis of the current step's window (None
    without ``rollout.analysis``): a failure rolls back at once, and a step's pause
    completes only once the analysis passes."""
    version = spec.model.version
    steps = spec.rollout.steps
    at = stamp(now)
    if current is None or current.version != version:
        current = CanaryStatus(version=version, weight=steps[0].weight, step=1,
                                   started_at=at, step_started_at=at)
    verdict = _failing_pods(target) or verdict  # a version that cannot even serve fails
    if verdict is not None and verdict.outcome == "fail":
        return _rolled_back(version, stable, total, verdict)
    promote = action == PROMOTE or current.step > len(steps)
    weight = 100 if promote else steps[current.step - 1].weight
    want_stable, want_canary = split(total, weight)
    budget = total + surge_replicas(spec)
    if want_stable == 0 and 0 < weight < 100 and want_canary < budget:
        # Too few replicas to split (one, at 50%): the stable version keeps one beside the
        # canary, in the surge room, so the step is the split it says and the canary is
        # judged against the stable version, not handed all the traffic.
        want_stable = 1

    have_stable = stable.desired
    have_canary = target.desired if target else 0
    ready_canary = target.ready if target else 0
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
    holding = current.model_copy(update={"weight": weight,
                                         "reached_at": current.reached_at or at})
    held = _hold(spec, step.pause_seconds, now, verdict=verdict, holding=holding,
                 where=f"step {current.step}/{len(steps)}: {weight}% of traffic")
    if isinstance(held, Verdict):
        return _rolled_back(version, stable, total, held)
    if held is not None:
        status, message, recheck = held
        return CanaryDecision(replicas, status, False, message, recheck_after=recheck)
    following = current.step + 1
    next_weight = 100 if following > len(steps) else steps[following - 1].weight
    return CanaryDecision(replicas, current.model_copy(update={
        "step": following, "weight": next_weight, "step_started_at": at, "reached_at": None,
    }), False, f"step {current.step}/{len(steps)} done", recheck_after=NEXT_STEP_S)


def step_blue_green(
    *,
    spec: api.ModelDeploymentSpec,
    total: int,
    stable: VersionState,
    target: VersionState | None,
    current: CanaryStatus | None,
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
    at = stamp(now)
    if current is None or current.version != version:
        current = CanaryStatus(version=version, strategy="BlueGreen", weight=0, step=1,
                                   started_at=at, step_started_at=at)
    verdict = _failing_pods(target) or verdict
    if verdict is not None and verdict.outcome == "fail":
        return _rolled_back(version, stable, total, verdict)
    preview = preview_replicas(spec, total)
    ready = target.ready if target else 0
    reached = target is not None and target.up_to_date and target.desired == preview \
        and ready >= preview
    replicas = {stable.version: total, version: preview}
    if not reached:
        return CanaryDecision(replicas, current, False,
                              f"preview of version {version}: {ready}/{preview} replicas ready")
    if action == PROMOTE:
        return _switched(version, stable, total)
    holding = current.model_copy(update={"reached_at": current.reached_at or at})
    held = _hold(spec, spec.rollout.auto_promote_seconds, now, verdict=verdict,
                 holding=holding, where=f"preview of version {version} ready")
    if isinstance(held, Verdict):
        return _rolled_back(version, stable, total, held)
    if held is not None:
        status, message, recheck = held
        return CanaryDecision(replicas, status, False, message, recheck_after=recheck)
    return _switched(version, stable, total)


def preview_replicas(spec: api.ModelDeploymentSpec, total: int) -> int:
    """Replicas of a blue-green preview: a full copy, unless ``maxSurgeGPUs`` caps it."""
    if spec.rollout.max_surge_gpus is None:
        return max(total, 1)
    return max(1, min(total, surge_replicas(spec)))


def route_weights(step: Step, versions: Mapping[str, VersionState]) -> dict[str, int]:
    """HTTPRoute backend weights (percent) for the versions that stay.

    A canary gets its step's weight once the step is reached; while its pods come up it
    gets no more than its share of ready replicas. Blue-green and a rollback send
    everything to the active version; otherwise traffic follows ready replicas."""
    target, keep = step.versions.target, step.versions.keep
    ready = {v: versions[v].ready if v in versions else 0 for v in keep}
    if step.active is not None:
        return {v: 100 if v == step.active else 0 for v in keep}
    canary = step.canary
    if canary is not None and canary.strategy == "Canary" and len(keep) == 2:
        [stable] = [v for v in keep if v != target]
        share = 100 * ready[target] // max(1, ready[target] + ready[stable])
        weight = canary.weight if canary.reached_at else min(canary.weight, share)
        return {target: weight, stable: 100 - weight}
    if step.rolled_back is not None:
        return {v: 0 if v == target else 100 for v in keep}
    total = sum(ready.values())
    if total == 0:
        return {v: 100 if v == target else 0 for v in keep}
    weights = {v: 100 * n // total for v, n in ready.items()}
    weights[max(ready, key=lambda v: ready[v])] += 100 - sum(weights.values())
    return weights


def stable_of(versions: Mapping[str, VersionState], stable: str | None,
              target: str) -> VersionState | None:
    if stable is None or stable == target:
        return None
    return versions.get(stable)


def rolled_back_record(versions: list[VersionRecord], target: str) -> VersionRecord | None:
    """The target's ledger entry, if its latest rollout ended in a rollback."""
    if versions and versions[0].version == target \
            and versions[0].phase == VersionPhase.ROLLED_BACK:
        return versions[0]
    return None


def _rolled_back(version: str, stable: VersionState, total: int,
                 verdict: Verdict) -> CanaryDecision:
    return CanaryDecision({stable.version: total, version: 0}, None, False,
                          f"version {version} rolled back: {verdict.reason}", verdict)


def _switched(version: str, stable: VersionState, total: int) -> CanaryDecision:
    return CanaryDecision({version: total, stable.version: 0}, None, True,
                          f"version {version} promoted: the stable Service now selects it")


def _failing_pods(target: VersionState | None) -> Verdict | None:
    if target is None or target.pod_failure is None:
        return None
    reason, message = target.pod_failure
    return Verdict("fail", f"its pods are failing ({reason}: {message})", 0)


def _hold(
    spec: api.ModelDeploymentSpec, pause_seconds: int | None, now: dt.datetime, *,
    verdict: Verdict | None, holding: CanaryStatus, where: str,
) -> tuple[CanaryStatus, str, float | None] | Verdict | None:
    """Whether a reached step (or a ready preview) must still hold: ``(status, message,
    seconds until it falls due)`` to keep holding, a failed :class:`Verdict` when the
    analysis waited too long, or None when it may move on. No ``pause_seconds`` means
    hold until a manual promote."""
    assert holding.reached_at is not None
    reached = parse_stamp(holding.reached_at)
    held = (now - reached).total_seconds()
    if pause_seconds is None:
        return holding.model_copy(update={"paused": True}), f"{where}; waiting for promote", None
    if held < pause_seconds:
        until = reached + dt.timedelta(seconds=pause_seconds)
        return holding, f"{where}, holding until {stamp(until)}", pause_seconds - held
    if verdict is not None and verdict.outcome == "wait":
        limit = spec.rollout.analysis.max_wait_seconds if spec.rollout.analysis else 0
        if held - pause_seconds > limit:
            return Verdict("fail", f"analysis inconclusive after waiting {limit} s "
                                   f"({verdict.reason})", verdict.requests)
        deadline = pause_seconds + limit - held
        return holding, f"{where}; analysis: {verdict.reason}", \
            max(0.5, min(ANALYSIS_INTERVAL_S, deadline + 0.5))
    return None


def _with_progress(canary: CanaryStatus | None, steps: int) -> CanaryStatus | None:
    if canary is None:
        return None
    if canary.strategy == "BlueGreen":
        return canary.model_copy(update={"progress": "preview (paused)" if canary.paused
                                         else "preview"})
    where = "promoting" if canary.step > steps else f"step {canary.step}/{steps}"
    paused = ", paused" if canary.paused else ""
    return canary.model_copy(update={"progress": f"{canary.weight}% ({where}{paused})"})


def _new_request(annotations: Mapping[str, str], name: str, handled: str | None) -> str | None:
    """The value of control annotation ``name`` when it asks for something not yet done."""
    value = annotations.get(name)
    return value if value and value != handled else None

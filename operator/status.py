"""Report's content: a ModelDeployment's status and the Events worth posting.

Pure: :func:`compute_status` derives conditions, counts and the version ledger from this
pass's :class:`~.world.World` and its rollout :class:`~.rollout.Step`. It is called once
per pass, by :mod:`.plan`. Condition timestamps only move when a condition's status
flips, so an unchanged world yields an identical status (and no write).

Imports no Kubernetes client.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from . import api, render
from .api_status import (
    AutoscalerStatus,
    Condition,
    ConditionStatus,
    ModelDeploymentStatus,
    VersionPhase,
    VersionRecord,
)
from .conversion import ConversionStep
from .rollout import RollBack, Step
from .world import VersionState, World, stamp

READY, PROGRESSING, DEGRADED = "Ready", "Progressing", "Degraded"
CONVERTED = "Converted"  # only with spec.model.convert


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


def compute_status(world: World, step: Step, *, autoscaler: AutoscalerStatus | None,
                   now: dt.datetime, conversion: ConversionStep | None = None,
                   ) -> tuple[ModelDeploymentStatus, list[Event]]:
    """The status for this pass. With a rollout in progress (``step.canary``) the target
    version stays in phase Canary until ``step.promoted``. ``conversion``: where the
    target's conversion stands (spec.model.convert), recorded in its ledger entry."""
    spec, previous, observed, plan = world.spec, world.previous, world.versions, step.versions
    assert spec is not None
    at = stamp(now)
    rolled_back, canary = step.rolled_back, step.canary
    target = plan.target
    target_state = observed.get(target)
    serving = [s for s in observed.values() if s.ready > 0 and s.version not in plan.retire]
    live = [s for s in observed.values() if s.version not in plan.retire]
    events: list[Event] = []

    conv = conversion if conversion is not None and conversion.phase is not None else None
    versions = _versions(previous.versions, spec, step, target_state=target_state,
                         conv=conv, at=at, events=events)
    stable = next((r.version for r in versions if r.phase == VersionPhase.STABLE), None)

    ready_count = sum(s.ready for s in serving)
    if ready_count > 0:
        served = ", ".join(f"{s.ready} of version {s.version}" for s in
                           sorted(serving, key=lambda s: s.version != target))
        ready = (ConditionStatus.TRUE, "Serving", f"{ready_count} ready replicas ({served})")
    elif target_state is not None and target_state.desired == 0 and target_state.up_to_date:
        ready = (ConditionStatus.FALSE, "ScaledToZero", "0 replicas requested")
    else:
        ready = (ConditionStatus.FALSE, "NoReadyReplicas",
                 f"no replica of version {target} is ready yet")

    if rolled_back is not None:
        progressing = (ConditionStatus.FALSE, "RolledBack",
                       f"version {target} was rolled back: {rolled_back.reason}")
    elif conv is not None and conv.blocks:
        progressing = _converting(conv, target)[0]
    elif canary is not None:
        progressing = (ConditionStatus.TRUE, "Canary", step.message)
    elif target_state is None:
        progressing = (ConditionStatus.TRUE, "Creating", f"creating version {target}")
    elif not target_state.available and target_state.desired > 0:
        progressing = (ConditionStatus.TRUE, "RollingOut",
                       f"{target_state.ready}/{target_state.desired} replicas of version "
                       f"{target} ready")
    elif plan.retire:
        progressing = (ConditionStatus.TRUE, "RetiringOldVersions",
                       f"version {target} is available; removing "
                       f"{', '.join(sorted(plan.retire))}")
    else:
        progressing = (ConditionStatus.FALSE, "Complete", f"version {target} is rolled out")

    problem = _problem(live, target)
    if rolled_back is not None:
        problem = (ConditionStatus.TRUE, "RolledBack",
                   f"version {target} was rolled back: {rolled_back.reason}; "
                   "change spec.model.version, or ask for a retry (modelyard retry NAME), "
                   "to roll out again")
    if conv is not None and conv.phase == "Failed":
        problem = _converting(conv, target)[1]
    degraded = problem or (ConditionStatus.FALSE, "AsExpected", "")

    conditions = [
        _condition(previous.conditions, READY, ready, generation=world.generation, stamp=at),
        _condition(previous.conditions, PROGRESSING, progressing,
                   generation=world.generation, stamp=at),
        _condition(previous.conditions, DEGRADED, degraded, generation=world.generation, stamp=at),
    ]
    if conv is not None:
        conditions.append(_condition(previous.conditions, CONVERTED, _converting(conv, target)[2],
                                     generation=world.generation, stamp=at))
    events += _transition_events(previous.conditions, conditions)

    status = ModelDeploymentStatus(
        observed_generation=world.generation,
        conditions=conditions,
        url=render.service_url(world.owner),
        stable_version=stable,
        target_version=target,
        canary=canary,
        replicas=sum(s.replicas for s in observed.values()),
        ready_replicas=ready_count,
        selector=render.selector_string(world.owner.name),
        gpus=sum(s.gpus for s in observed.values()),
        versions=versions[: api.HISTORY_LIMIT],
        handled_requests=step.handled if step.handled.abort or step.handled.retry else None,
        traffic_split="gateway" if world.gateway else "replicas",
        autoscaler=autoscaler,
    )
    return status, events


def status_payload(status: ModelDeploymentStatus) -> dict[str, Any]:
    """The JSON the status subresource gets (and what a live status is compared to)."""
    return status.model_dump(by_alias=True, exclude_none=True, mode="json")


# ---------------------------------------------------------------------- internals


def _versions(previous: Sequence[VersionRecord], spec: api.ModelDeploymentSpec, step: Step, *,
              target_state: VersionState | None, conv: ConversionStep | None, at: str,
              events: list[Event]) -> list[VersionRecord]:
    """The ledger after this pass."""
    target = step.versions.target
    if step.rolled_back is not None:
        return _roll_back(previous, target, step.rolled_back, at, events)
    if conv is not None and conv.phase == "Failed":
        return _conversion_failed(previous, spec, conv, at)
    versions = _ledger(previous, spec=spec, target=target, target_state=target_state,
                       stamp=at, events=events, canary=step.canary is not None,
                       promoted=step.promoted)
    if conv is not None:
        _record_conversion(versions, target, conv, events)
    return versions


def _ledger(
    previous: Sequence[VersionRecord],
    *,
    spec: api.ModelDeploymentSpec,
    target: str,
    target_state: VersionState | None,
    stamp: str,
    events: list[Event],
    canary: bool,
    promoted: bool,
) -> list[VersionRecord]:
    records = [r.model_copy() for r in previous]
    open_phases = {VersionPhase.PENDING, VersionPhase.CANARY, VersionPhase.STABLE}
    current = next((r for r in records if r.version == target and r.phase in open_phases), None)
    if current is None:
        was = next((r.version for r in records if r.phase == VersionPhase.STABLE), None)
        current = VersionRecord(
            version=target, uri=spec.model.uri, sha256=spec.model.sha256,
            phase=VersionPhase.PENDING, deployed_at=stamp,
        )
        records.insert(0, current)
        replacing = f" (replacing {was})" if was else ""
        events.append(Event("Normal", "RolloutStarted", f"rolling out version {target}{replacing}"))
    # A version that was asked for, then replaced before it ever served, is superseded.
    for record in records:
        if record is not current and record.phase in (VersionPhase.PENDING,
                                                      VersionPhase.CANARY):
            was_canary = record.phase == VersionPhase.CANARY
            record.phase = VersionPhase.SUPERSEDED
            record.finished_at = stamp
            record.reason = (f"replaced by version {target} during its canary" if was_canary
                             else f"replaced by version {target} before it became available")
    if canary and not promoted:
        if current.phase == VersionPhase.PENDING:
            current.phase = VersionPhase.CANARY
            current.reason = "canary in progress"
        return records
    done = promoted or (target_state is not None and target_state.available)
    if done and current.phase != VersionPhase.STABLE:
        current.phase = VersionPhase.STABLE
        current.promoted_at = stamp
        ready = target_state.ready if target_state else 0
        current.reason = "promoted after its canary" if promoted else f"all {ready} replicas ready"
        events.append(Event("Normal", "RolloutComplete",
                            f"version {target} is serving with {ready} replicas"))
    if current.phase == VersionPhase.STABLE:
        for record in records:
            if record is not current and record.phase == VersionPhase.STABLE:
                record.phase = VersionPhase.SUPERSEDED
                record.finished_at = stamp
                record.reason = f"replaced by version {target}"
    return records


Verdict = tuple[ConditionStatus, str, str]


def _converting(conv: ConversionStep, target: str) -> tuple[Verdict, Verdict, Verdict]:
    """The Progressing, Degraded and Converted conditions while a conversion matters."""
    if conv.phase == "Failed":
        return ((ConditionStatus.FALSE, "ConversionFailed",
                 f"version {target} was not rolled out: {conv.message}"),
                (ConditionStatus.TRUE, "ConversionFailed",
                 f"the conversion of version {target} failed: {conv.message}; change "
                 "spec.model.version or spec.model.convert, or ask for a retry "
                 "(modelyard retry NAME)"),
                (ConditionStatus.FALSE, "ConversionFailed", conv.message))
    converted = conv.phase == "Converted"
    return ((ConditionStatus.TRUE, "Converting", conv.message),
            (ConditionStatus.FALSE, "AsExpected", ""),
            (ConditionStatus.TRUE if converted else ConditionStatus.FALSE,
             "Converted" if converted else "Converting", conv.message))


def _record_conversion(records: list[VersionRecord], target: str, conv: ConversionStep,
                       events: list[Event]) -> None:
    """The target's open ledger entry records its conversion (the Job, then the package)."""
    current = next((r for r in records if r.version == target and r.phase in (
        VersionPhase.PENDING, VersionPhase.CANARY, VersionPhase.STABLE)), None)
    record = conv.record
    if current is None or record is None or current.conversion == record:
        return
    before = current.conversion
    if before is None or before.job != record.job:
        events.append(Event("Normal", "Converting",
                            f"converting version {target} (Job {record.job})"))
    if record.phase == "Converted" and (before is None or before.phase != "Converted"):
        events.append(Event("Normal", "Converted", f"version {target} {conv.message}"))
    current.conversion = record


def _conversion_failed(previous: Sequence[VersionRecord], spec: api.ModelDeploymentSpec,
                       conv: ConversionStep, stamp: str) -> list[VersionRecord]:
    """The target's entry records the failed conversion; a version already serving (its
    source, before convert was asked for) keeps its phase, any other is Failed."""
    records = [r.model_copy() for r in previous]
    target, record = spec.model.version, conv.record
    assert record is not None
    current = records[0] if records and records[0].version == target else None
    if current is not None and current.conversion is not None \
            and current.conversion.job == record.job and current.conversion.phase == "Failed":
        return records  # already recorded
    if current is None or current.phase not in (VersionPhase.PENDING, VersionPhase.CANARY,
                                                VersionPhase.STABLE):
        current = VersionRecord(version=target, uri=spec.model.uri, sha256=spec.model.sha256,
                                phase=VersionPhase.PENDING, deployed_at=stamp)
        records.insert(0, current)
    if current.phase != VersionPhase.STABLE:
        current.phase = VersionPhase.FAILED
        current.finished_at = stamp
        current.reason = f"conversion failed: {conv.message}"
    current.conversion = record  # the Degraded condition's Event says it
    return records


def _roll_back(previous: Sequence[VersionRecord], target: str, why: RollBack, stamp: str,
               events: list[Event]) -> list[VersionRecord]:
    records = [r.model_copy() for r in previous]
    current = records[0] if records and records[0].version == target else None
    if current is None or current.phase == VersionPhase.ROLLED_BACK:
        return records  # already recorded
    current.phase = VersionPhase.ROLLED_BACK
    current.finished_at = stamp
    current.reason = why.reason
    current.analysis = why.figures
    events.append(Event("Warning", "RolledBack", f"version {target} rolled back: {why.reason}"))
    return records


def _problem(
    live: Sequence[VersionState], target: str
) -> tuple[ConditionStatus, str, str] | None:
    ordered = sorted(live, key=lambda s: s.version != target)
    for state in ordered:
        if state.unschedulable:
            return (ConditionStatus.TRUE, "Unschedulable",
                    f"version {state.version}: {state.unschedulable}")
    for state in ordered:
        if state.pod_failure:
            reason, message = state.pod_failure
            return (ConditionStatus.TRUE, reason, f"version {state.version}: {message}")
    return None


def _condition(
    previous: Sequence[Condition], kind: str, verdict: tuple[ConditionStatus, str, str],
    *, generation: int, stamp: str,
) -> Condition:
    status, reason, message = verdict
    old = next((c for c in previous if c.type == kind), None)
    since = old.last_transition_time if old is not None and old.status == status else stamp
    return Condition(type=kind, status=status, reason=reason, message=message,
                         last_transition_time=since, observed_generation=generation)


def _transition_events(
    previous: Sequence[Condition], current: Sequence[Condition]
) -> list[Event]:
    before = {c.type: c for c in previous}
    events = []
    for cond in current:
        old = before.get(cond.type)
        changed = old is None or (old.status, old.reason) != (cond.status, cond.reason)
        if not changed:
            continue
        if cond.type == DEGRADED and cond.status == ConditionStatus.TRUE:
            events.append(Event("Warning", cond.reason, cond.message))
        elif cond.type == DEGRADED and old is not None and old.status == ConditionStatus.TRUE:
            events.append(Event("Normal", "Recovered", f"no longer degraded (was {old.reason})"))
        elif cond.type == READY and cond.status == ConditionStatus.TRUE and (
                old is None or old.status != ConditionStatus.TRUE):
            events.append(Event("Normal", "Ready", cond.message))
    return events


def invalid_status(world: World, now: dt.datetime) -> tuple[ModelDeploymentStatus, Event]:
    """The status of a resource whose spec the operator cannot read: the previous status,
    Degraded with the validation error (what runs keeps running)."""
    message = world.spec_error or "invalid spec"
    previous = world.previous
    status = previous.model_copy(update={
        "observed_generation": world.generation,
        "conditions": [c for c in previous.conditions if c.type != DEGRADED] + [
            _condition(previous.conditions, DEGRADED,
                       (ConditionStatus.TRUE, "InvalidSpec", message),
                       generation=world.generation, stamp=stamp(now))],
    })
    return status, Event("Warning", "InvalidSpec", message)

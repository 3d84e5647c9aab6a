"""Compute a ModelDeployment's status and plan from what the cluster shows.

Pure functions of (spec, previous status, observed children, clock), called by
:mod:`.reconcile` on every pass and unit-tested without a cluster:

* :func:`observe` boils live Deployment and Pod dicts down to :class:`VersionState`.
* :func:`plan_versions` decides which version Deployments should exist and which
  are done (the new version is fully available, so older ones are retired).
* :func:`compute_status` derives conditions, counts, the version ledger and the
  Events worth emitting. Condition timestamps only move when a condition's
  status flips, so an unchanged world yields an identical status (and no write).

Imports no Kubernetes client.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from . import api
from .render import GPU_RESOURCE, VERSION_LABEL

READY, PROGRESSING, DEGRADED = "Ready", "Progressing", "Degraded"
_POD_FAILURE_REASONS = frozenset({
    "CrashLoopBackOff", "ImagePullBackOff", "ErrImagePull", "InvalidImageName",
    "CreateContainerConfigError", "CreateContainerError", "RunContainerError",
})


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass(frozen=True)
class VersionState:
    """One version's Deployment and pods, as observed."""

    version: str
    deployment: str
    desired: int
    replicas: int = 0
    ready: int = 0
    updated: int = 0
    up_to_date: bool = True  # the Deployment controller has seen its latest spec
    gpus: int = 0
    unschedulable: str | None = None  # the scheduler's message for a pending pod
    pod_failure: tuple[str, str] | None = None  # (reason, message) of a failing container

    @property
    def available(self) -> bool:
        return self.up_to_date and self.desired > 0 and self.ready >= self.desired \
            and self.updated >= self.desired


@dataclass(frozen=True)
class RollBack:
    """Why the target version was rolled back, and what analysis measured."""

    reason: str
    figures: api.AnalysisFigures | None = None


def rolled_back_record(versions: list[api.VersionRecord], target: str) -> api.VersionRecord | None:
    """The target's ledger entry, if its latest rollout ended in a rollback."""
    if versions and versions[0].version == target \
            and versions[0].phase == api.VersionPhase.ROLLED_BACK:
        return versions[0]
    return None


@dataclass(frozen=True)
class VersionPlan:
    target: str
    keep: frozenset[str]  # versions whose Deployments should exist
    retire: frozenset[str]  # versions whose Deployments are to be deleted


def observe(
    deployments: Iterable[Mapping[str, Any]], pods: Iterable[Mapping[str, Any]]
) -> dict[str, VersionState]:
    """Group live objects by the version label."""
    pods_by_version: dict[str, list[Mapping[str, Any]]] = {}
    for pod in pods:
        if pod.get("metadata", {}).get("deletionTimestamp"):
            continue
        version = pod.get("metadata", {}).get("labels", {}).get(VERSION_LABEL)
        if version is not None:
            pods_by_version.setdefault(version, []).append(pod)
    states: dict[str, VersionState] = {}
    for dep in deployments:
        meta, spec, st = dep.get("metadata", {}), dep.get("spec", {}), dep.get("status", {})
        version = meta.get("labels", {}).get(VERSION_LABEL)
        if version is None:
            continue
        version_pods = pods_by_version.get(version, [])
        states[version] = VersionState(
            version=version,
            deployment=meta.get("name", ""),
            desired=int(spec.get("replicas", 1)),
            replicas=int(st.get("replicas", 0)),
            ready=int(st.get("readyReplicas", 0)),
            updated=int(st.get("updatedReplicas", 0)),
            up_to_date=int(st.get("observedGeneration", 0)) >= int(meta.get("generation", 0)),
            gpus=sum(_pod_gpus(p) for p in version_pods if p.get("spec", {}).get("nodeName")),
            unschedulable=_unschedulable_message(version_pods),
            pod_failure=_pod_failure(version_pods),
        )
    return states


def plan_versions(
    spec: api.ModelDeploymentSpec, observed: Mapping[str, VersionState], wanted: int
) -> VersionPlan:
    """The target version always runs; older versions run until it is fully available."""
    target = spec.model.version
    others = frozenset(v for v in observed if v != target)
    target_state = observed.get(target)
    target_done = target_state is not None and (
        target_state.available or (wanted == 0 and target_state.up_to_date)
    )
    if target_done:
        return VersionPlan(target, frozenset({target}), others)
    return VersionPlan(target, frozenset({target}) | others, frozenset())


def compute_status(
    *,
    generation: int,
    spec: api.ModelDeploymentSpec,
    previous: api.ModelDeploymentStatus,
    observed: Mapping[str, VersionState],
    plan: VersionPlan,
    url: str,
    selector: str,
    now: dt.datetime,
    canary: api.CanaryStatus | None = None,
    canary_message: str = "",
    promoted: bool = False,
    rolled_back: RollBack | None = None,
    handled: api.HandledRequests | None = None,
    traffic_split: str | None = None,
    autoscaler: api.AutoscalerStatus | None = None,
) -> tuple[api.ModelDeploymentStatus, list[Event]]:
    """The status for this pass. With a canary in progress (``canary``) the target version
    stays in phase Canary until ``promoted``."""
    stamp = now.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    target = plan.target
    target_state = observed.get(target)
    serving = [s for s in observed.values() if s.ready > 0 and s.version not in plan.retire]
    live = [s for s in observed.values() if s.version not in plan.retire]
    events: list[Event] = []

    if rolled_back is not None:
        versions = _roll_back(previous.versions, target, rolled_back, stamp, events)
    else:
        versions = _ledger(previous.versions, spec=spec, target=target,
                           target_state=target_state, stamp=stamp, events=events,
                           canary=canary is not None, promoted=promoted)
    stable = next((r.version for r in versions if r.phase == api.VersionPhase.STABLE), None)

    ready_count = sum(s.ready for s in serving)
    if ready_count > 0:
        served = ", ".join(f"{s.ready} of version {s.version}" for s in
                           sorted(serving, key=lambda s: s.version != target))
        ready = (api.ConditionStatus.TRUE, "Serving", f"{ready_count} ready replicas ({served})")
    elif target_state is not None and target_state.desired == 0 and target_state.up_to_date:
        ready = (api.ConditionStatus.FALSE, "ScaledToZero", "0 replicas requested")
    else:
        ready = (api.ConditionStatus.FALSE, "NoReadyReplicas",
                 f"no replica of version {target} is ready yet")

    if rolled_back is not None:
        progressing = (api.ConditionStatus.FALSE, "RolledBack",
                       f"version {target} was rolled back: {rolled_back.reason}")
    elif canary is not None:
        progressing = (api.ConditionStatus.TRUE, "Canary", canary_message)
    elif target_state is None:
        progressing = (api.ConditionStatus.TRUE, "Creating", f"creating version {target}")
    elif not target_state.available and target_state.desired > 0:
        progressing = (api.ConditionStatus.TRUE, "RollingOut",
                       f"{target_state.ready}/{target_state.desired} replicas of version "
                       f"{target} ready")
    elif plan.retire:
        progressing = (api.ConditionStatus.TRUE, "RetiringOldVersions",
                       f"version {target} is available; removing "
                       f"{', '.join(sorted(plan.retire))}")
    else:
        progressing = (api.ConditionStatus.FALSE, "Complete", f"version {target} is rolled out")

    problem = _problem(live, target)
    if rolled_back is not None:
        problem = (api.ConditionStatus.TRUE, "RolledBack",
                   f"version {target} was rolled back: {rolled_back.reason}; "
                   "change spec.model.version, or ask for a retry (modelyard retry NAME), "
                   "to roll out again")
    degraded = problem or (api.ConditionStatus.FALSE, "AsExpected", "")

    conditions = [
        _condition(previous.conditions, READY, ready, generation=generation, stamp=stamp),
        _condition(previous.conditions, PROGRESSING, progressing, generation=generation,
                   stamp=stamp),
        _condition(previous.conditions, DEGRADED, degraded, generation=generation, stamp=stamp),
    ]
    events += _transition_events(previous.conditions, conditions)

    status = api.ModelDeploymentStatus(
        observed_generation=generation,
        conditions=conditions,
        url=url,
        stable_version=stable,
        target_version=target,
        canary=canary,
        replicas=sum(s.replicas for s in observed.values()),
        ready_replicas=ready_count,
        selector=selector,
        gpus=sum(s.gpus for s in observed.values()),
        versions=versions[: api.HISTORY_LIMIT],
        handled_requests=handled if handled and (handled.abort or handled.retry) else None,
        traffic_split=traffic_split,
        autoscaler=autoscaler,
    )
    return status, events


def status_payload(status: api.ModelDeploymentStatus) -> dict[str, Any]:
    """The JSON the status subresource gets (and what a live status is compared to)."""
    return status.model_dump(by_alias=True, exclude_none=True, mode="json")


# ---------------------------------------------------------------------- internals


def _ledger(
    previous: Sequence[api.VersionRecord],
    *,
    spec: api.ModelDeploymentSpec,
    target: str,
    target_state: VersionState | None,
    stamp: str,
    events: list[Event],
    canary: bool,
    promoted: bool,
) -> list[api.VersionRecord]:
    records = [r.model_copy() for r in previous]
    open_phases = {api.VersionPhase.PENDING, api.VersionPhase.CANARY, api.VersionPhase.STABLE}
    current = next((r for r in records if r.version == target and r.phase in open_phases), None)
    if current is None:
        was = next((r.version for r in records if r.phase == api.VersionPhase.STABLE), None)
        current = api.VersionRecord(
            version=target, uri=spec.model.uri, sha256=spec.model.sha256,
            phase=api.VersionPhase.PENDING, deployed_at=stamp,
        )
        records.insert(0, current)
        replacing = f" (replacing {was})" if was else ""
        events.append(Event("Normal", "RolloutStarted", f"rolling out version {target}{replacing}"))
    # A version that was asked for, then replaced before it ever served, is superseded.
    for record in records:
        if record is not current and record.phase in (api.VersionPhase.PENDING,
                                                      api.VersionPhase.CANARY):
            was_canary = record.phase == api.VersionPhase.CANARY
            record.phase = api.VersionPhase.SUPERSEDED
            record.finished_at = stamp
            record.reason = (f"replaced by version {target} during its canary" if was_canary
                             else f"replaced by version {target} before it became available")
    if canary and not promoted:
        if current.phase == api.VersionPhase.PENDING:
            current.phase = api.VersionPhase.CANARY
            current.reason = "canary in progress"
        return records
    done = promoted or (target_state is not None and target_state.available)
    if done and current.phase != api.VersionPhase.STABLE:
        current.phase = api.VersionPhase.STABLE
        current.promoted_at = stamp
        ready = target_state.ready if target_state else 0
        current.reason = "promoted after its canary" if promoted else f"all {ready} replicas ready"
        events.append(Event("Normal", "RolloutComplete",
                            f"version {target} is serving with {ready} replicas"))
    if current.phase == api.VersionPhase.STABLE:
        for record in records:
            if record is not current and record.phase == api.VersionPhase.STABLE:
                record.phase = api.VersionPhase.SUPERSEDED
                record.finished_at = stamp
                record.reason = f"replaced by version {target}"
    return records


def _roll_back(previous: Sequence[api.VersionRecord], target: str, why: RollBack, stamp: str,
               events: list[Event]) -> list[api.VersionRecord]:
    records = [r.model_copy() for r in previous]
    current = records[0] if records and records[0].version == target else None
    if current is None or current.phase == api.VersionPhase.ROLLED_BACK:
        return records  # already recorded
    current.phase = api.VersionPhase.ROLLED_BACK
    current.finished_at = stamp
    current.reason = why.reason
    current.analysis = why.figures
    events.append(Event("Warning", "RolledBack", f"version {target} rolled back: {why.reason}"))
    return records


def _problem(
    live: Sequence[VersionState], target: str
) -> tuple[api.ConditionStatus, str, str] | None:
    ordered = sorted(live, key=lambda s: s.version != target)
    for state in ordered:
        if state.unschedulable:
            return (api.ConditionStatus.TRUE, "Unschedulable",
                    f"version {state.version}: {state.unschedulable}")
    for state in ordered:
        if state.pod_failure:
            reason, message = state.pod_failure
            return (api.ConditionStatus.TRUE, reason, f"version {state.version}: {message}")
    return None


def _condition(
    previous: Sequence[api.Condition], kind: str, verdict: tuple[api.ConditionStatus, str, str],
    *, generation: int, stamp: str,
) -> api.Condition:
    status, reason, message = verdict
    old = next((c for c in previous if c.type == kind), None)
    since = old.last_transition_time if old is not None and old.status == status else stamp
    return api.Condition(type=kind, status=status, reason=reason, message=message,
                         last_transition_time=since, observed_generation=generation)


def _transition_events(
    previous: Sequence[api.Condition], current: Sequence[api.Condition]
) -> list[Event]:
    before = {c.type: c for c in previous}
    events = []
    for cond in current:
        old = before.get(cond.type)
        changed = old is None or (old.status, old.reason) != (cond.status, cond.reason)
        if not changed:
            continue
        if cond.type == DEGRADED and cond.status == api.ConditionStatus.TRUE:
            events.append(Event("Warning", cond.reason, cond.message))
        elif cond.type == DEGRADED and old is not None and old.status == api.ConditionStatus.TRUE:
            events.append(Event("Normal", "Recovered", f"no longer degraded (was {old.reason})"))
        elif cond.type == READY and cond.status == api.ConditionStatus.TRUE and (
                old is None or old.status != api.ConditionStatus.TRUE):
            events.append(Event("Normal", "Ready", cond.message))
    return events


def _pod_gpus(pod: Mapping[str, Any]) -> int:
    total = 0
    for container in pod.get("spec", {}).get("containers", []):
        limits = container.get("resources", {}).get("limits", {})
        total += int(limits.get(GPU_RESOURCE, 0) or 0)
    return total


def _unschedulable_message(pods: Sequence[Mapping[str, Any]]) -> str | None:
    for pod in pods:
        for cond in pod.get("status", {}).get("conditions", []) or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False" \
                    and cond.get("reason") == "Unschedulable":
                return str(cond.get("message") or "pod cannot be scheduled")
    return None


def _pod_failure(pods: Sequence[Mapping[str, Any]]) -> tuple[str, str] | None:
    for pod in pods:
        for cs in pod.get("status", {}).get("containerStatuses", []) or []:
            waiting = (cs.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in _POD_FAILURE_REASONS:
                return str(waiting["reason"]), str(waiting.get("message") or waiting["reason"])
    return None

"""Plan: one pure function from a pass's world to what the pass must do.

The second of the controller's four stages (observe → **plan** → execute → report, see
:mod:`.reconcile`). :func:`plan` takes the frozen :class:`~.world.World`, the canary
analysis' verdict (gathered before planning, never awaited in the middle of it), the
autoscaler's latest decision and the clock, and returns a :class:`Plan`:

* ``apply``: the children as they should be (:mod:`.render`), applied where they differ,
  and a version's conversion Job (:mod:`.conversion`) until it is converted;
* ``scale``: replicas set through Deployments' scale subresource (versions other than the
  target, and the target itself while the autoscaler owns its replicas);
* ``retire``: what no longer belongs (finished versions, an unused preview Service or
  activator EndpointSlice);
* ``status`` and ``events``: computed once (:func:`.status.compute_status`);
* ``recheck_after``: seconds until something falls due (a pause ends, an analysis is
  due), so the loop runs the next pass then instead of waiting for the resync.

Imports no Kubernetes client; unit tests drive it through whole rollouts.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from . import api, api_status, conversion, render, rollout
from .analysis import Verdict
from .status import Event, compute_status, invalid_status
from .world import VersionState, World

# A model at zero whose activator has no ready endpoint yet looks again this often; one
# whose traffic goes to the activator checks that its addresses still hold this often.
ACTIVATOR_RECHECK_S = 5.0
AT_ZERO_RECHECK_S = 30.0


@dataclass(frozen=True)
class Retire:
    kind: str
    api_version: str
    name: str


@dataclass(frozen=True)
class Plan:
    apply: tuple[dict[str, Any], ...] = ()
    scale: Mapping[str, int] = field(default_factory=dict)  # Deployment name -> replicas
    retire: tuple[Retire, ...] = ()
    status: api_status.ModelDeploymentStatus | None = None  # None: leave status alone
    events: tuple[Event, ...] = ()
    recheck_after: float | None = None  # seconds; None: nothing falls due


def plan(world: World, verdict: Verdict | None, scale_request: api_status.AutoscalerStatus | None,
         now: dt.datetime) -> Plan:
    """What this pass does. ``scale_request`` is the autoscaler's latest decision (None:
    none since this operator started; the one recorded in status holds)."""
    if world.deleting:
        return Plan()  # owner references take the children away
    spec = world.spec
    if spec is None:
        status, event = invalid_status(world, now)
        return Plan(status=status, events=(event,))
    autoscaler = (scale_request or world.previous.autoscaler) if spec.autoscaling else None
    total = autoscaler.desired_replicas if autoscaler else render.replicas_wanted(spec)
    # With spec.model.convert the target starts only once converted (conversion.py):
    # until then what runs keeps running; then its pods serve the package.
    converting = conversion.plan_conversion(world, now)
    step = rollout.hold(world, total) if converting.blocks \
        else rollout.plan_rollout(world, verdict, total, now)
    served = spec if converting.model is None \
        else spec.model_copy(update={"model": converting.model})
    owner, versions, target = world.owner, world.versions, spec.model.version

    scale: dict[str, int] = {}
    rendered = step.replicas.get(target, total)
    for version, replicas in step.replicas.items():
        state = versions.get(version)
        if state is None:
            continue
        if version == target:
            if spec.autoscaling is None:
                continue  # the rendered Deployment carries its replicas
            rendered = state.desired  # the autoscaler's replicas go through scale only
        if state.desired != replicas:
            scale[state.deployment] = replicas

    activated = needs_activator(spec, versions) and world.activator is not None
    desired = [render.render_service(owner, step.active, to_activator=activated,
                                     grpc_port=spec.runtime.grpc_port,
                                     grpc_tls=spec.tls is not None)]
    if activated and world.activator is not None:
        desired.append(render.render_activator_slice(owner, world.activator.addresses,
                                                     world.activator.port))
    if not converting.blocks:
        desired.append(render.render_deployment(owner, served, rendered, world.node_cache))
    if converting.create is not None:
        desired.append(converting.create)
    desired += [render.render_version_service(owner, v) for v in sorted(step.versions.keep)]
    if step.preview:
        desired.append(render.render_preview_service(owner, step.preview))
    if world.gateway:
        desired.append(render.render_httproute(owner, spec,
                                               rollout.route_weights(step, versions)))
    if spec.network_policy.enabled:
        # Applied, never deleted (the operator holds no delete on NetworkPolicies): turning
        # it off stops the writes; the policy itself goes with the ModelDeployment or by hand.
        desired.append(render.render_network_policy(owner, spec, world.network_peers))

    retire = [Retire(kind, api_version, versions[v].deployment)
              for v in sorted(step.versions.retire)
              for kind, api_version in (("Deployment", "apps/v1"), ("Service", "v1"))]
    if not step.preview:
        retire.append(Retire("Service", "v1", render.preview_service_name(owner.name)))
    if not activated:
        retire.append(Retire("EndpointSlice", "discovery.k8s.io/v1",
                             render.activator_slice_name(owner.name)))
    retire += [Retire("Job", "batch/v1", name) for name in converting.retire]

    status, events = compute_status(world, step, autoscaler=autoscaler, now=now,
                                    conversion=converting)
    scaled = _scaled_event(world, autoscaler)
    recheck = step.recheck_after
    if needs_activator(spec, versions) and world.activator_configured:
        every = ACTIVATOR_RECHECK_S if world.activator is None else AT_ZERO_RECHECK_S
        recheck = min(recheck or every, every)
    return Plan(apply=tuple(desired), scale=scale,
                retire=tuple(r for r in retire if _present(world, r.kind, r.name)),
                status=status, events=(*scaled, *events), recheck_after=recheck)


def needs_activator(spec: api.ModelDeploymentSpec, versions: Mapping[str, VersionState]) -> bool:
    """A model that may scale to zero and has no ready replica: its stable Service sends
    traffic to the activator, which holds requests until a replica is ready."""
    return spec.autoscaling is not None and spec.autoscaling.min_replicas == 0 \
        and not any(s.ready for s in versions.values())


def _scaled_event(world: World, decided: api_status.AutoscalerStatus | None) -> tuple[Event, ...]:
    """A ``Scaled`` Event for an autoscaler decision that status does not record yet."""
    before = world.previous.autoscaler
    if decided is None or decided.last_scale_time is None \
            or (before is not None and before.last_scale_time == decided.last_scale_time):
        return ()
    was = before.desired_replicas if before is not None else \
        sum(s.desired for s in world.versions.values())
    return (Event("Normal", "Scaled",
                  f"{was} -> {decided.desired_replicas} replicas: {decided.reason}"),)


def _present(world: World, kind: str, name: str) -> bool:
    obj = world.live.get((kind, name))
    return obj is not None and not obj.get("metadata", {}).get("deletionTimestamp")

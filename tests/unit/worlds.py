"""Worlds for the pure controller stages: a ModelDeployment's picture, made in a test."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from modelyard.operator import api, api_status, render, rollout
from modelyard.operator.world import VersionState, World


def world_of(spec: api.ModelDeploymentSpec | dict[str, Any],
             versions: Mapping[str, VersionState] | None = None, *,
             previous: api_status.ModelDeploymentStatus | None = None, generation: int = 1,
             annotations: Mapping[str, str] | None = None, name: str = "m",
             namespace: str = "ns", **more: Any) -> World:
    """A World as :func:`world.build` would make it, from parts."""
    if isinstance(spec, dict):
        spec = api.parse_spec(spec)
    resource = {"metadata": {"name": name, "namespace": namespace, "uid": "u-1",
                             "generation": generation}}
    fields: dict[str, Any] = {
        "key": (namespace, name), "owner": render.Owner(name, namespace, "u-1"),
        "generation": generation, "resource": resource, "annotations": annotations or {},
        "deleting": False, "spec": spec, "spec_error": None,
        "previous": previous or api_status.ModelDeploymentStatus(), "versions": versions or {},
        "live": {}, "pods": (), "gateway": False, "activator": None,
    }
    return World(**(fields | more))


def plain_step(world: World, wanted: int, **extra: Any) -> rollout.Step:
    """A plain replacement's step (what a RollingUpdate pass plans), with ``extra``
    (canary, promoted, rolled_back, ...) laid over it."""
    assert world.spec is not None
    target = world.spec.model.version
    step = rollout.Step(rollout.plan_versions(target, world.versions, wanted), {target: wanted})
    return dataclasses.replace(step, **extra)

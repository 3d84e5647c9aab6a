"""kwok Stage configuration for the local cluster (pure: YAML text in, YAML text out).

kwok's upstream "fast" stages make every pod Ready the moment it is scheduled. With
real runtime processes behind modelyard's pods (``ClusterConfig(real_pods=True)``)
that would be a lie, so :func:`real_pod_stages` changes one thing: pods labelled
``modelyard.dev/model-deployment`` are started Running but *not* Ready (stage
``modelyard-pod-start``), and :mod:`.pods` — the stand-in kubelet — sets Ready from
the runtime's real readiness probe. Every other pod keeps kwok's behaviour.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

RUNTIME_POD_LABEL = "modelyard.dev/model-deployment"
_LABEL_KEY = f'.metadata.labels["{RUNTIME_POD_LABEL}"]'


def real_pod_stages(upstream: str) -> str:
    docs = [d for d in yaml.safe_load_all(upstream) if d]
    ready = next(d for d in docs if d["metadata"]["name"] == "pod-ready")
    start = copy.deepcopy(ready)
    ready["spec"]["selector"]["matchExpressions"].append(
        {"key": _LABEL_KEY, "operator": "DoesNotExist"})
    start["metadata"]["name"] = "modelyard-pod-start"
    start["spec"]["selector"]["matchExpressions"].append(
        {"key": _LABEL_KEY, "operator": "Exists"})
    start["spec"]["next"]["statusTemplate"] = _unready(start["spec"]["next"]["statusTemplate"])
    docs.insert(docs.index(ready) + 1, start)
    return yaml.safe_dump_all(docs, sort_keys=False)


def _unready(template: str) -> str:
    """Containers started and running; the Ready conditions and container readiness false."""
    out = template
    for kind in ("Ready", "ContainersReady"):
        block = f'status: "True"\n  type: {kind}\n'
        if block not in out:
            raise ValueError(f"kwok's pod-ready template changed: no {kind} condition block")
        out = out.replace(block, f'status: "False"\n  type: {kind}\n')
    containers = "  name: {{ .name | Quote }}\n  ready: true\n  restartCount: 0\n  state:"
    if containers not in out:
        raise ValueError("kwok's pod-ready template changed: no container status block")
    out = out.replace(containers, containers.replace("ready: true", "ready: false")
                      .replace("restartCount: 0", "restartCount: 0\n  started: true"), 1)
    return out


def stage_names(text: str) -> list[Any]:
    return [d["metadata"]["name"] for d in yaml.safe_load_all(text) if d]

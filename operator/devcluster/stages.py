"""kwok Stage configuration for the local cluster (pure: YAML text in, YAML text out).

kwok's upstream "fast" stages make every pod Ready the moment it is scheduled. With
real runtime processes behind modelyard's pods (``ClusterConfig(real_pods=True)``)
that would be a lie, so :func:`real_pod_stages` changes one thing: pods labelled
``modelyard.dev/model-deployment`` are started Running but *not* Ready (stage
``modelyard-pod-start``), and :mod:`.pods` — the stand-in kubelet — sets Ready from
the runtime's real readiness probe. A conversion Job's pod (label
``modelyard.dev/convert-for``) is started Running the same way (stage
``modelyard-convert-start``) instead of being completed at once by kwok's ``pod-complete``,
and :mod:`.pods` runs its command to its end and reports how it ended. Every other pod
keeps kwok's behaviour.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

RUNTIME_POD_LABEL = "modelyard.dev/model-deployment"
CONVERT_POD_LABEL = "modelyard.dev/convert-for"  # operator/conversion.py's CONVERT_LABEL
_LABEL_KEY = f'.metadata.labels["{RUNTIME_POD_LABEL}"]'
_CONVERT_KEY = f'.metadata.labels["{CONVERT_POD_LABEL}"]'


def real_pod_stages(upstream: str) -> str:
    docs = [d for d in yaml.safe_load_all(upstream) if d]
    ready = next(d for d in docs if d["metadata"]["name"] == "pod-ready")
    complete = next(d for d in docs if d["metadata"]["name"] == "pod-complete")
    start = copy.deepcopy(ready)
    convert = copy.deepcopy(ready)
    for stage in (ready, complete):
        stage["spec"]["selector"]["matchExpressions"] += [
            {"key": _LABEL_KEY, "operator": "DoesNotExist"},
            {"key": _CONVERT_KEY, "operator": "DoesNotExist"}]
    for stage, name, key in ((start, "modelyard-pod-start", _LABEL_KEY),
                             (convert, "modelyard-convert-start", _CONVERT_KEY)):
        stage["metadata"]["name"] = name
        stage["spec"]["selector"]["matchExpressions"].append({"key": key, "operator": "Exists"})
        stage["spec"]["next"]["statusTemplate"] = _unready(
            stage["spec"]["next"]["statusTemplate"])
    docs[docs.index(ready) + 1:docs.index(ready) + 1] = [start, convert]
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

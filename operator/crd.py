"""Generate the ModelDeployment CustomResourceDefinition from :mod:`.api`.

pydantic gives JSON Schema; Kubernetes wants a *structural* OpenAPI v3 schema:
no ``$ref``, no ``title``, optional fields expressed by leaving them out of
``required`` rather than by ``anyOf [T, null]``, and int-or-string quantities
spelled ``x-kubernetes-int-or-string``. :func:`to_structural` does that rewrite.

``python -m modelyard.operator.crd`` writes ``crds/modeldeployments.modelyard.dev.yaml``
(and ``--check`` fails when the file is stale; the test suite runs it too).
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from . import api, api_status

CRD_FILE = "modeldeployments.modelyard.dev.yaml"
_DROP = {"title"}


def crd() -> dict[str, Any]:
    spec_schema = to_structural(api.ModelDeploymentSpec.model_json_schema(by_alias=True))
    status_schema = to_structural(api_status.ModelDeploymentStatus.model_json_schema(by_alias=True))
    status_schema.pop("additionalProperties", None)
    root = {
        "type": "object",
        "description": "A PyTorch model served by the modelyard runtime, with rollouts and "
                       "autoscaling.",
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec_schema,
            "status": status_schema,
        },
        "required": ["spec"],
        "x-kubernetes-validations": [
            {
                "rule": f"self.metadata.name.size() <= {api.MAX_NAME_LENGTH} && "
                        "self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')",
                "message": f"metadata.name must be at most {api.MAX_NAME_LENGTH} characters of "
                           "lowercase letters, digits and '-', starting with a letter "
                           "(it names the model's Service)",
            }
        ],
    }
    ready = '.status.conditions[?(@.type=="Ready")].status'
    columns = [
        {"name": "Version", "type": "string", "jsonPath": ".status.stableVersion",
         "description": "Version serving traffic"},
        {"name": "Target", "type": "string", "jsonPath": ".spec.model.version",
         "description": "Version asked for", "priority": 1},
        {"name": "Canary", "type": "string", "jsonPath": ".status.canary.progress",
         "description": "Canary version's traffic and step"},
        {"name": "Ready", "type": "string", "jsonPath": ready},
        {"name": "Replicas", "type": "string", "jsonPath": ".status.readyReplicas",
         "description": "Ready replicas"},
        {"name": "GPU", "type": "integer", "jsonPath": ".status.gpus",
         "description": "GPUs held by the model's pods"},
        {"name": "URL", "type": "string", "jsonPath": ".status.url"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{api.PLURAL}.{api.GROUP}"},
        "spec": {
            "group": api.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": api.KIND,
                "listKind": f"{api.KIND}List",
                "plural": api.PLURAL,
                "singular": api.SINGULAR,
                "shortNames": list(api.SHORT_NAMES),
                "categories": ["all", "modelyard"],
            },
            "versions": [{
                "name": api.VERSION,
                "served": True,
                "storage": True,
                "schema": {"openAPIV3Schema": root},
                "subresources": {
                    "status": {},
                    "scale": {
                        "specReplicasPath": ".spec.replicas",
                        "statusReplicasPath": ".status.replicas",
                        "labelSelectorPath": ".status.selector",
                    },
                },
                "additionalPrinterColumns": columns,
            }],
        },
    }


def to_structural(schema: dict[str, Any]) -> dict[str, Any]:
    """Inline ``$defs`` and rewrite pydantic's JSON Schema into a structural one."""
    defs = schema.get("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, list):
            return [walk(n) for n in node]
        if not isinstance(node, dict):
            return node
        node = dict(node)
        if "$ref" in node:
            target = copy.deepcopy(defs[node.pop("$ref").rsplit("/", 1)[-1]])
            merged = {**target, **node}  # field-level description/default win
            if "x-kubernetes-validations" in target and "x-kubernetes-validations" in node:
                merged["x-kubernetes-validations"] = (
                    target["x-kubernetes-validations"] + node["x-kubernetes-validations"])
            return walk(merged)
        if node.get("x-kubernetes-int-or-string"):
            node.pop("anyOf", None)
            node.pop("type", None)
            if node.get("default") is None:
                node.pop("default", None)
            return {k: walk(v) for k, v in node.items() if k not in _DROP}
        if "anyOf" in node:
            options = [o for o in node["anyOf"] if o.get("type") != "null"]
            if len(options) == 1:
                rest = {k: v for k, v in node.items() if k != "anyOf"}
                if rest.get("default", 0) is None:
                    rest.pop("default")
                inner = walk(options[0])
                return walk({**inner, **rest, **_merge_rules(inner, rest)})
        if "const" in node:
            node["enum"] = [node.pop("const")]
        # JSON Schema 2020-12 bounds -> OpenAPI v3.0 (a number beside a boolean flag).
        for bound, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
            if isinstance(node.get(bound), int | float) and not isinstance(node[bound], bool):
                node[plain] = node.pop(bound)
                node[bound] = True
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key in _DROP or key == "$defs":
                continue
            if key == "properties":
                out[key] = {name: walk(sub) for name, sub in value.items()}
            else:
                out[key] = walk(value)
        if out.get("type") == "object" and "properties" in out:
            out.pop("additionalProperties", None)  # pruning rejects unknown fields already
        if out.get("type") == "object" and "additionalProperties" not in out \
                and "properties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["x-kubernetes-preserve-unknown-fields"] = True
        return out

    result = walk({k: v for k, v in schema.items() if k != "$defs"})
    assert isinstance(result, dict)
    return result


def _merge_rules(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    rules = a.get("x-kubernetes-validations", []) + b.get("x-kubernetes-validations", [])
    return {"x-kubernetes-validations": rules} if rules else {}


def render_yaml() -> str:
    header = ("# Generated from modelyard/operator/api.py by `python -m modelyard.operator.crd`.\n"
              "# Do not edit by hand: tests fail when this file and the models drift.\n")
    return header + yaml.safe_dump(crd(), sort_keys=True, width=100)


def generated_file_cli(argv: list[str] | None, *, doc: str, default: Path | list[Path],
                       render: Callable[[], str], module: str) -> int:
    """``--out PATH`` (repeatable; default: ``default``) writes ``render()``; ``--check``
    fails when a PATH differs from it."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", type=Path, action="append")
    parser.add_argument("--check", action="store_true", help="fail if --out is stale")
    args = parser.parse_args(argv)
    outs: list[Path] = args.out or (default if isinstance(default, list) else [default])
    text = render()
    stale = [out for out in outs if (out.read_text() if out.exists() else "") != text]
    if args.check:
        for out in stale:
            print(f"{out} is stale: run `python -m {module}`", file=sys.stderr)
        return 1 if stale else 0
    for out in outs:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Writes the CRD to ``crds/`` and to the Helm chart's ``crds/`` (the same file)."""
    return generated_file_cli(
        argv, doc=__doc__ or "", render=render_yaml, module="modelyard.operator.crd",
        default=[Path("crds") / CRD_FILE, Path("charts") / "modelyard" / "crds" / CRD_FILE])


if __name__ == "__main__":
    raise SystemExit(main())

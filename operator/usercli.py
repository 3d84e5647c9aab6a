"""``modelyard status|history|promote|abort|retry|rollback NAME``: a ModelDeployment as a
person wants to see and steer it.

Thin commands over the Kubernetes API with the user's own kubeconfig (``$KUBECONFIG``
or ``~/.kube/config``), called by :mod:`.cli`. ``promote``, ``abort`` and ``retry`` set
the same annotations a GitOps user or an Argo CD action would
(``modelyard.dev/promote=<version>``, ``modelyard.dev/abort=<new value>``,
``modelyard.dev/retry=<new value>``), so every path behaves the same. ``rollback``
changes ``spec.model`` back to a version from the ledger (with GitOps, revert the commit
instead, or the sync will undo it). Exit codes: 0 done, 1 the resource is not in a state
for it, 2 not found.
"""

from __future__ import annotations

import datetime as dt
import sys
from typing import Any, TextIO, cast

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from . import api, api_status


class CommandError(Exception):
    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def _api(context: str | None = None) -> client.CustomObjectsApi:
    config.load_kube_config(context=context)
    return client.CustomObjectsApi()


def fetch(name: str, namespace: str) -> dict[str, Any]:
    try:
        body = _api().get_namespaced_custom_object(
            api.GROUP, api.VERSION, namespace, api.PLURAL, name)
    except ApiException as exc:
        if exc.status == 404:
            raise CommandError(f"modeldeployment {namespace}/{name} not found", 2) from None
        raise
    return cast(dict[str, Any], body)


def show_status(name: str, namespace: str, out: TextIO = sys.stdout) -> None:
    md = fetch(name, namespace)
    status = api_status.parse_status(md.get("status"))
    print(f"{namespace}/{name}: version {md['spec']['model']['version']} asked, "
          f"{status.stable_version or '-'} serving, {status.ready_replicas}/{status.replicas} "
          f"ready, {status.gpus} GPUs", file=out)
    if status.canary is not None:
        print(f"canary: version {status.canary.version} at {status.canary.progress}", file=out)
    for cond in status.conditions:
        print(f"  {cond.type:<12} {cond.status:<6} {cond.reason:<20} {cond.message}", file=out)
    print(f"url: {status.url or '-'}", file=out)


def show_history(name: str, namespace: str, out: TextIO = sys.stdout) -> None:
    status = api_status.parse_status(fetch(name, namespace).get("status"))
    rows = [("VERSION", "PHASE", "DEPLOYED", "FINISHED", "REASON")]
    rows += [(r.version, str(r.phase), r.deployed_at, r.finished_at or "", r.reason or "")
             for r in status.versions]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  "
              + row[4], file=out)


def promote(name: str, namespace: str, out: TextIO = sys.stdout) -> None:
    status = api_status.parse_status(fetch(name, namespace).get("status"))
    if status.canary is None:
        raise CommandError(f"{namespace}/{name} has no canary in progress")
    _annotate(name, namespace, api.PROMOTE_ANNOTATION, status.canary.version)
    print(f"promoting version {status.canary.version} of {namespace}/{name}", file=out)


def abort(name: str, namespace: str, out: TextIO = sys.stdout) -> None:
    md = fetch(name, namespace)
    status = api_status.parse_status(md.get("status"))
    if status.canary is None:
        raise CommandError(f"{namespace}/{name} has no rollout in progress")
    _annotate(name, namespace, api.ABORT_ANNOTATION, _request_token(md, api.ABORT_ANNOTATION))
    print(f"aborting the rollout of version {status.canary.version} of {namespace}/{name}; "
          f"traffic goes back to version {status.stable_version}", file=out)


def retry(name: str, namespace: str, out: TextIO = sys.stdout) -> None:
    md = fetch(name, namespace)
    status = api_status.parse_status(md.get("status"))
    target = md["spec"]["model"]["version"]
    last = status.versions[0] if status.versions else None
    if last is None or last.version != target or last.phase != api_status.VersionPhase.ROLLED_BACK:
        raise CommandError(f"{namespace}/{name}: version {target} was not rolled back; "
                           "nothing to retry")
    _annotate(name, namespace, api.RETRY_ANNOTATION, _request_token(md, api.RETRY_ANNOTATION))
    print(f"rolling out version {target} of {namespace}/{name} again", file=out)


def rollback(name: str, namespace: str, to: str | None = None,
             out: TextIO = sys.stdout) -> None:
    """Point ``spec.model`` back at a version that served before (the last one by default)."""
    md = fetch(name, namespace)
    status = api_status.parse_status(md.get("status"))
    current = md["spec"]["model"]["version"]
    served = [r for r in status.versions if r.promoted_at and r.version != current]
    chosen = next((r for r in served if r.version == to), None) if to else \
        (served[0] if served else None)
    if chosen is None:
        known = ", ".join(dict.fromkeys(r.version for r in served)) or "none"
        wanted = f"version {to}" if to else "an earlier version"
        raise CommandError(f"{namespace}/{name}: {wanted} never served; versions that served "
                           f"before: {known}")
    model = {"version": chosen.version, "uri": chosen.uri, "sha256": chosen.sha256}
    _api().patch_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, name,
                                          {"spec": {"model": model}})
    print(f"rolling {namespace}/{name} back from version {current} to {chosen.version} "
          f"({chosen.uri}); it served before, so it skips the canary steps", file=out)


def _annotate(name: str, namespace: str, key: str, value: str) -> None:
    body = {"metadata": {"annotations": {key: value}}}
    _api().patch_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, name,
                                          body)


def _request_token(md: dict[str, Any], annotation: str) -> str:
    """A value for a control annotation that differs from the one there now."""
    token = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    current = (md.get("metadata", {}).get("annotations") or {}).get(annotation)
    return token if token != current else f"{token}-1"

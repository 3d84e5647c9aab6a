"""``modelyard status|history|promote NAME``: a ModelDeployment as a person wants to see it.

Thin commands over the Kubernetes API with the user's own kubeconfig (``$KUBECONFIG``
or ``~/.kube/config``), called by :mod:`.cli`. ``promote`` sets the same annotation a
GitOps user would commit (``modelyard.dev/promote=<version>``), so both paths behave
the same. Exit codes: 0 done, 1 the resource is not in a state for it, 2 not found.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO, cast

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from . import api


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
    status = api.parse_status(md.get("status"))
    print(f"{namespace}/{name}: version {md['spec']['model']['version']} asked, "
          f"{status.stable_version or '-'} serving, {status.ready_replicas}/{status.replicas} "
          f"ready, {status.gpus} GPUs", file=out)
    if status.canary is not None:
        print(f"canary: version {status.canary.version} at {status.canary.progress}", file=out)
    for cond in status.conditions:
        print(f"  {cond.type:<12} {cond.status:<6} {cond.reason:<20} {cond.message}", file=out)
    print(f"url: {status.url or '-'}", file=out)


def show_history(name: str, namespace: str, out: TextIO = sys.stdout) -> None:
    status = api.parse_status(fetch(name, namespace).get("status"))
    rows = [("VERSION", "PHASE", "DEPLOYED", "FINISHED", "REASON")]
    rows += [(r.version, str(r.phase), r.deployed_at, r.finished_at or "", r.reason or "")
             for r in status.versions]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  "
              + row[4], file=out)


def promote(name: str, namespace: str, out: TextIO = sys.stdout) -> None:
    status = api.parse_status(fetch(name, namespace).get("status"))
    if status.canary is None:
        raise CommandError(f"{namespace}/{name} has no canary in progress")
    body = {"metadata": {"annotations": {api.PROMOTE_ANNOTATION: status.canary.version}}}
    _api().patch_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, name,
                                          body)
    print(f"promoting version {status.canary.version} of {namespace}/{name}", file=out)

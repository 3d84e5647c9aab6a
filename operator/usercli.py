"""``modelyard status|history|promote|abort|retry|rollback|chat NAME``: a ModelDeployment
as a person wants to see, steer and try it.

Thin commands over the Kubernetes API with the user's own kubeconfig (``$KUBECONFIG``
or ``~/.kube/config``), called by :mod:`.cli`. ``promote``, ``abort`` and ``retry`` set
the same annotations a GitOps user or an Argo CD action would
(``modelyard.dev/promote=<version>``, ``modelyard.dev/abort=<new value>``,
``modelyard.dev/retry=<new value>``), so every path behaves the same. ``rollback``
changes ``spec.model`` back to a version from the ledger (with GitOps, revert the commit
instead, or the sync will undo it). ``chat`` talks to a generative model (engine vllm)
at the URL in its status, or at ``--url`` (:mod:`.chat`). Exit codes: 0 done, 1 the
resource is not in a state for it, 2 not found.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
from collections.abc import Callable
from typing import Any, TextIO, cast

import httpx
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
    for line in history_lines(status):
        print(line, file=out)


def history_lines(status: api_status.ModelDeploymentStatus) -> list[str]:
    """The ledger as a table, newest first; the reason, free text, last and unpadded."""
    rows = [("VERSION", "PHASE", "DEPLOYED", "FINISHED", "CONVERSION", "REASON")]
    rows += [(r.version, str(r.phase), r.deployed_at, r.finished_at or "",
              _conversion(r.conversion), r.reason or "") for r in status.versions]
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  "
            + row[5] for row in rows]


def _conversion(record: api_status.ConversionRecord | None) -> str:
    """What a version's conversion measured: ``aoti x8.40 b1:x1.46 delta:0``."""
    if record is None:
        return ""
    if record.phase != "Converted":
        return record.phase
    words = [record.target if record.quantize == "none" else f"{record.target}/{record.quantize}"]
    if record.speedup is not None:
        words.append(f"x{record.speedup:.2f}")
    if record.speedup_batch1 is not None:
        words.append(f"b1:x{record.speedup_batch1:.2f}")
    if record.accuracy_delta is not None:
        words.append(f"delta:{record.accuracy_delta:.2g}")
    return " ".join(words)


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


def chat(name: str, namespace: str, *, url: str | None = None, api_key: str | None = None,
         options: dict[str, Any] | None = None, read_line: Callable[[], str] | None = None,
         out: TextIO = sys.stdout, err: TextIO = sys.stderr,
         transport: httpx.BaseTransport | None = None) -> int:
    """``modelyard chat``: a conversation with a generative model; its exit status.

    The endpoint is ``url`` when given (a port-forward, an ingress), else the
    ModelDeployment's ``status.url`` (the Service's DNS name: reachable inside the
    cluster). ``api_key`` (default ``$MODELYARD_API_KEY``) travels as a Bearer token."""
    from . import chat as chatting

    md = fetch(name, namespace)
    spec = md.get("spec") or {}
    engine = (spec.get("runtime") or {}).get("engine") or api.Engine.MODELYARD.value
    status = md.get("status") or {}
    if engine not in GENERATIVE_ENGINES:
        raise CommandError(
            f"{namespace}/{name} serves a tensor model (runtime.engine {engine}), not a "
            "generative one: `modelyard chat` is for runtime.engine vllm. Send it Open "
            "Inference Protocol requests instead (modelyard.runtime.client.Client, or the "
            f"page at {status.get('url') or 'its URL'}/ in a browser).")
    base = (url or status.get("url") or
            f"http://{name}.{namespace}.svc.cluster.local").rstrip("/")
    key = api_key if api_key is not None else os.environ.get("MODELYARD_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    served = (spec.get("model") or {}).get("name") or name
    note = None
    if not status.get("readyReplicas"):
        note = (f"({namespace}/{name} has no ready replica now: this first message waits "
                "while it starts; a generative model takes minutes)")
    if read_line is None:
        read_line = _prompt_reader()
    client = httpx.Client(base_url=base, headers=headers, transport=transport,
                          timeout=httpx.Timeout(30.0, read=chatting.READ_TIMEOUT_S))
    print(f"chatting with {served} at {base}; an empty line is skipped, Ctrl-D ends",
          file=err, flush=True)
    with client:
        try:
            return chatting.converse(client, chatting.Options(model=served, **(options or {})),
                                     read_line, out, err, before_first=note)
        except chatting.Unreachable as error:
            hint = "" if url else (
                f"; outside the cluster, forward a port to the model (kubectl port-forward "
                f"-n {namespace} svc/{name} 8080:80, once it has a ready replica) and pass "
                "--url http://127.0.0.1:8080")
            raise CommandError(f"{error}{hint}") from None


GENERATIVE_ENGINES = frozenset({api.Engine.VLLM.value})


def _prompt_reader() -> Callable[[], str]:
    """``input`` with a prompt at a terminal; plain lines (no prompt) from a pipe."""
    if sys.stdin.isatty():
        def ask() -> str:
            try:
                return input("> ")
            except (EOFError, KeyboardInterrupt):
                print()  # the shell's prompt on a line of its own
                raise

        return ask

    def read() -> str:
        line = sys.stdin.readline()
        if not line:
            raise EOFError
        return line

    return read


def _annotate(name: str, namespace: str, key: str, value: str) -> None:
    body = {"metadata": {"annotations": {key: value}}}
    _api().patch_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, name,
                                          body)


def _request_token(md: dict[str, Any], annotation: str) -> str:
    """A value for a control annotation that differs from the one there now."""
    token = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    current = (md.get("metadata", {}).get("annotations") or {}).get(annotation)
    return token if token != current else f"{token}-1"

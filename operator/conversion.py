"""Conversion as a step of the rollout: plan and render the Job that converts a version.

With ``spec.model.convert`` set, a version does not start (no Deployment, no canary) until
a Kubernetes Job has compiled its source into a verified AOTInductor package
(``python -m modelyard.runtime.convertjob``, the runtime image's ``modelyard convert``) and
written it next to the source, named by its digest. The Job's container reports the
package (URI, digest, speed-up, accuracy delta) as its termination message (JSON), which
the operator reads from the Job's pod: no RBAC beyond reading pods. Then the new version's
pods serve the package (format ``aoti``, its URI and digest).

The states of one version's conversion, as :func:`plan_conversion` reads them from the
ledger (status) and the Jobs it observes:

* **Converting**: no Job yet (the plan creates it), or its Job runs;
* **Converted**: the Job completed and reported a package; recorded in the target's
  ledger entry, which is what later passes read (the Job may be gone by then);
* **Failed**: the Job failed, ran past its deadline, or completed without a package;
  recorded in the ledger too, so the rollout stays stopped (the stable version serving)
  until a new version, new convert settings, or a retry (``modelyard.dev/retry``).

Idempotent across restarts: the Job's name is derived from what is converted (version,
source, digest, settings) and the retry asked for, so a pass finds the Job an earlier
pass (or operator) created instead of creating another. Jobs carry an owner reference
(they go with the ModelDeployment) and ``ttlSecondsAfterFinished``; a Job that is no
longer the current one is deleted.

Called by :mod:`.plan`. Pure: imports no Kubernetes client.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from . import api, render
from .api_status import ConversionRecord
from .world import World, stamp

CONVERT_LABEL = "modelyard.dev/convert-for"  # on conversion Jobs and their pods: the model
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"  # set by the Job controller on its pods
CONTAINER_NAME = "convert"
COMMAND = ("python3", "-m", "modelyard.runtime.convertjob")
TERMINATION_LOG = "/dev/termination-log"
JOB_TTL_S = 86_400  # a finished Job (and its pod's log) stays a day for `kubectl logs`
RESULT_KEYS = ("artifactUri", "artifactSha256")

Phase = Literal["Converting", "Converted", "Failed"]


@dataclass(frozen=True)
class ConversionStep:
    """What this pass does about the target version's conversion."""

    phase: Phase | None = None  # None: no conversion asked for
    record: ConversionRecord | None = None  # what the target's ledger entry records
    model: api.ModelSource | None = None  # the model the target's pods serve, once converted
    create: dict[str, Any] | None = None  # the Job to create
    retire: tuple[str, ...] = ()  # Jobs to delete (no longer the current one)
    message: str = ""

    @property
    def blocks(self) -> bool:
        """The target may not start: its conversion runs or failed."""
        return self.phase in ("Converting", "Failed")


def conversion_key(spec: api.ModelDeploymentSpec) -> str:
    """A digest of what a conversion reads: the source, the settings, the batch limit it
    compiles for and the device. Equal keys, the same package."""
    model = spec.model
    assert model.convert is not None
    what = {
        "version": model.version, "uri": model.uri, "sha256": model.sha256,
        "format": str(model.format), "entryPoint": model.entry_point,
        "inputs": [t.model_dump() for t in model.inputs or ()],
        "outputs": [t.model_dump() for t in model.outputs or ()],
        "convert": model.convert.model_dump(mode="json", exclude={"active_deadline_seconds"}),
        "maxBatch": spec.runtime.batching.max_batch_size,
        "device": _device(spec),
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def job_name(owner_name: str, key: str, retry: str = "") -> str:
    """``NAME-convert-<10 hex>``: at most 42 + 19 characters (a Job's pods carry the name
    in a label, so it must stay within 63)."""
    digest = hashlib.sha256(f"{key}/{retry}".encode()).hexdigest()[:10]
    return f"{owner_name}-convert-{digest}"


def plan_conversion(world: World, now: dt.datetime) -> ConversionStep:
    spec = world.spec
    assert spec is not None
    ours = sorted(world.jobs)
    convert = spec.model.convert
    if convert is None:
        return ConversionStep(retire=tuple(ours))
    target = spec.model.version
    key = conversion_key(spec)
    records = [r for r in world.previous.versions if r.version == target and r.conversion]
    done = next((r.conversion for r in records if r.conversion is not None
                 and r.conversion.key == key and r.conversion.phase == "Converted"), None)
    if done is not None:
        return ConversionStep("Converted", done, converted_model(spec.model, done),
                              retire=tuple(n for n in ours if n != done.job),
                              message=describe(done))
    name = job_name(world.owner.name, key, world.annotations.get(api.RETRY_ANNOTATION, ""))
    retire = tuple(n for n in ours if n != name)
    before = next((r.conversion for r in records if r.conversion is not None
                   and r.conversion.job == name), None)
    if before is not None and before.phase == "Failed":
        return ConversionStep("Failed", before, retire=retire,
                              message=before.message or "conversion failed")
    at = stamp(now)
    started = before if before is not None else ConversionRecord(
        job=name, key=key, phase="Converting", target=convert.target,
        quantize=convert.quantize, source_sha256=spec.model.sha256, started_at=at)
    job = world.jobs.get(name)
    if job is None:
        return ConversionStep("Converting", started,
                              create=render_job(world.owner, spec, name, key), retire=retire,
                              message=f"converting version {target}: creating Job {name}")
    outcome = job_outcome(job, [p for p in world.job_pods
                                if p["metadata"].get("labels", {}).get(JOB_NAME_LABEL) == name])
    if outcome is None:
        return ConversionStep("Converting", started, retire=retire,
                              message=f"converting version {target} (Job {name})")
    ok, result, message = outcome
    if ok:
        failure = _check_result(result, spec.model)
        if failure is None:
            record = started.model_copy(update={
                "phase": "Converted", "finished_at": at,
                "source_sha256": result.get("sourceSha256") or started.source_sha256,
                "artifact_uri": result["artifactUri"],
                "artifact_sha256": result["artifactSha256"],
                "speedup": _number(result.get("speedup")),
                "speedup_batch1": _number(result.get("speedupBatch1")),
                "accuracy_delta": _number(result.get("accuracyDelta")),
                "tolerance": _number(result.get("tolerance")),
                "compile_seconds": _number(result.get("compileSeconds")),
            })
            return ConversionStep("Converted", record, converted_model(spec.model, record),
                                  retire=retire, message=describe(record))
        message = failure
    failed = started.model_copy(update={
        "phase": "Failed", "finished_at": at, "message": f"Job {name}: {message}"[:1024],
        "accuracy_delta": _number(result.get("accuracyDelta")),
        "tolerance": _number(result.get("tolerance"))})
    return ConversionStep("Failed", failed, retire=retire, message=failed.message or "")


def converted_model(model: api.ModelSource, record: ConversionRecord) -> api.ModelSource:
    """What the target's pods serve once converted: the package, by its URI and digest."""
    assert record.artifact_uri is not None
    return model.model_copy(update={
        "uri": record.artifact_uri, "sha256": record.artifact_sha256,
        "format": api.ModelFormat.AOTI, "entry_point": None, "optimize": None,
        "convert": None})


def describe(record: ConversionRecord) -> str:
    figures = []
    if record.speedup is not None:
        figures.append(f"speed-up x{record.speedup:g}")
    if record.accuracy_delta is not None:
        figures.append(f"accuracy delta {record.accuracy_delta:.2g}")
    return (f"converted to {record.artifact_uri} (sha256 {(record.artifact_sha256 or '')[:12]}"
            f"{', ' + ', '.join(figures) if figures else ''})")


def job_outcome(job: Mapping[str, Any], pods: Sequence[Mapping[str, Any]]
                ) -> tuple[bool, dict[str, Any], str] | None:
    """``(succeeded, reported JSON, message)`` of a finished Job; None while it runs."""
    conditions = {c.get("type"): c for c in (job.get("status") or {}).get("conditions") or []
                  if c.get("status") == "True"}
    finished = conditions.get("Complete") or conditions.get("Failed")
    if finished is None or any(_still_running(pod) for pod in pods):
        return None  # the pod's own end (its report) may reach the index after the Job's
    result, text = _termination(pods)
    if finished.get("type") == "Complete":
        return True, result, text
    message = result.get("error") or text or finished.get("message") \
        or finished.get("reason") or "the conversion Job failed"
    if finished.get("reason") == "DeadlineExceeded":
        message = f"{finished.get('message') or 'the Job ran past its deadline'}" \
                  f"{': ' + text if text else ''}"
    return False, result, str(message)


def _still_running(pod: Mapping[str, Any]) -> bool:
    """A pod that has not terminated as far as the index knows (not deleted, no phase
    Succeeded or Failed)."""
    if pod.get("metadata", {}).get("deletionTimestamp"):
        return False
    return (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed")


def _termination(pods: Sequence[Mapping[str, Any]]) -> tuple[dict[str, Any], str]:
    """The JSON (or, failing that, the text) the container left as its termination
    message: its report, or with ``FallbackToLogsOnError`` its log's tail."""
    for pod in pods:
        for status in (pod.get("status") or {}).get("containerStatuses") or []:
            terminated = (status.get("state") or {}).get("terminated") or {}
            text = str(terminated.get("message") or "").strip()
            if not text:
                continue
            try:
                value = json.loads(text)
            except ValueError:
                return {}, _from_log(text)
            if isinstance(value, dict):
                return value, str(value.get("error") or "")
            return {}, _from_log(text)
    return {}, ""


def _from_log(text: str) -> str:
    """A log's tail as a message: its last line first (a traceback's exception), then as
    much of the tail before it as fits in 1024 characters."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) <= 1:
        return text[-1024:]
    last = lines[-1][:512]
    before = text[: text.rstrip().rfind(lines[-1])].rstrip()
    room = 1024 - len(last) - len(" (the log before it: …)")
    return f"{last} (the log before it: …{before[-room:]})" if room > 0 else last


def _check_result(result: Mapping[str, Any], model: api.ModelSource) -> str | None:
    """Why a reported package cannot be served (None: it can)."""
    missing = [k for k in RESULT_KEYS if not isinstance(result.get(k), str)]
    if missing:
        return f"the Job completed without reporting its package ({', '.join(missing)})"
    if not re.fullmatch(r"[0-9a-f]{64}", result["artifactSha256"]):
        return f"the Job reported an invalid digest {result['artifactSha256']!r}"
    if not str(result["artifactUri"]).startswith(artifact_prefix(model.uri)):
        return (f"the Job reported {result['artifactUri']}, outside "
                f"{artifact_prefix(model.uri)} where it writes")
    return None


def artifact_prefix(uri: str) -> str:
    """Where the packages converted from ``uri`` go: beside it, in ``aoti/``."""
    return uri.rsplit("/", 1)[0] + "/aoti/"


def _device(spec: api.ModelDeploymentSpec) -> str:
    return "cuda" if spec.resources.gpu is not None and spec.resources.gpu.count else "cpu"


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) \
        else None


def render_job(owner: render.Owner, spec: api.ModelDeploymentSpec, name: str,
               key: str) -> dict[str, Any]:
    """The conversion Job: one pod, never restarted (a failed conversion is reported, not
    retried), placed like the model's own pods, its result in its termination message."""
    model = spec.model
    convert = model.convert
    assert convert is not None
    args = ["--source", render.pod_uri(model.uri), "--publish-as", model.uri,
            "--format", str(model.format),
            "--max-batch", str(spec.runtime.batching.max_batch_size),
            "--device", _device(spec)]
    if model.sha256:
        args += ["--sha256", model.sha256]
    if model.entry_point:
        args += ["--entry-point", model.entry_point]
    if convert.quantize != "none":
        args += ["--quantize", convert.quantize]
    if convert.tolerance is not None:
        args += ["--tolerance", repr(convert.tolerance)]
    if model.inputs is not None or model.outputs is not None:
        args += ["--metadata", json.dumps({
            k: [t.model_dump() for t in tensors or ()]
            for k, tensors in (("inputs", model.inputs), ("outputs", model.outputs))},
            separators=(",", ":"))]
    labels = {render.MANAGED_BY: render.MANAGER, CONVERT_LABEL: owner.name}
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": convert.image or spec.runtime.image_or_default(),
        "command": list(COMMAND),
        "args": args,
        # The root is read-only: the download cache and HOME (which libraries create their
        # caches under) on the work volume, and Inductor's build directory on /tmp.
        "env": [{"name": "MODELYARD_CACHE_DIR", "value": render.CACHE_DIR},
                {"name": "HOME", "value": f"{render.CACHE_DIR}/home"}],
        "resources": render.resources(spec),
        "terminationMessagePath": TERMINATION_LOG,
        # its report, or when it dies without one, its log's tail
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [{"name": "work", "mountPath": render.CACHE_DIR},
                         {"name": "tmp", "mountPath": "/tmp"}],
    }
    if spec.runtime.image_pull_policy:
        container["imagePullPolicy"] = spec.runtime.image_pull_policy
    if model.credentials_secret:
        container["envFrom"] = [{"secretRef": {"name": model.credentials_secret}}]
    volumes: list[dict[str, Any]] = [{"name": "work", "emptyDir": {}},
                                     {"name": "tmp", "emptyDir": {}}]
    if claim := render.pvc_claim(model.uri):  # the package goes beside the source: writable
        volumes.append({"name": "model-store", "persistentVolumeClaim": {"claimName": claim}})
        container["volumeMounts"].append(
            {"name": "model-store", "mountPath": f"{render.PVC_MOUNT_ROOT}/{claim}"})
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True, "runAsUser": render.RUNTIME_UID,
            "runAsGroup": render.RUNTIME_UID, "fsGroup": render.RUNTIME_UID,
            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": volumes,
        **render.placement(spec),
    }
    job: dict[str, Any] = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name, "namespace": owner.namespace, "labels": dict(labels),
            "annotations": {"modelyard.dev/version": model.version,
                            "modelyard.dev/conversion-key": key},
            "ownerReferences": [owner.reference()],
        },
        "spec": {
            "backoffLimit": 0,
            "activeDeadlineSeconds": convert.active_deadline_seconds,
            "ttlSecondsAfterFinished": JOB_TTL_S,
            "template": {"metadata": {"labels": dict(labels)}, "spec": pod_spec},
        },
    }
    return render.with_hash(job)

"""The ModelDeployment's status (``modelyard.dev/v1alpha1``) as pydantic models: what the
operator writes, and reads back on its next pass. :mod:`.crd` generates its schema with the
spec's (:mod:`.api`).

Pure data: imports no Kubernetes client.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import ConfigDict, Field

from .api import ApiModel


class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(ApiModel):
    """A metav1.Condition."""

    type: str = Field(..., description="Ready, Progressing or Degraded.")
    status: ConditionStatus = Field(..., description="True, False or Unknown.")
    reason: str = Field(..., description="CamelCase reason for the last transition.")
    message: str = Field("", description="Human-readable detail.")
    last_transition_time: str = Field(..., description="When status last changed (RFC 3339).")
    observed_generation: int | None = Field(None, description="Generation this was computed at.")


class VersionPhase(StrEnum):
    PENDING = "Pending"
    CANARY = "Canary"
    STABLE = "Stable"
    SUPERSEDED = "Superseded"
    ROLLED_BACK = "RolledBack"
    FAILED = "Failed"


class WindowFigures(ApiModel):
    """What the canary analysis measured of one version over the judged window."""

    requests: int = Field(..., description="Requests in the judged window.")
    error_rate: float | None = Field(None, description="Share of 5xx answers.")
    p99_ms: float | None = Field(None, description="99th percentile latency, milliseconds.")
    ttft_p95_ms: float | None = Field(
        None, description="Generative engines: 95th percentile time to first token, "
                          "milliseconds.")
    itl_p95_ms: float | None = Field(
        None, description="Generative engines: 95th percentile inter-token latency, "
                          "milliseconds.")


class AnalysisFigures(WindowFigures):
    """What the canary analysis measured when it decided: the new version's figures, and
    the stable version's over the same window when a threshold compared them."""

    stable: WindowFigures | None = Field(
        None, description="The stable version's figures over the same window (relative "
                          "thresholds).")


class ConversionRecord(ApiModel):
    """A version's conversion (spec.model.convert): its Job, and what it measured."""

    job: str = Field(..., description="The conversion Job.")
    key: str = Field(..., description="Digest of what was converted (source and settings).")
    phase: Literal["Converting", "Converted", "Failed"] = Field(
        ..., description="Converting, Converted or Failed.")
    target: str = Field("aoti", description="What it converts to.")
    quantize: str = Field("none", description="The quantisation asked for.")
    source_sha256: str | None = Field(None, description="SHA-256 of the source converted.")
    artifact_uri: str | None = Field(None, description="The package written (content-"
                                                       "addressed: named by its digest).")
    artifact_sha256: str | None = Field(None, description="SHA-256 of the package.")
    speedup: float | None = Field(
        None, description="Package items/s over the source's, at the batching limit.")
    speedup_batch1: float | None = Field(
        None, description="Source latency over the package's, at batch 1.")
    accuracy_delta: float | None = Field(
        None, description="Largest output difference against the source (verification).")
    tolerance: float | None = Field(None, description="The accuracy delta accepted.")
    compile_seconds: float | None = Field(None, description="Time to export and compile.")
    started_at: str = Field(..., description="When the conversion started.")
    finished_at: str | None = Field(None, description="When it finished.")
    message: str | None = Field(None, description="Why it failed.")


class VersionRecord(ApiModel):
    """One entry of the version ledger."""

    version: str = Field(..., description="Model version.")
    uri: str = Field(..., description="Model URI of this version.")
    sha256: str | None = Field(None, description="Expected digest, when given.")
    phase: VersionPhase = Field(..., description="Where this version stands.")
    deployed_at: str = Field(..., description="When this version was first deployed.")
    promoted_at: str | None = Field(None, description="When it became the stable version.")
    finished_at: str | None = Field(None, description="When it stopped serving.")
    reason: str | None = Field(None, description="Why it is in this phase.")
    analysis: AnalysisFigures | None = Field(
        None, description="The canary analysis figures that decided this phase.")
    conversion: ConversionRecord | None = Field(
        None, description="Its conversion (spec.model.convert): the package it serves.")


class CanaryStatus(ApiModel):
    """Where a rollout of a new version stands (a canary, or a blue-green preview)."""

    version: str = Field(..., description="Version being rolled out.")
    strategy: Literal["Canary", "BlueGreen"] = Field(
        "Canary", description="Canary (traffic moves in steps) or BlueGreen (a preview).")
    weight: int = Field(..., description="Traffic share the current step moves to, in percent.")
    step: int = Field(..., description="Current step (1-based); past the last step: promoting.")
    started_at: str = Field(..., description="When the canary started.")
    step_started_at: str = Field(..., description="When the current step started.")
    reached_at: str | None = Field(
        None, description="When the current step's weight was reached (its pause runs from here).")
    progress: str = Field("", description="Human summary, e.g. 50% (step 2/3).")
    paused: bool = Field(False, description="Waiting for a manual promote.")


class HandledRequests(ApiModel):
    """The values of the control annotations the operator has acted on."""

    abort: str | None = Field(None, description="Last modelyard.dev/abort value handled.")
    retry: str | None = Field(None, description="Last modelyard.dev/retry value handled.")


class AutoscalerStatus(ApiModel):
    """What the autoscaler decided, and why."""

    desired_replicas: int = Field(..., description="Replicas the model should have now.")
    metric: str = Field(..., description="The metric it scales on.")
    metric_value: float | None = Field(
        None, description="The metric (over the stable window) when replicas last changed.")
    reason: str = Field("", description="Why replicas last changed.")
    last_scale_time: str | None = Field(None, description="When replicas last changed.")
    panic: bool = Field(False, description="Scaling up fast on a spike; no scale-down.")
    state: dict[str, Any] = Field(
        default_factory=dict,
        description="The algorithm's memory, so a restarted operator carries on.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})


class ModelDeploymentStatus(ApiModel):
    """Observed state, written only by the operator."""

    model_config = ConfigDict(extra="ignore")

    observed_generation: int | None = Field(None, description="Generation last reconciled.")
    conditions: list[Condition] = Field(default_factory=list, description="Ready, Progressing, "
                                        "Degraded.")
    url: str | None = Field(None, description="In-cluster URL of the model's endpoint.")
    stable_version: str | None = Field(None, description="Version serving all traffic.")
    target_version: str | None = Field(None, description="Version being rolled out to.")
    canary: CanaryStatus | None = Field(None, description="The canary in progress, if any.")
    replicas: int = Field(0, description="Runtime pods that exist.")
    ready_replicas: int = Field(0, description="Runtime pods ready to serve.")
    selector: str | None = Field(None, description="Label selector of the pods (scale).")
    gpus: int = Field(0, description="GPUs requested by the model's scheduled pods.")
    versions: list[VersionRecord] = Field(default_factory=list,
                                          description="Version history, newest first.")
    autoscaler: AutoscalerStatus | None = Field(
        None, description="The autoscaler's last decision (with spec.autoscaling).")
    traffic_split: Literal["gateway", "replicas"] | None = Field(
        None, description="How traffic is split between versions: gateway (HTTPRoute "
                          "weights) or replicas (replica ratio behind the stable Service).")
    handled_requests: HandledRequests | None = Field(
        None, description="Control annotations already acted on (abort, retry).")



def parse_status(status: dict[str, Any] | None) -> ModelDeploymentStatus:
    return ModelDeploymentStatus.model_validate(status or {})

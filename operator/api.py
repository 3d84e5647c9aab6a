"""The ModelDeployment API (``modelyard.dev/v1alpha1``) as pydantic models.

These models are the single source of truth for the resource: :mod:`.crd`
generates ``crds/modeldeployments.modelyard.dev.yaml`` from them (field
descriptions, defaults, enums and the CEL rules in ``x-kubernetes-validations``),
and the operator parses live objects with them. Everything that can be checked at
``kubectl apply`` time is expressed here as a schema rule, with a message written
for the person who typed the manifest; what only the operator can judge (a URI
that 404s, a pod that cannot be scheduled) is reported in status instead.

The status the operator writes is in :mod:`.api_status`.

Pure data: imports no Kubernetes client.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.alias_generators import to_camel

from . import signals

GROUP = "modelyard.dev"
VERSION = "v1alpha1"
KIND = "ModelDeployment"
PLURAL = "modeldeployments"
# Manual rollout controls: annotations, so plain kubectl, GitOps and Argo CD actions can set them.
PROMOTE_ANNOTATION = "modelyard.dev/promote"  # value: the version whose rollout to promote
ABORT_ANNOTATION = "modelyard.dev/abort"  # any new value: abort the rollout in progress
RETRY_ANNOTATION = "modelyard.dev/retry"  # any new value: roll the target out again
SINGULAR = "modeldeployment"
SHORT_NAMES = ("md", "mds")
API_VERSION = f"{GROUP}/{VERSION}"
DEFAULT_RUNTIME_IMAGE = "modelyard-runtime:0.1.0"
DEFAULT_VLLM_IMAGE = "modelyard-vllm:0.1.0"
MAX_NAME_LENGTH = 42  # leaves room for "-v<version slug>" within a 63-character Service name
HISTORY_LIMIT = 20

_LABEL_VALUE = r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
_DNS_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
_IMPORT_PATH = r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_.]*$"


def _cel(rule: str, message: str, field_path: str | None = None) -> dict[str, str]:
    out = {"rule": rule, "message": message}
    if field_path:
        out["fieldPath"] = field_path
    return out


def _rules(*rules: dict[str, str]) -> dict[str, Any]:
    return {"x-kubernetes-validations": list(rules)}


_OBJECT_DEFAULT: dict[str, Any] = {"default": {}}  # so nested defaults apply when omitted

_QUANTITY_SCHEMA: dict[str, Any] = {
    "x-kubernetes-int-or-string": True,
    "anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 64}],
    "x-kubernetes-validations": [
        _cel("isQuantity(string(self))",
             "must be a Kubernetes quantity such as 4, 500m, 16Gi")
    ],
}


class ApiModel(BaseModel):
    """The base of every API model (spec here, status in :mod:`.api_status`): camelCase
    names on the wire, unknown fields refused."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid",
        use_enum_values=True, validate_default=True,
    )


# --------------------------------------------------------------------------- spec


class ModelFormat(StrEnum):
    TORCHSCRIPT = "torchscript"
    EXPORT = "export"
    SAFETENSORS = "safetensors"
    HF = "hf"  # a Hugging Face-style directory, served by a generative engine
    AOTI = "aoti"  # an AOTInductor package (modelyard convert): compiled ahead of time


class Engine(StrEnum):
    MODELYARD = "modelyard"  # modelyard's PyTorch runtime: tensors in, tensors out (OIP)
    VLLM = "vllm"  # vLLM behind its OpenAI-compatible API: generative models


class Optimize(ApiModel):
    """Transformations the runtime applies when it loads the model."""

    dtype: Literal["float32", "float16", "bfloat16"] | None = Field(
        None, description="Cast floating-point weights and inputs to this dtype at load.")
    quantize: Literal["dynamic-int8"] | None = Field(
        None, description="Dynamic int8 quantisation of linear layers (CPU only).")
    compile: bool = Field(False, description="Run torch.compile on the model before warm-up.")


class Convert(ApiModel):
    """Convert each new version before it rolls out: a Job on a node like the model's own
    compiles the source into an AOTInductor package (``modelyard convert``), verifies it
    against the source within ``tolerance``, writes it next to the source (same store,
    named by its digest), and the new version's pods serve the package. A conversion that
    fails stops the rollout; the stable version keeps serving (docs/rollouts.md)."""

    target: Literal["aoti"] = Field(
        "aoti", description="What to convert to: aoti (an AOTInductor package for the "
                            "model's device: CUDA with resources.gpu, else CPU).")
    quantize: Literal["none", "int8-weight-only", "int8-dynamic", "float8-dynamic"] = Field(
        "none", description="torchao quantisation: int8-dynamic (CPU linear layers at "
                            "batches above a few), int8-weight-only (memory-bound linear "
                            "layers, batch 1-4), float8-dynamic (CUDA, compute capability "
                            ">= 8.9). Needs format safetensors (an exported program has no "
                            "nn.Linear left to rewrite).")
    tolerance: float | None = Field(
        None, ge=0, le=1,
        description="Largest accepted output difference against the source (relative to "
                    "the largest reference value; for integer outputs the share that "
                    "differs). Default 1e-4, quantised 5e-2. A package outside it is never "
                    "written and the rollout stops.")
    image: str | None = Field(
        None, min_length=1, max_length=512,
        description="Image of the conversion Job; it needs modelyard's runtime, a C++ "
                    "compiler and, to quantise, torchao (the extra 'convert'), as the "
                    "runtime image has them. Default: runtime.image.")
    active_deadline_seconds: int = Field(
        1800, ge=60, le=86_400,
        description="How long the conversion Job may run before it counts as failed.")


# The runtime's tensor datatypes (modelyard.runtime.protocol.DATATYPES, the OIP names).
TensorDatatype = Literal["FP32", "FP16", "BF16", "FP64", "INT64", "INT32", "INT16", "INT8",
                         "UINT8", "BOOL"]
_Dim = Annotated[int, Field(ge=-1, le=2**31 - 1, description="A dimension; -1: dynamic.")]


class TensorSignature(ApiModel):
    """One input or output of the model as OIP clients read it in the model metadata."""

    name: str = Field(..., min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:/-]+$",
                      description="The tensor's name (for an input: the forward argument's).")
    datatype: TensorDatatype = Field(..., description="OIP datatype.")
    shape: list[_Dim] = Field(
        ..., min_length=1, max_length=16,
        description="Dimensions; -1 marks a dynamic one (the first, the batch, usually -1).")


# unique names, as the API server checks a list keyed by a field
_SIGNATURES_UNIQUE: dict[str, Any] = {"x-kubernetes-list-type": "map",
                                      "x-kubernetes-list-map-keys": ["name"]}


class ModelSource(ApiModel):
    """Which model to serve and where to fetch it from."""

    name: str | None = Field(
        None, max_length=63, pattern=_DNS_LABEL,
        description="Name the model is served under (OIP model name). Defaults to metadata.name.")
    version: str = Field(
        ..., min_length=1, max_length=63, pattern=_LABEL_VALUE,
        description="Version of the model. Any change starts a rollout to the new version. "
                    "Letters, digits, '.', '_' and '-', at most 63 characters.")
    uri: str = Field(
        ..., min_length=1, max_length=2048,
        description="Where the model file is: s3://BUCKET/KEY, http(s)://..., "
                    "pvc://CLAIM/PATH or file:///PATH (local testing). For format hf, the "
                    "directory (prefix) holding config.json, the safetensors shards and the "
                    "tokenizer files.",
        json_schema_extra=_rules(_cel(
            "self.matches('^(s3|http|https|pvc|file)://.+')",
            "uri must start with s3://, http://, https://, pvc:// or file://")),
    )
    format: ModelFormat = Field(
        ModelFormat.TORCHSCRIPT,
        description="aoti (an AOTInductor package from `modelyard convert`: compiled ahead "
                    "of time, the fastest), export (torch.export .pt2), safetensors "
                    "(weights plus an entryPoint that builds the module), torchscript "
                    "(torch.jit.save; legacy, deprecated by PyTorch) or hf (a Hugging "
                    "Face-style directory for a generative engine; runtime.engine vllm).")
    sha256: str | None = Field(
        None, pattern=r"^[a-f0-9]{64}$",
        description="Expected SHA-256 of the model file (64 lowercase hex digits); "
                    "verified before the model is served. For format hf: the SHA-256 of the "
                    "directory's SHA256SUMS manifest in canonical form (what `modelyard digest "
                    "DIR` prints); every file is verified against the manifest.")
    entry_point: str | None = Field(
        None, max_length=256, pattern=_IMPORT_PATH,
        description="module:callable returning the torch.nn.Module for safetensors weights.")
    credentials_secret: str | None = Field(
        None, max_length=253,
        description="Secret in the same namespace whose keys become the runtime's environment "
                    "(e.g. AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL).")
    optimize: Optimize | None = Field(None, description="Load-time optimisations.")
    inputs: list[TensorSignature] | None = Field(
        None, min_length=1, max_length=64, json_schema_extra=_SIGNATURES_UNIQUE,
        description="Declared inputs, in the forward's order: what the model metadata "
                    "serves and what requests are validated against (a TorchScript file "
                    "carries no shapes). With every shape but the batch fixed, the runtime "
                    "warms up on them and learns undeclared outputs. Overrides metadata "
                    "inside the model file.")
    outputs: list[TensorSignature] | None = Field(
        None, min_length=1, max_length=64, json_schema_extra=_SIGNATURES_UNIQUE,
        description="Declared outputs, in the model's order; default: learned at warm-up.")
    convert: Convert | None = Field(
        None, description="Convert each new version ahead of time before its pods start "
                          "(format export or safetensors; a store the Job can write: s3://, "
                          "pvc:// or file://).")

    model_config = ConfigDict(json_schema_extra=_rules(
        _cel("!has(self.format) || self.format != 'safetensors' || has(self.entryPoint)",
             "format safetensors needs entryPoint (module:callable that builds the model)",
             ".entryPoint"),
        _cel("!has(self.format) || self.format != 'hf' || "
             "(!has(self.entryPoint) && !has(self.optimize))",
             "format hf is served by its engine: entryPoint and optimize do not apply "
             "(set the engine's settings in runtime.vllm)"),
        _cel("!has(self.format) || self.format != 'aoti' || "
             "(!has(self.entryPoint) && !has(self.optimize))",
             "format aoti is compiled and quantised by `modelyard convert`: entryPoint and "
             "optimize do not apply"),
        _cel("!has(self.format) || self.format != 'hf' || "
             "(!has(self.inputs) && !has(self.outputs))",
             "format hf is served by its engine's OpenAI API: inputs and outputs are for "
             "tensor models"),
        _cel("!self.uri.startsWith('pvc://') || self.uri.matches('^pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?/.+')",
             "a pvc:// uri must look like pvc://CLAIM/PATH/TO/MODEL", ".uri"),
        _cel("!has(self.convert) || (has(self.format) && "
             "(self.format == 'export' || self.format == 'safetensors'))",
             "convert compiles an exported program or safetensors weights: set format "
             "export or safetensors (format aoti is already converted)", ".convert"),
        _cel("!has(self.convert) || !self.uri.matches('^https?://')",
             "convert writes its package next to the source, and an http(s) store is read "
             "only: keep the source in s3://, pvc:// or file://", ".convert"),
        _cel("!has(self.convert) || !has(self.optimize)",
             "with convert the pods serve the compiled package: optimize does not apply "
             "(quantise with convert.quantize)", ".optimize"),
        _cel("!has(self.convert) || !has(self.convert.quantize) || "
             "self.convert.quantize == 'none' || self.convert.quantize == 'int8-dynamic' || "
             "(has(self.format) && self.format == 'safetensors')",
             "an exported program is quantised as a graph (PT2E), which does int8-dynamic "
             "only: for int8-weight-only or float8-dynamic convert from format safetensors",
             ".convert.quantize"),
    ))


class Batching(ApiModel):
    """Dynamic batching of concurrent requests into one forward pass."""

    max_batch_size: int = Field(
        32, ge=1, le=4096, description="Most requests (items along dim 0) run together.")
    max_delay_ms: float = Field(
        5, ge=0, le=10_000,
        description="Longest a request waits for others to join its batch while the model is busy.")


class QueueBounds(ApiModel):
    """The bounds of the runtime's batch queue (engine modelyard). Past them a request is
    refused at once with 503 and Retry-After, so latency and memory stay bounded under
    overload and the caller (or a retrying client) goes elsewhere."""

    max_items: int = Field(
        256, ge=0, le=1_000_000,
        description="Most items (rows along dim 0) waiting for a batch; 0: unbounded.")
    max_wait_ms: float = Field(
        0, ge=0, le=600_000,
        description="Longest a request may wait for a batch: one the queue ahead of it "
                    "predicts would wait longer is refused on arrival, one still waiting when "
                    "it passes is answered 503; 0: no bound.")


class Explain(ApiModel):
    """Model explanations (engine modelyard): POST /v2/models/{name}/explain answers an OIP
    inference request with the outputs and, per input, Captum's attributions. Each costs
    steps forward and backward passes per row, on threads apart from inference, bounded
    here; past maxConcurrent a request gets 503 with Retry-After (docs/runtime.md)."""

    enabled: bool = Field(False, description="Serve the explain route; off: it answers 404.")
    method: Literal["integrated_gradients", "saliency"] = Field(
        "integrated_gradients",
        description="A request's default: integrated_gradients (Captum's IntegratedGradients "
                    "from a zeros baseline) or saliency (the gradient's magnitude: one "
                    "backward pass, cheaper, coarser).")
    steps: int = Field(
        32, ge=2, le=512,
        description="Integrated gradients' steps: a request's default and the most it may ask.")
    max_batch_size: int = Field(
        8, ge=1, le=256, description="Most rows (items along dim 0) in one explain request.")
    max_concurrent: int = Field(
        1, ge=1, le=16, description="Explanations computed at once per replica.")


# Flags modelyard sets from first-class fields or itself: extraArgs may not repeat them.
VLLM_OWNED_FLAGS = ("--model", "--served-model-name", "--host", "--port", "--dtype",
                    "--max-model-len", "--gpu-memory-utilization", "--tensor-parallel-size",
                    "--api-key", "--download-dir", "--tokenizer")
# Flags that would write prompts or completions to the pod's log: refused (docs/security.md).
VLLM_PAYLOAD_LOG_FLAGS = ("--enable-log-requests", "--enable-log-outputs")


_EngineArg = Annotated[str, Field(max_length=256, description="One flag or value.")]


class VllmSettings(ApiModel):
    """vLLM's settings that matter, validated; extraArgs passes the rest through."""

    max_model_len: int | None = Field(
        None, ge=16, le=4_194_304,
        description="Longest sequence (prompt plus completion) in tokens; default: the "
                    "model's own (config.json).")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="Weights and activations dtype; auto follows the model's config.")
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=0.99,
        description="Share of each GPU's memory vLLM may use (weights plus KV cache); "
                    "default: vLLM's (0.9).")
    extra_args: list[_EngineArg] = Field(
        default_factory=list, max_length=32,
        description="Further vLLM flags, passed as they are (e.g. --enable-prefix-caching). "
                    "Tensor parallelism is the GPUs per replica (resources.gpu.count).",
        json_schema_extra=_rules(_cel(
            "self.all(a, !(" + " || ".join(
                f"a == '{flag}' || a.startsWith('{flag}=')" for flag in VLLM_OWNED_FLAGS)
            + "))",
            "runtime.vllm.extraArgs may not set a flag modelyard sets itself: "
            + ", ".join(VLLM_OWNED_FLAGS)), _cel(
            "self.all(a, !(" + " || ".join(
                f"a == '{flag}' || a.startsWith('{flag}=')" for flag in VLLM_PAYLOAD_LOG_FLAGS)
            + "))",
            "runtime.vllm.extraArgs may not turn on vLLM's logging of prompts and outputs: "
            + ", ".join(VLLM_PAYLOAD_LOG_FLAGS))),
    )


class RuntimeSpec(ApiModel):
    """The serving engine that runs in each pod."""

    engine: Engine = Field(
        Engine.MODELYARD,
        description="modelyard: the PyTorch runtime (tensor models, Open Inference Protocol); "
                    "vllm: vLLM behind its OpenAI-compatible API (generative models, format "
                    "hf).")
    image: str | None = Field(
        None, min_length=1, max_length=512,
        description=f"Container image; default {DEFAULT_RUNTIME_IMAGE} for engine modelyard, "
                    f"{DEFAULT_VLLM_IMAGE} for engine vllm.")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = Field(
        None, description="Image pull policy of the runtime container.")
    batching: Batching = Field(default_factory=Batching, description="Dynamic batching.",
                               json_schema_extra=_OBJECT_DEFAULT)
    queue: QueueBounds = Field(
        default_factory=QueueBounds, json_schema_extra=_OBJECT_DEFAULT,
        description="Bounds of the batch queue: overload is refused (503, Retry-After), "
                    "not queued without limit.")
    handler: str | None = Field(
        None, max_length=256, pattern=_IMPORT_PATH,
        description="module:Class with pre/post-processing hooks, importable in the image.")
    port: int = Field(8080, ge=1024, le=65535, description="Port the runtime listens on.")
    grpc_port: int | None = Field(
        None, ge=1024, le=65535,
        description="Also serve the Open Inference Protocol over gRPC (the standard "
                    "inference.GRPCInferenceService) on this port, conventionally 8081; the "
                    "model's Service exposes it as port 'grpc' (HTTP/2 cleartext). Engine "
                    "modelyard only; unset: REST only.")
    env: dict[str, str] = Field(
        default_factory=dict, description="Extra environment variables for the runtime.")
    explain: Explain | None = Field(
        None, description="Model explanations (Captum attributions); off when unset. Not "
                          "for format aoti, model.convert nor model.optimize.quantize, which "
                          "leave no gradients.")
    vllm: VllmSettings | None = Field(None, description="Engine vllm: its settings.")

    model_config = ConfigDict(json_schema_extra=_rules(
        _cel("!has(self.vllm) || (has(self.engine) && self.engine == 'vllm')",
             "runtime.vllm is set but runtime.engine is not vllm", ".vllm"),
        _cel("!has(self.engine) || self.engine != 'vllm' || !has(self.handler)",
             "runtime.handler is for engine modelyard; vLLM has no handler hook", ".handler"),
        _cel("!has(self.grpcPort) || !has(self.engine) || self.engine != 'vllm'",
             "runtime.grpcPort is for engine modelyard; vLLM serves its OpenAI API over "
             "HTTP", ".grpcPort"),
        _cel("!has(self.grpcPort) || self.grpcPort != (has(self.port) ? self.port : 8080)",
             "runtime.grpcPort must differ from runtime.port", ".grpcPort"),
        _cel("!has(self.explain) || !self.explain.enabled || !has(self.engine) || "
             "self.engine != 'vllm'",
             "runtime.explain is for engine modelyard (tensor models)", ".explain"),
    ))

    def image_or_default(self) -> str:
        if self.image:
            return self.image
        return DEFAULT_VLLM_IMAGE if self.engine == Engine.VLLM else DEFAULT_RUNTIME_IMAGE


class GpuRequest(ApiModel):
    """GPUs per replica and, optionally, which product."""

    count: int = Field(0, ge=0, le=64, description="GPUs per replica (nvidia.com/gpu).")
    product: str | None = Field(
        None, max_length=128,
        description="Required GPU product, matched against the node label "
                    "nvidia.com/gpu.product (e.g. NVIDIA-H100-80GB-HBM3).")

    model_config = ConfigDict(json_schema_extra=_rules(
        _cel("!has(self.product) || (has(self.count) && self.count > 0)",
             "gpu.product is set but gpu.count is 0: ask for at least one GPU", ".count"),
    ))


class Resources(ApiModel):
    """Resources of each replica (requests equal limits)."""

    gpu: GpuRequest | None = Field(None, description="GPUs per replica.")
    cpu: Annotated[int | str | None, Field(json_schema_extra=_QUANTITY_SCHEMA)] = Field(
        None, description="CPU per replica (request and limit), e.g. 4 or 500m.")
    memory: Annotated[int | str | None, Field(json_schema_extra=_QUANTITY_SCHEMA)] = Field(
        None, description="Memory per replica (request and limit), e.g. 16Gi.")


class Toleration(ApiModel):
    """A core/v1 Toleration."""

    key: str | None = Field(None, max_length=316, description="Taint key to tolerate.")
    operator: Literal["Exists", "Equal"] | None = Field(None, description="Exists or Equal.")
    value: str | None = Field(None, max_length=63, description="Taint value (Equal).")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect; empty matches all.")
    toleration_seconds: int | None = Field(None, description="For NoExecute taints.")


class Scheduling(ApiModel):
    """Where replicas may run, beyond what the GPU request implies."""

    node_selector: dict[str, str] = Field(default_factory=dict,
                                          description="Extra node labels replicas require.")
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=32,
        description="Extra tolerations. The nvidia.com/gpu taint is tolerated automatically "
                    "when GPUs are requested.")
    affinity: dict[str, Any] | None = Field(
        None, description="A core/v1 Affinity, passed to the pods as it is.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})
    priority_class_name: str | None = Field(None, max_length=253,
                                            description="PriorityClass of the pods.")
    runtime_class_name: str | None = Field(
        None, max_length=253, description="RuntimeClass of the pods, e.g. nvidia.")


class Autoscaling(ApiModel):
    """Scale replicas from live inference metrics (the operator's own autoscaler; see
    docs/autoscaling.md for the algorithm)."""

    min_replicas: int = Field(1, ge=0, le=1000, description="Fewest replicas; 0 scales to zero.")
    max_replicas: int = Field(..., ge=1, le=1000, description="Most replicas.")
    metric: str = Field(
        "concurrency",
        description="Signal to scale on: " + ", ".join(
            s.summary() for s in signals.SIGNALS.values()) + ".",
        json_schema_extra={"enum": list(signals.NAMES)})
    target: float = Field(..., gt=0,
                          description="Target value of the metric per replica, in its unit.")
    scale_down_delay_seconds: int = Field(
        300, ge=0, le=86_400, description="How long load must stay low before scaling down.")
    scale_to_zero_delay_seconds: int = Field(
        300, ge=0, le=86_400,
        description="With minReplicas 0: how long the model must be idle (no request in "
                    "flight or waiting) before it goes to zero.")
    stable_window_seconds: int = Field(
        60, ge=2, le=3600, description="Window the metric is averaged over.")
    panic_window_percentage: float = Field(
        10, gt=0, le=100, description="Panic window, as a share of the stable window.")
    panic_threshold_percentage: float = Field(
        200, ge=110, le=1000,
        description="Load, in percent of what the ready replicas carry at target, over the "
                    "panic window that makes the autoscaler panic (scale up fast, never down).")
    tolerance: float = Field(0.1, ge=0, le=0.9,
                             description="No change while the load is this close to target.")
    max_scale_up_rate: float = Field(10, ge=1, le=1000,
                                     description="A decision may multiply replicas by this.")
    max_scale_down_rate: float = Field(2, ge=1, le=1000,
                                       description="A decision may divide replicas by this.")
    source: Literal["pods", "prometheus"] = Field(
        "pods", description="pods: scrape each runtime pod; prometheus: query prometheusUrl.")
    prometheus_url: str | None = Field(None, max_length=2048, pattern=r"^https?://.+",
                                       description="Prometheus HTTP API base URL.")

    model_config = ConfigDict(json_schema_extra=_rules(
        _cel("!has(self.minReplicas) || self.minReplicas <= self.maxReplicas",
             "autoscaling.minReplicas must not exceed autoscaling.maxReplicas", ".minReplicas"),
        _cel("!has(self.source) || self.source != 'prometheus' || has(self.prometheusUrl)",
             "autoscaling.source prometheus needs prometheusUrl", ".prometheusUrl"),
    ))

    @classmethod
    def engine_rule(cls) -> dict[str, str]:
        """The spec-level CEL rule that the metric is one the model's engine exports (the
        engine is outside this object, so the rule is the spec's); from the registry."""
        def listed(engine: str) -> str:
            return "[" + ", ".join(f"'{n}'" for n in signals.for_engine(engine)) + "]"

        only = [s for s in signals.SIGNALS.values() if s.engines != signals.ENGINES]
        return _cel(
            "!has(self.autoscaling) || !has(self.autoscaling.metric) || "
            f"((has(self.runtime.engine) && self.runtime.engine == '{signals.VLLM}') ? "
            f"self.autoscaling.metric in {listed(signals.VLLM)} : "
            f"self.autoscaling.metric in {listed(signals.MODELYARD)})",
            "; ".join(f"{s.name} is exported by runtime.engine {' or '.join(s.engines)} only"
                      for s in only), ".autoscaling.metric")

    @field_validator("metric")
    @classmethod
    def _registered(cls, value: str) -> str:
        signals.signal(value)  # the CRD's enum refuses others first; this is for older CRDs
        return value


class RolloutStrategy(StrEnum):
    ROLLING_UPDATE = "RollingUpdate"
    CANARY = "Canary"
    BLUE_GREEN = "BlueGreen"


class CanaryStep(ApiModel):
    """One canary step: a traffic weight held for a while (or until promoted)."""

    weight: int = Field(..., ge=0, le=100, description="Share of traffic for the new version.")
    pause_seconds: int | None = Field(
        None, ge=0, le=86_400,
        description="How long to hold this step; absent means wait for a manual promote.")


class Analysis(ApiModel):
    """Thresholds a canary must meet at each step, from the serving pods' metrics. The
    error rate, latency and request count apply to every engine; time to first token and
    inter-token latency to generative engines (runtime.engine vllm)."""

    max_error_rate: float = Field(0.01, ge=0, le=1, description="Highest acceptable error ratio.")
    max_latency_p99_ms: float | None = Field(
        None, gt=0, description="Highest acceptable p99 request latency (engine vllm: arrival "
                                "to last token).")
    max_error_rate_increase: float | None = Field(
        None, ge=0, le=1,
        description="Canary versus stable: the new version's error ratio may exceed the stable "
                    "version's, over the same window, by at most this (e.g. 0.01).")
    max_latency_p99_ratio: float | None = Field(
        None, ge=1, le=100,
        description="Canary versus stable: the new version's p99 may be at most this multiple "
                    "of the stable version's over the same window (e.g. 1.5).")
    max_ttft_p95_ms: float | None = Field(
        None, gt=0,
        description="Engine vllm: highest acceptable p95 time to first token (arrival to the "
                    "first generated token), milliseconds.")
    max_itl_p95_ms: float | None = Field(
        None, gt=0,
        description="Engine vllm: highest acceptable p95 inter-token latency (between two "
                    "tokens of a streamed answer), milliseconds.")
    max_ttft_p95_ratio: float | None = Field(
        None, ge=1, le=100,
        description="Engine vllm, canary versus stable: the new version's p95 time to first "
                    "token may be at most this multiple of the stable version's over the same "
                    "window (e.g. 1.5).")
    max_itl_p95_ratio: float | None = Field(
        None, ge=1, le=100,
        description="Engine vllm, canary versus stable: the new version's p95 inter-token "
                    "latency may be at most this multiple of the stable version's over the "
                    "same window (e.g. 1.5).")
    min_requests: int = Field(0, ge=0, description="Requests needed before judging a step "
                              "(from each version, when comparing with stable).")
    max_wait_seconds: int = Field(
        600, ge=0, le=86_400,
        description="How long a step may wait for minRequests after its pause; past that the "
                    "canary is rolled back as inconclusive.")
    source: Literal["pods", "prometheus"] = Field(
        "pods", description="pods: scrape each ready serving pod's /metrics; prometheus: query "
                            "prometheusUrl (targets labelled namespace, model_deployment, "
                            "version: see docs/operations.md).")
    prometheus_url: str | None = Field(
        None, max_length=2048, pattern=r"^https?://.+",
        description="Prometheus HTTP API base URL, e.g. http://prometheus.monitoring:9090.")

    model_config = ConfigDict(json_schema_extra=_rules(
        _cel("!has(self.source) || self.source != 'prometheus' || has(self.prometheusUrl)",
             "analysis.source prometheus needs prometheusUrl", ".prometheusUrl"),
    ))

    # Thresholds only a generative engine's metrics can judge (wire names).
    GENERATIVE_FIELDS: ClassVar[tuple[str, ...]] = (
        "maxTtftP95Ms", "maxItlP95Ms", "maxTtftP95Ratio", "maxItlP95Ratio")

    @property
    def compares_with_stable(self) -> bool:
        """Whether a threshold is relative: the stable version is measured too."""
        return any(v is not None for v in (
            self.max_error_rate_increase, self.max_latency_p99_ratio, self.max_ttft_p95_ratio,
            self.max_itl_p95_ratio))

    @classmethod
    def engine_rule(cls) -> dict[str, str]:
        """The spec-level CEL rule refusing generative-only thresholds on engine modelyard
        (the engine is outside this object, so the rule is the spec's)."""
        fields = " || ".join(f"has(self.rollout.analysis.{f})" for f in cls.GENERATIVE_FIELDS)
        return _cel(
            "!has(self.rollout.analysis) || (has(self.runtime.engine) && "
            f"self.runtime.engine == 'vllm') || !({fields})",
            ", ".join(cls.GENERATIVE_FIELDS) + " judge a generative model's tokens: they need "
            "runtime.engine vllm", ".rollout.analysis")


class Rollout(ApiModel):
    """How a new version replaces the serving one."""

    strategy: RolloutStrategy = Field(RolloutStrategy.ROLLING_UPDATE,
                                      description="How a new version replaces the old one.")
    steps: list[CanaryStep] = Field(default_factory=list, max_length=20,
                                    description="Canary steps, in order.")
    analysis: Analysis | None = Field(None, description="Metric thresholds judged at each step.")
    max_surge_gpus: int | None = Field(
        None, ge=0, le=1024, alias="maxSurgeGPUs",
        description="GPUs a rollout may hold beyond steady state. Default: one replica's worth "
                    "for Canary, a full second copy (replicas x GPUs) for BlueGreen.")
    auto_promote_seconds: int | None = Field(
        None, ge=0, le=86_400,
        description="BlueGreen: promote once the preview has been fully ready this long (and "
                    "its analysis passed); absent means wait for a manual promote.")

    model_config = ConfigDict(json_schema_extra=_rules(
        _cel("!has(self.strategy) || self.strategy != 'Canary' || "
             "(has(self.steps) && size(self.steps) > 0)",
             "strategy Canary needs at least one step", ".steps"),
        _cel("!has(self.steps) || self.steps.map(s, s.weight).isSorted()",
             "canary step weights must not decrease from one step to the next", ".steps"),
    ))


class GatewayRef(ApiModel):
    """The Gateway (Gateway API) whose listener serves the model's HTTPRoute."""

    name: str = Field(..., min_length=1, max_length=253, description="Gateway name.")
    namespace: str | None = Field(None, max_length=63,
                                  description="Gateway namespace; default: the model's.")
    section_name: str | None = Field(None, max_length=253,
                                     description="Listener of the Gateway to attach to.")


_SECRET_NAME = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
VLLM_API_KEY_ENTRY = "api-key"  # the Secret entry the vLLM engine reads its one key from


class Auth(ApiModel):
    """Who may call the model: API keys, sent as ``Authorization: Bearer <key>``."""

    api_key_secret: str = Field(
        ..., min_length=1, max_length=253, pattern=_SECRET_NAME,
        description="Secret in the model's namespace whose every entry holds valid API keys "
                    "(one per line), so several keys are valid at once and a rotation needs no "
                    "restart: the pods mount it and re-read it when the kubelet updates it. "
                    "Engine vllm reads one key, from the entry 'api-key', at start.")


class Tls(ApiModel):
    """HTTPS on the model's port, from a certificate the cluster issues and renews."""

    secret_name: str = Field(
        ..., min_length=1, max_length=253, pattern=_SECRET_NAME,
        description="A kubernetes.io/tls Secret (tls.crt, tls.key) in the model's namespace, "
                    "e.g. a cert-manager Certificate's secretName. Its names should include "
                    "the Service's (NAME.NAMESPACE.svc). A renewed certificate is served "
                    "without restarting the pods.")


class LabelSelector(ApiModel):
    """Objects whose labels include all of these."""

    match_labels: dict[str, str] = Field(default_factory=dict,
                                         description="Labels the objects must carry.")


class NetworkClient(ApiModel):
    """Pods that may call the model (a NetworkPolicy peer)."""

    model_config = ConfigDict(json_schema_extra=_rules(
        _cel("has(self.namespaceSelector) || has(self.podSelector)",
             "a client names a namespaceSelector, a podSelector or both"),
    ))

    namespace_selector: LabelSelector | None = Field(
        None, description="Namespaces whose pods may call (with podSelector: only those pods "
                          "of those namespaces). {} is every namespace.")
    pod_selector: LabelSelector | None = Field(
        None, description="Pods that may call; alone: pods of the model's namespace.")


class NetworkPolicySpec(ApiModel):
    """The NetworkPolicy the operator renders for the model's pods."""

    enabled: bool = Field(True, description="Render it (default). false: no policy of "
                                            "modelyard's, the namespace's own apply.")
    clients: list[NetworkClient] | None = Field(
        None, max_length=32,
        description="Who may call the model. Default: every pod of the model's namespace. "
                    "The operator, the activator, the Prometheus the chart names and the "
                    "model's Gateway (spec.gateway) are admitted in any case.")


class ModelDeploymentSpec(ApiModel):
    """The desired state of a served model."""

    model_config = ConfigDict(json_schema_extra=_rules(
        _cel("(has(self.runtime.engine) && self.runtime.engine == 'vllm') == "
             "(has(self.model.format) && self.model.format == 'hf')",
             "runtime.engine vllm serves format hf (a model directory), and format hf needs "
             "runtime.engine vllm"),
        _cel("!has(self.tls) || !has(self.runtime.engine) || self.runtime.engine != 'vllm'",
             "tls is served by the tensor runtime; runtime.engine vllm does not take it yet",
             ".tls"),
        _cel("!has(self.runtime.explain) || !self.runtime.explain.enabled || "
             "!has(self.model.format) || self.model.format != 'aoti'",
             "runtime.explain needs gradients through the model, and an aoti package has none: "
             "serve the export or safetensors source to explain it", ".runtime.explain"),
        _cel("!has(self.runtime.explain) || !self.runtime.explain.enabled || "
             "!has(self.model.optimize) || !has(self.model.optimize.quantize)",
             "runtime.explain needs gradients through the model, and dynamic-int8 layers "
             "have none: leave model.optimize.quantize unset to explain it",
             ".runtime.explain"),
        _cel("!has(self.runtime.explain) || !self.runtime.explain.enabled || "
             "!has(self.model.convert)",
             "runtime.explain needs gradients through the model, and model.convert makes the "
             "pods serve an aoti package, which has none: explain the unconverted model",
             ".runtime.explain"),
        _cel("!has(self.model.convert) || !has(self.model.convert.quantize) || "
             "self.model.convert.quantize != 'int8-dynamic' || "
             "(has(self.model.format) && self.model.format == 'safetensors') || "
             "!has(self.resources) || !has(self.resources.gpu) || "
             "!has(self.resources.gpu.count) || "
             "self.resources.gpu.count == 0",
             "an exported program is quantised as a graph (PT2E) by torchao's x86 quantizer, "
             "for CPUs: on GPUs convert from format safetensors to quantise",
             ".model.convert.quantize"),
        _cel("!has(self.tls) || !has(self.gateway)",
             "tls and gateway together are not supported yet: the Gateway would need a "
             "BackendTLSPolicy per version Service, which modelyard does not render",
             ".tls"),
    ))

    model: ModelSource = Field(..., description="The model to serve.")
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec, description="The serving runtime.",
                                 json_schema_extra=_OBJECT_DEFAULT)
    resources: Resources = Field(default_factory=Resources,
                                 description="Resources of each replica.",
                                 json_schema_extra=_OBJECT_DEFAULT)
    scheduling: Scheduling = Field(default_factory=Scheduling, description="Pod placement.",
                                   json_schema_extra=_OBJECT_DEFAULT)
    replicas: int = Field(1, ge=0, le=1000,
                          description="Replicas when autoscaling is off (scale subresource).")
    autoscaling: Autoscaling | None = Field(None, description="Scale from live metrics.")
    rollout: Rollout = Field(default_factory=Rollout, description="How versions roll out.",
                             json_schema_extra=_OBJECT_DEFAULT)
    gateway: GatewayRef | None = Field(
        None, description="Attach the model's HTTPRoute to this Gateway. When the cluster has "
                          "the Gateway API, a canary's traffic is split by the route's backend "
                          "weights; otherwise by replica ratio behind the stable Service.")
    auth: Auth | None = Field(
        None, description="Require an API key on inference and metadata (health probes and "
                          "/metrics stay open). Without it, anyone who reaches a pod may call it.")
    tls: Tls | None = Field(
        None, description="Serve HTTPS only (TLS 1.2 and later) on the model's port; probes, "
                          "the operator's scrapes and the activator follow.")
    network_policy: NetworkPolicySpec = Field(
        default_factory=NetworkPolicySpec, json_schema_extra=_OBJECT_DEFAULT,
        description="Ingress to the model's pods: only its clients and modelyard's own "
                    "components (on by default).")


def parse_spec(spec: dict[str, Any]) -> ModelDeploymentSpec:
    return ModelDeploymentSpec.model_validate(spec)

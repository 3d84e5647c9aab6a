"""What the operator, the runtime and the activator must agree on.

One module, importing nothing of the project's and no third-party package, so every
component can depend on it and none on another through it:

* the labels and annotations the operator puts on what it creates (the activator, the
  chart's NetworkPolicies and dashboards select on them);
* the ports;
* the runtime's metric names and what each means (the operator's analysis and autoscaler,
  and the activator, read them; the runtime exports them);
* the runtime's settings: one table of :class:`Setting`. The operator renders a pod's
  environment from it (:func:`runtime_env`), and the runtime builds its flags and reads
  its environment from it, so a setting's variable is typed once; a name that is not in
  the table is an error on both sides, never silently ignored.

Adding a runtime setting is one :class:`Setting` here, one field on the runtime's
``RuntimeConfig``, and the line in ``render.runtime_env`` that fills it from the spec.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

# --------------------------------------------------------------- labels, annotations

MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGER = "modelyard"
MODEL_LABEL = "modelyard.dev/model-deployment"  # every child: the ModelDeployment's name
VERSION_LABEL = "modelyard.dev/version"  # pods, Deployments, per-version Services
HASH_ANNOTATION = "modelyard.dev/applied-hash"  # what the operator last applied
ENDPOINTSLICE_MANAGER = "modelyard.dev"  # endpointslice.kubernetes.io/managed-by value
SCHEME_ANNOTATION = "modelyard.dev/scheme"  # pods: "https" when the model serves TLS only

# ---------------------------------------------------------------------------- ports

RUNTIME_PORT = 8080  # the runtime's HTTP port (OIP REST, /metrics, health) by default
RUNTIME_GRPC_PORT = 8081  # the runtime's OIP gRPC port when enabled (KServe's convention)
LLM_HEALTH_PORT = 8081  # the generative engine's launcher: honest readiness (/ready, /live)
SERVICE_PORT = 80  # the model's Services

# ---------------------------------------------------------------------- shutdown
# A model's pod gets TERMINATION_GRACE_SECONDS after SIGTERM. Its server drains: unready at
# once, serving until no request has arrived for MODELYARD_DRAIN_SECONDS (the endpoint is
# gone from every node's routing), at most DRAIN_LIMIT_SECONDS; the rest of the grace
# period is for the requests in flight.
TERMINATION_GRACE_SECONDS = 60
DRAIN_LIMIT_SECONDS = 30.0

# --------------------------------------------------------------- runtime metrics
# Prometheus names without the _total/_bucket suffixes a scrape adds.

REQUESTS = "modelyard_requests"  # counter {protocol, code}: inference requests answered
REQUEST_DURATION = "modelyard_request_duration_seconds"  # histogram: body read to reply
INFLIGHT = "modelyard_inflight_requests"  # gauge: requests being handled
QUEUE_DEPTH = "modelyard_queue_depth"  # gauge: items waiting for a batch
REJECTED = "modelyard_rejected_requests"  # counter {reason}: shed before the model ran
BATCH_SIZE = "modelyard_batch_size"  # histogram: items per forward pass
INFERENCE_DURATION = "modelyard_inference_duration_seconds"  # histogram: per batch
MODEL_LOAD = "modelyard_model_load_seconds"  # gauge: fetch + load + warm-up
MODEL_READY = "modelyard_model_ready"  # gauge: 1 when the model answers inferences
EXPLANATIONS = "modelyard_explanations"  # counter {outcome}: explain requests answered
EXPLAIN_DURATION = "modelyard_explain_duration_seconds"  # histogram: one explanation computed
GPU_UTILIZATION = "modelyard_gpu_utilization_ratio"  # gauge 0..1
GPU_MEMORY = "modelyard_gpu_memory_bytes"  # gauge: allocated by this process
GPU_MEMORY_RESERVED = "modelyard_gpu_memory_reserved_bytes"  # gauge: allocator's reserve

# The activator's: requests it holds for a model at zero (the autoscaler's wake signal).
ACTIVATOR_WAITING = "modelyard_activator_waiting_requests"

# The generative engine's (runtime.engine vllm): vLLM's own names, on the same port and
# path. The operator reads them where it reads the runtime's (analysis, autoscaling), each
# mapped to the same meaning (operator/signals.py, ``ENGINE_SERIES``).
VLLM_RUNNING = "vllm:num_requests_running"  # gauge: requests in the engine's running batch
VLLM_WAITING = "vllm:num_requests_waiting"  # gauge: requests queued for the running batch
VLLM_KV_CACHE_USAGE = "vllm:kv_cache_usage_perc"  # gauge: share of KV-cache blocks used, 0..1
VLLM_TTFT = "vllm:time_to_first_token_seconds"  # histogram: arrival to first token
VLLM_ITL = "vllm:inter_token_latency_seconds"  # histogram: between two tokens of a request
VLLM_E2E = "vllm:e2e_request_latency_seconds"  # histogram: arrival to last token
# vLLM's HTTP middleware (prometheus-fastapi-instrumentator): counter {handler, method,
# status}, status grouped as "2xx", "4xx", "5xx". Only these handlers are inference.
VLLM_HTTP_REQUESTS = "http_requests"
VLLM_INFERENCE_HANDLERS = ("/v1/completions", "/v1/chat/completions", "/v1/responses",
                           "/v1/embeddings")

# ------------------------------------------------------------------ runtime settings

Kind = Literal["str", "int", "float", "bool", "path"]


@dataclass(frozen=True)
class Setting:
    """One runtime setting: its ``RuntimeConfig`` field (also its ``--flag``), its
    environment variable, and how its text is read."""

    field: str
    env: str
    kind: Kind = "str"
    help: str = ""

    @property
    def flag(self) -> str:
        return "--" + self.field.replace("_", "-")


SETTINGS: tuple[Setting, ...] = (
    # set by the operator from the spec
    Setting("model_name", "MODELYARD_MODEL_NAME", help="served name (required)"),
    Setting("model_version", "MODELYARD_MODEL_VERSION", help='served version (default "1")'),
    Setting("model_uri", "MODELYARD_MODEL_URI", help="file://, path, http(s)://, s3://"),
    Setting("model_format", "MODELYARD_MODEL_FORMAT",
            help="aoti | export | safetensors | torchscript (legacy) | pickle"),
    Setting("sha256", "MODELYARD_MODEL_SHA256", help="verified before loading (optional)"),
    Setting("entry_point", "MODELYARD_ENTRY_POINT", help="module:callable building the module"),
    Setting("max_batch_size", "MODELYARD_MAX_BATCH_SIZE", "int",
            help="items per batch (default 16)"),
    Setting("max_delay_ms", "MODELYARD_MAX_DELAY_MS", "float",
            help="longest wait for a batch to fill (default 5)"),
    Setting("max_queue_items", "MODELYARD_MAX_QUEUE_ITEMS", "int",
            help="items the batch queue holds; past it 503 with Retry-After (default 256, "
                 "0 unbounded)"),
    Setting("max_queue_wait_ms", "MODELYARD_MAX_QUEUE_WAIT_MS", "float",
            help="longest a request may wait in the queue; 503 past it (default 0: no bound)"),
    Setting("handler", "MODELYARD_HANDLER", help="module:Class pre/post-processing hook"),
    Setting("port", "MODELYARD_PORT", "int", help=f"default {RUNTIME_PORT}"),
    Setting("grpc_port", "MODELYARD_GRPC_PORT", "int",
            help=f"also serve OIP over gRPC on this port (default 0: off; pods: "
                 f"spec.runtime.grpcPort, conventionally {RUNTIME_GRPC_PORT})"),
    Setting("host", "MODELYARD_HOST", help="bind address, default 0.0.0.0"),
    Setting("cache_dir", "MODELYARD_CACHE_DIR", "path",
            help="download cache (default ~/.cache/modelyard/models)"),
    Setting("cache_max_bytes", "MODELYARD_CACHE_MAX_BYTES", "int",
            help="bound of the model cache; least recently used models go first"),
    Setting("device", "MODELYARD_DEVICE", help="cpu | cuda | auto (default auto)"),
    Setting("dtype", "MODELYARD_DTYPE", help="float32 | float16 | bfloat16 (default: as saved)"),
    Setting("quantize", "MODELYARD_QUANTIZE", help="dynamic-int8 (CPU only)"),
    Setting("compile", "MODELYARD_COMPILE", "bool", help="torch.compile / TorchScript freeze"),
    # the runtime's own (the operator may leave them unset)
    Setting("metadata", "MODELYARD_METADATA", help="tensor metadata: inline JSON or a path"),
    Setting("allow_pickle", "MODELYARD_ALLOW_PICKLE", "bool",
            help="opt in to unpickling arbitrary objects"),
    Setting("max_body_bytes", "MODELYARD_MAX_BODY_BYTES", "int",
            help="413 above this (default 64 MiB)"),
    Setting("drain_seconds", "MODELYARD_DRAIN_SECONDS", "float",
            help="after SIGTERM, keep serving (unready) until no request has arrived "
                 "for this long"),
    Setting("threads", "MODELYARD_THREADS", "int", help="torch intra-op threads"),
    Setting("warmup", "MODELYARD_WARMUP", "bool",
            help="run a warm-up inference before ready (default true)"),
    Setting("log_level", "MODELYARD_LOG_LEVEL", help="default info"),
    Setting("api_keys", "MODELYARD_API_KEYS", "path",
            help="file or directory (a mounted Secret) of API keys, one per line: requests "
                 "then need Authorization: Bearer <key>; re-read when it changes"),
    Setting("tls_cert_file", "MODELYARD_TLS_CERT_FILE", "path",
            help="serve HTTPS with this certificate chain (PEM; reloaded when it changes)"),
    Setting("tls_key_file", "MODELYARD_TLS_KEY_FILE", "path",
            help="the certificate's private key (PEM)"),
    Setting("explain", "MODELYARD_EXPLAIN", "bool",
            help="serve POST /v2/models/{name}/explain: attributions with Captum "
                 "(default false: 404)"),
    Setting("explain_method", "MODELYARD_EXPLAIN_METHOD",
            help="integrated_gradients (default) | saliency: a request's default"),
    Setting("explain_steps", "MODELYARD_EXPLAIN_STEPS", "int",
            help="integrated gradients' steps, a request's default and most (default 32)"),
    Setting("explain_max_batch_size", "MODELYARD_EXPLAIN_MAX_BATCH_SIZE", "int",
            help="most rows in one explain request (default 8)"),
    Setting("explain_max_concurrent", "MODELYARD_EXPLAIN_MAX_CONCURRENT", "int",
            help="explanations computed at once; past it 503 with Retry-After (default 1)"),
)
ENV_PREFIX = "MODELYARD_"
_BY_FIELD = {s.field: s for s in SETTINGS}
_BY_ENV = {s.env: s for s in SETTINGS}

# The generative engine's launcher (``modelyard.runtime.llm``): it fetches and verifies a
# model directory, then runs vLLM on it. It shares the runtime's settings where they mean
# the same, and has two of its own; the engine's flags are the container's arguments.
LLM_SETTINGS: tuple[Setting, ...] = (
    *(_BY_FIELD[name] for name in ("model_name", "model_version", "model_uri", "sha256",
                                   "port", "host", "cache_dir", "cache_max_bytes", "device",
                                   "drain_seconds", "log_level")),
    Setting("health_port", "MODELYARD_HEALTH_PORT", "int",
            help=f"the launcher's /ready and /live (default {LLM_HEALTH_PORT})"),
    Setting("termination_log", "MODELYARD_TERMINATION_LOG", "path",
            help="where the reason the engine stopped is written (default "
                 "/dev/termination-log, which Kubernetes reports in the pod's status)"),
)
_LLM_BY_FIELD = {s.field: s for s in LLM_SETTINGS}
_LLM_BY_ENV = {s.env: s for s in LLM_SETTINGS}


class UnknownSetting(KeyError):
    """A runtime setting (a field or a ``MODELYARD_*`` variable) that the table lacks."""

    def __str__(self) -> str:
        return str(self.args[0])


def setting(field: str) -> Setting:
    """The setting of a ``RuntimeConfig`` field; :class:`UnknownSetting` if none."""
    try:
        return _BY_FIELD[field]
    except KeyError:
        raise UnknownSetting(f"no runtime setting {field!r}{_hint(field, _BY_FIELD)}") from None


def runtime_env(values: Mapping[str, str | None]) -> list[dict[str, str]]:
    """A pod's ``env`` entries for settings given by field (``None`` values left out)."""
    return [{"name": setting(name).env, "value": value}
            for name, value in values.items() if value is not None]


def llm_env(values: Mapping[str, str | None]) -> list[dict[str, str]]:
    """The generative launcher's ``env`` entries for settings given by field."""
    out = []
    for name, value in values.items():
        if name not in _LLM_BY_FIELD:
            raise UnknownSetting(f"no launcher setting {name!r}{_hint(name, _LLM_BY_FIELD)}")
        if value is not None:
            out.append({"name": _LLM_BY_FIELD[name].env, "value": value})
    return out


def unknown_variables(names: Iterable[str], *, llm: bool = False) -> list[str]:
    """The ``MODELYARD_*`` names among ``names`` that are no runtime setting (or, with
    ``llm``, no launcher setting), each with the closest known name when one is near (a
    misspelling is reported, not ignored)."""
    known = _LLM_BY_ENV if llm else _BY_ENV
    return [f"{name}{_hint(name, known)}" for name in sorted(names)
            if name.startswith(ENV_PREFIX) and name not in known]


def parse_bool(raw: str) -> bool:
    """A boolean setting's text: 1/true/yes/on or 0/false/no/off/empty (any case)."""
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {raw!r}")


def _hint(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]}?)" if close else ""

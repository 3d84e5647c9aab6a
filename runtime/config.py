"""Runtime configuration: command-line flags that mirror environment variables.

Called by ``__main__`` (``modelyard-runtime`` / ``python -m modelyard.runtime``)
and by tests, which build a :class:`RuntimeConfig` directly.

The contract with the operator, which renders these variables into every
runtime pod (a flag, when given, wins over its variable)::

    MODELYARD_MODEL_NAME      --model-name       served name (required)
    MODELYARD_MODEL_VERSION   --model-version    served version (default "1")
    MODELYARD_MODEL_URI       --model-uri        file://, path, http(s)://, s3://
    MODELYARD_MODEL_FORMAT    --model-format     torchscript | export | safetensors | pickle
    MODELYARD_MODEL_SHA256    --model-sha256     verified before loading (optional)
    MODELYARD_ENTRY_POINT     --entry-point      module:callable building the nn.Module
    MODELYARD_MAX_BATCH_SIZE  --max-batch-size   items per batch (default 16)
    MODELYARD_MAX_DELAY_MS    --max-delay-ms     longest wait for a batch to fill (default 5)
    MODELYARD_HANDLER         --handler          module:Class pre/post-processing hook (optional)
    MODELYARD_PORT            --port             default 8080
    MODELYARD_HOST            --host             bind address, default 0.0.0.0
    MODELYARD_CACHE_DIR       --cache-dir        download cache (default ~/.cache/modelyard/models)
    MODELYARD_DEVICE          --device           cpu | cuda | auto (default auto: cuda if available)
    MODELYARD_DTYPE           --dtype            float32 | float16 | bfloat16 (default: as saved)
    MODELYARD_QUANTIZE        --quantize         dynamic-int8 (CPU only)
    MODELYARD_COMPILE         --compile          true | false (torch.compile / TorchScript freeze)

    S3 credentials come from the standard AWS_* variables (AWS_ENDPOINT_URL for
    a custom endpoint, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION).

Runtime-only settings (the operator may leave them unset)::

    MODELYARD_METADATA        --metadata         tensor metadata: inline JSON or a path
    MODELYARD_ALLOW_PICKLE    --allow-pickle     opt in to unpickling arbitrary objects
    MODELYARD_MAX_BODY_BYTES  --max-body-bytes   413 above this (default 64 MiB)
    MODELYARD_DRAIN_SECONDS   --drain-seconds    after SIGTERM, keep serving (unready) this long
    MODELYARD_THREADS         --threads          torch intra-op threads (default: torch's choice)
    MODELYARD_WARMUP          --warmup           run a warm-up inference before ready (default true)
    MODELYARD_LOG_LEVEL       --log-level        default info
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from modelyard.runtime.errors import ConfigError

__all__ = ["FORMATS", "RuntimeConfig", "parse_config"]

FORMATS = ("torchscript", "export", "safetensors", "pickle")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("float32", "float16", "bfloat16")
QUANTIZE = ("dynamic-int8",)


@dataclass(frozen=True)
class RuntimeConfig:
    """Everything the runtime needs to fetch, load and serve one model."""

    model_name: str
    model_uri: str
    model_version: str = "1"
    model_format: str = "torchscript"
    sha256: str | None = None
    entry_point: str | None = None
    max_batch_size: int = 16
    max_delay_ms: float = 5.0
    handler: str | None = None
    host: str = "0.0.0.0"
    port: int = 8080
    cache_dir: Path = field(default_factory=lambda: Path.home() / ".cache/modelyard/models")
    device: str = "auto"
    dtype: str | None = None
    quantize: str | None = None
    compile: bool = False
    metadata: str | None = None
    allow_pickle: bool = False
    max_body_bytes: int = 64 * 1024 * 1024
    drain_seconds: float = 5.0
    threads: int = 0
    warmup: bool = True
    log_level: str = "info"

    def __post_init__(self) -> None:
        problems = []
        if not self.model_name:
            problems.append("model name is required (MODELYARD_MODEL_NAME / --model-name)")
        if not self.model_uri:
            problems.append("model URI is required (MODELYARD_MODEL_URI / --model-uri)")
        if self.model_format not in FORMATS:
            problems.append(
                f"format must be one of {', '.join(FORMATS)}, not {self.model_format!r}"
            )
        if self.model_format == "safetensors" and not self.entry_point:
            problems.append(
                "safetensors needs an entry point (MODELYARD_ENTRY_POINT=module:callable)"
            )
        if self.device not in DEVICES:
            problems.append(f"device must be one of {', '.join(DEVICES)}, not {self.device!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            problems.append(f"dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        if self.quantize is not None and self.quantize not in QUANTIZE:
            problems.append(f"quantize must be one of {', '.join(QUANTIZE)}, not {self.quantize!r}")
        if self.max_batch_size < 1:
            problems.append("max batch size must be at least 1")
        if self.max_delay_ms < 0:
            problems.append("max delay must not be negative")
        if not 0 < self.port < 65536:
            problems.append(f"port {self.port} is out of range")
        if self.sha256 is not None and (
            len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256.lower())
        ):
            problems.append("sha256 must be 64 hex digits")
        if problems:
            raise ConfigError("; ".join(problems))


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


# flag name, environment variable, converter
_SETTINGS: tuple[tuple[str, str, type | object], ...] = (
    ("model_name", "MODELYARD_MODEL_NAME", str),
    ("model_version", "MODELYARD_MODEL_VERSION", str),
    ("model_uri", "MODELYARD_MODEL_URI", str),
    ("model_format", "MODELYARD_MODEL_FORMAT", str),
    ("sha256", "MODELYARD_MODEL_SHA256", str),
    ("entry_point", "MODELYARD_ENTRY_POINT", str),
    ("max_batch_size", "MODELYARD_MAX_BATCH_SIZE", int),
    ("max_delay_ms", "MODELYARD_MAX_DELAY_MS", float),
    ("handler", "MODELYARD_HANDLER", str),
    ("port", "MODELYARD_PORT", int),
    ("host", "MODELYARD_HOST", str),
    ("cache_dir", "MODELYARD_CACHE_DIR", Path),
    ("device", "MODELYARD_DEVICE", str),
    ("dtype", "MODELYARD_DTYPE", str),
    ("quantize", "MODELYARD_QUANTIZE", str),
    ("compile", "MODELYARD_COMPILE", _bool),
    ("metadata", "MODELYARD_METADATA", str),
    ("allow_pickle", "MODELYARD_ALLOW_PICKLE", _bool),
    ("max_body_bytes", "MODELYARD_MAX_BODY_BYTES", int),
    ("drain_seconds", "MODELYARD_DRAIN_SECONDS", float),
    ("threads", "MODELYARD_THREADS", int),
    ("warmup", "MODELYARD_WARMUP", _bool),
    ("log_level", "MODELYARD_LOG_LEVEL", str),
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modelyard-runtime",
        description="Serve one PyTorch model over the Open Inference Protocol (KServe v2).",
        epilog="Every flag mirrors a MODELYARD_* environment variable; the flag wins.",
    )
    for name, env, _ in _SETTINGS:
        parser.add_argument("--" + name.replace("_", "-"), dest=name, default=None, help=env)
    return parser


def parse_config(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> RuntimeConfig:
    """Build the configuration from flags (``argv``) over environment variables."""
    env = os.environ if environ is None else environ
    flags = vars(_parser().parse_args(argv))
    values: dict[str, object] = {}
    for name, var, convert in _SETTINGS:
        raw = flags.get(name)
        if raw is None:
            raw = env.get(var)
        if raw is None or (raw == "" and name not in ("model_name", "model_uri")):
            continue
        try:
            values[name] = convert(raw)  # type: ignore[operator]
        except ValueError as error:
            raise ConfigError(f"{var} / --{name.replace('_', '-')}: {error}") from None
    values.setdefault("model_name", "")
    values.setdefault("model_uri", "")
    return RuntimeConfig(**values)  # type: ignore[arg-type]

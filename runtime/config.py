"""Runtime configuration: command-line flags that mirror environment variables.

Called by ``__main__`` (``modelyard-runtime`` / ``python -m modelyard.runtime``)
and by tests, which build a :class:`RuntimeConfig` directly.

The settings, their variables and their meaning are one table shared with the
operator, ``modelyard.contract.SETTINGS`` (``modelyard-runtime --help`` lists them). A
flag, when given, wins over its variable. A ``MODELYARD_*`` variable that is no setting
(a misspelling) is logged at start-up with the closest name, never silently ignored.

S3 credentials come from the standard AWS_* variables (AWS_ENDPOINT_URL for a custom
endpoint, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION).
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from modelyard import contract
from modelyard.runtime.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["FORMATS", "RuntimeConfig", "parse_config"]

FORMATS = ("torchscript", "export", "safetensors", "pickle", "aoti")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("float32", "float16", "bfloat16")
QUANTIZE = ("dynamic-int8",)
EXPLAIN_METHODS = ("integrated_gradients", "saliency")
MAX_EXPLAIN_STEPS = 512  # spec.runtime.explain.steps' schema bound too


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
    max_queue_items: int = 256
    max_queue_wait_ms: float = 0.0
    handler: str | None = None
    host: str = "0.0.0.0"
    port: int = contract.RUNTIME_PORT
    grpc_port: int = 0  # OIP over gRPC; 0: off
    cache_dir: Path = field(default_factory=lambda: Path.home() / ".cache/modelyard/models")
    cache_max_bytes: int | None = None
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
    api_keys: Path | None = None  # a file or a mounted Secret's directory (auth.py)
    tls_cert_file: Path | None = None  # a mounted kubernetes.io/tls Secret's tls.crt
    tls_key_file: Path | None = None  # ... and its tls.key
    explain: bool = False  # POST .../explain (explain.py); off: 404
    explain_method: str = "integrated_gradients"
    explain_steps: int = 32
    explain_max_batch_size: int = 8
    explain_max_concurrent: int = 1

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
        if self.model_format == "aoti" and (self.dtype or self.quantize or self.compile):
            problems.append(
                "an aoti package is compiled and quantised when it is converted "
                "(`modelyard convert --quantize ...`): dtype, quantize and compile do not apply"
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
        if self.max_queue_items < 0 or self.max_queue_wait_ms < 0:
            problems.append("queue bounds must not be negative (0: no bound)")
        if not 0 < self.port < 65536:
            problems.append(f"port {self.port} is out of range")
        if not 0 <= self.grpc_port < 65536 or self.grpc_port == self.port:
            problems.append(f"gRPC port {self.grpc_port} is out of range or the HTTP port")
        if self.sha256 is not None and (
            len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256.lower())
        ):
            problems.append("sha256 must be 64 hex digits")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            problems.append("TLS needs both a certificate and a key "
                            "(MODELYARD_TLS_CERT_FILE and MODELYARD_TLS_KEY_FILE)")
        problems += self._explain_problems()
        if problems:
            raise ConfigError("; ".join(problems))

    def _explain_problems(self) -> list[str]:
        problems = []
        if self.explain_method not in EXPLAIN_METHODS:
            problems.append(f"explain method must be one of {', '.join(EXPLAIN_METHODS)}, "
                            f"not {self.explain_method!r}")
        if not 2 <= self.explain_steps <= MAX_EXPLAIN_STEPS:
            problems.append(f"explain steps must be from 2 to {MAX_EXPLAIN_STEPS}")
        if self.explain_max_batch_size < 1 or self.explain_max_concurrent < 1:
            problems.append("explain's max batch size and max concurrent must be at least 1")
        if self.explain and self.model_format == "aoti":
            problems.append("explanations need gradients through the model, and an aoti "
                            "package (AOTInductor) has none: serve the export or safetensors "
                            "source to explain it")
        if self.explain and self.quantize:
            problems.append("explanations need gradients through the model, and dynamic-int8 "
                            "quantised layers have none: leave quantize unset to explain it")
        return problems


_CONVERT: dict[str, Callable[[str], object]] = {
    "str": str, "int": int, "float": float, "bool": contract.parse_bool, "path": Path}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modelyard-runtime",
        description="Serve one PyTorch model over the Open Inference Protocol (KServe v2).",
        epilog="Every flag mirrors a MODELYARD_* environment variable; the flag wins.",
    )
    for item in contract.SETTINGS:
        parser.add_argument(item.flag, dest=item.field, default=None,
                            help=f"{item.help} [{item.env}]")
    return parser


def parse_config(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> RuntimeConfig:
    """Build the configuration from flags (``argv``) over environment variables."""
    env = os.environ if environ is None else environ
    flags = vars(_parser().parse_args(argv))
    values: dict[str, object] = {}
    for item in contract.SETTINGS:
        name = item.field
        raw = flags.get(name)
        if raw is None:
            raw = env.get(item.env)
        if raw is None or (raw == "" and name not in ("model_name", "model_uri")):
            continue
        try:
            values[name] = _CONVERT[item.kind](raw)
        except ValueError as error:
            raise ConfigError(f"{item.env} / {item.flag}: {error}") from None
    for unknown in contract.unknown_variables(env):
        log.warning("%s is not a runtime setting: the runtime ignores it (a handler may "
                    "still read it)", unknown)
    values.setdefault("model_name", "")
    values.setdefault("model_uri", "")
    return RuntimeConfig(**values)  # type: ignore[arg-type]

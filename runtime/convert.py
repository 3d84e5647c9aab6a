"""``modelyard convert``: compile a model into a verified AOTInductor package.

Input: a ``torch.export`` program (``.pt2``) or safetensors weights plus the entry point
that builds the module, loaded exactly as the runtime loads them (``models.load_source``).
Output: an AOTInductor package (format ``aoti``) for one device, whose batch dimension is
dynamic from 1 to ``--max-batch`` (the batching limit it will be served with), optionally
quantised with torchao, and beside it ``<package>.manifest.json``: its SHA-256 (what
``spec.model.sha256`` takes), the source's digest, the options, the verification and the
measured speed-up.

Nothing is written before verification passes: the package is compiled into a temporary
directory, loaded back, run against the source module (fp32, unquantised) on generated
inputs at batch 1, 3 and the maximum, and only when every output is within tolerance is
it moved into place. Tolerances: the largest absolute difference divided by the largest
absolute reference value, per float output; the share of differing elements, per integer
or boolean output (an argmax label that flips).

Quantisation schemes (torchao), chosen per device:
- ``int8-dynamic``: int8 weights and int8 activations quantised per batch at run time.
  On CPU the int8 GEMMs (VNNI/AMX through oneDNN) do the work of the linear layers; the
  default choice for CPU models dominated by linear layers at batch sizes above a few.
- ``int8-weight-only``: int8 weights, activations kept in float. Halves/quarters the
  weight bytes; helps where the linear layers are memory-bound (batch 1-4, CPU or GPU).
- ``float8-dynamic``: float8 weights and activations (CUDA, compute capability >= 8.9,
  e.g. H100): the tensor cores' fastest path with the smallest accuracy cost.

These rewrite an eager module's ``nn.Linear`` layers (safetensors plus its entry point). An
exported program has none left: it is quantised as a graph instead (PT2E, torchao's x86
Inductor quantizer), which does ``int8-dynamic`` on CPU.

Called by ``modelyard convert`` (operator CLI) and ``python -m modelyard.runtime.convert``
(the runtime image, which has no operator).
"""

from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import json
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from modelyard.runtime import aoti
from modelyard.runtime.config import RuntimeConfig
from modelyard.runtime.errors import ConfigError, ModelLoadError
from modelyard.runtime.models import load_source, resolve_device
from modelyard.runtime.protocol import DATATYPES, TensorMeta

__all__ = ["Candidate", "ConvertOptions", "VerificationFailed", "compile_package", "convert",
           "main", "verify", "write"]

log = logging.getLogger(__name__)

SOURCE_FORMATS = ("export", "safetensors")
QUANTIZE = ("int8-dynamic", "int8-weight-only", "float8-dynamic")
FP32_TOLERANCE = 1e-4  # compiled fp32 kernels reorder sums: ~1e-6 in practice
QUANTIZED_TOLERANCE = 5e-2  # int8 / float8 of a well-conditioned layer: ~1e-2 in practice
VERIFY_BATCHES = (1, 3)  # plus the maximum batch


class VerificationFailed(Exception):
    """The compiled package does not reproduce the source model within tolerance."""

    def __init__(self, verification: Verification) -> None:
        self.verification = verification
        worst = max(verification.deltas, key=lambda k: verification.deltas[k])
        super().__init__(
            f"verification failed: output {worst!r} differs by {verification.deltas[worst]:.3g} "
            f"(tolerance {verification.tolerance:g}); nothing was written")


@dataclass(frozen=True)
class ConvertOptions:
    source: Path
    source_format: str | None = None  # by suffix: .safetensors/.pt/.pth safetensors, else export
    entry_point: str | None = None
    metadata: str | None = None  # tensor metadata, JSON or a file, as MODELYARD_METADATA
    max_batch: int = 16
    quantize: str | None = None
    device: str = "auto"
    tolerance: float | None = None  # default by quantisation
    seed: int = 0
    bench_seconds: float = 1.0  # per measurement (eager and package, batch 1 and max)
    threads: int = 0  # torch threads while measuring (0: torch's choice), as MODELYARD_THREADS

    @property
    def format(self) -> str:
        if self.source_format:
            return self.source_format
        return "safetensors" if self.source.suffix in (".safetensors", ".pt", ".pth") else "export"

    def check(self) -> None:
        problems = []
        if self.format not in SOURCE_FORMATS:
            problems.append(f"source format must be one of {', '.join(SOURCE_FORMATS)}")
        if self.quantize is not None and self.quantize not in QUANTIZE:
            problems.append(f"quantize must be one of {', '.join(QUANTIZE)}")
        if self.max_batch < 1:
            problems.append("max batch must be at least 1")
        if self.tolerance is not None and self.tolerance < 0:
            problems.append("tolerance must not be negative")
        if problems:
            raise ConfigError("; ".join(problems))


@dataclass
class Candidate:
    """A compiled package in a temporary directory, not yet verified nor written."""

    options: ConvertOptions
    path: Path
    reference: Callable[..., Any]  # the source module, fp32 and unquantised
    inputs: list[TensorMeta]
    outputs: list[TensorMeta]
    device: torch.device
    source_sha256: str
    compile_seconds: float

    def discard(self) -> None:
        shutil.rmtree(self.path.parent, ignore_errors=True)


@dataclass
class Verification:
    passed: bool
    tolerance: float
    deltas: dict[str, float]  # per output: relative max error (float) or mismatch share
    accuracy_delta: float  # the largest of them
    batches: list[int]
    performance: dict[str, float] = field(default_factory=dict)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _example(inputs: list[TensorMeta], batch: int, generator: torch.Generator,
             device: torch.device) -> tuple[torch.Tensor, ...]:
    tensors = []
    for meta in inputs:
        shape = [batch, *(1 if d == -1 else d for d in meta.shape[1:])]
        dtype = DATATYPES[meta.datatype].torch
        if dtype.is_floating_point:
            tensor = torch.randn(shape, generator=generator).to(dtype)
        elif dtype == torch.bool:
            tensor = torch.randint(0, 2, shape, generator=generator).bool()
        else:  # integer inputs (ids, indices): small non-negative values
            tensor = torch.randint(0, 10, shape, generator=generator).to(dtype)
        tensors.append(tensor.to(device))
    return tuple(tensors)


def _as_tuple(result: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(result, torch.Tensor):
        return (result,)
    if isinstance(result, dict):
        return tuple(result.values())
    return tuple(result)


def _quantize(module: torch.nn.Module, scheme: str, device: torch.device) -> None:
    try:
        from torchao.quantization import (  # type: ignore[import-untyped]
            Float8DynamicActivationFloat8WeightConfig,
            Int8DynamicActivationInt8WeightConfig,
            Int8WeightOnlyConfig,
            quantize_,
        )
    except ImportError:
        raise ConfigError("quantisation needs torchao: pip install 'modelyard[convert]'") from None
    if scheme == "float8-dynamic":
        if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
            raise ConfigError("float8-dynamic needs a CUDA GPU of compute capability 8.9 or "
                              "newer (Ada, Hopper); on CPU use int8-dynamic")
        config: Any = Float8DynamicActivationFloat8WeightConfig()
    elif scheme == "int8-dynamic":
        config = Int8DynamicActivationInt8WeightConfig()
    else:
        config = Int8WeightOnlyConfig()
    quantize_(module, config)


def _quantize_exported(module: torch.nn.Module, scheme: str, device: torch.device,
                       example: tuple[torch.Tensor, ...]) -> torch.nn.Module:
    """An exported program has no ``nn.Linear`` left for ``quantize_`` to swap: it is
    quantised as a graph (PT2E) by torchao's x86 Inductor quantizer, whose int8 patterns
    Inductor fuses into oneDNN kernels when it freezes the weights. That quantizer is for
    CPUs and dynamic activations only: the other schemes need the eager module."""
    if scheme != "int8-dynamic" or device.type != "cpu":
        raise ConfigError(
            f"an exported program is quantised as a graph (PT2E, torchao's x86 quantizer), "
            f"which does int8-dynamic on CPU only, not {scheme} on {device.type}: convert "
            "from safetensors and its entry point for the other schemes")
    try:
        from torchao.quantization.pt2e.quantize_pt2e import (  # type: ignore[import-untyped]
            convert_pt2e,
            prepare_pt2e,
        )
        from torchao.quantization.pt2e.quantizer import (  # type: ignore[import-untyped]
            x86_inductor_quantizer as x86,
        )
    except ImportError:
        raise ConfigError("quantisation needs torchao: pip install 'modelyard[convert]'") from None
    quantizer = x86.X86InductorQuantizer()
    # the linear layers only, as quantize_ does for an eager module: oneDNN fuses no
    # dynamically quantised convolution, and set_global would leave q/dq around each one
    quantizer.set_module_type_qconfig(
        torch.nn.Linear, x86.get_default_x86_inductor_quantization_config(is_dynamic=True))
    prepared = prepare_pt2e(module, quantizer)
    with torch.no_grad():
        prepared(*example)  # the weights' observers; activations are scaled per call
    return convert_pt2e(prepared)  # type: ignore[no-any-return]


def compile_package(options: ConvertOptions) -> Candidate:
    """Load the source, quantise it if asked, export it with a dynamic batch and compile it
    into a package in a fresh temporary directory (``Candidate.discard`` removes it)."""
    options.check()
    device = resolve_device(options.device)
    source_config = RuntimeConfig(
        model_name="convert", model_uri=str(options.source), model_format=options.format,
        entry_point=options.entry_point, metadata=options.metadata, device="cpu")
    module, inputs, outputs, eager = load_source(source_config, options.source)
    if not inputs or any(-1 in meta.shape[1:] for meta in inputs):
        raise ConfigError(
            f"{options.source}: every input needs a declared shape beyond the batch "
            "(give --metadata, or embed it: safetensors metadata 'modelyard')")
    reference = module
    candidate_module = module
    generator = torch.Generator().manual_seed(options.seed)
    example_batch = 2 if options.max_batch >= 2 else 1
    example = _example(inputs, example_batch, generator, device)
    if options.quantize and eager:
        candidate_module = copy.deepcopy(module)
        _quantize(candidate_module, options.quantize, device)
    elif options.quantize:
        candidate_module = _quantize_exported(copy.deepcopy(module), options.quantize, device,
                                              example)
    candidate_module = candidate_module.to(device)
    dynamic: Any = None
    if options.max_batch >= 2:
        batch = torch.export.Dim("batch", min=1, max=options.max_batch)
        dynamic = tuple({0: batch} for _ in inputs)
    started = time.monotonic()
    try:
        with torch.no_grad():
            program = torch.export.export(candidate_module, example, dynamic_shapes=dynamic)
    except Exception as error:
        raise ModelLoadError(
            f"cannot export {options.source} with a dynamic batch of 1..{options.max_batch}: "
            f"{type(error).__name__}: {str(error).splitlines()[0]}") from None
    if not outputs:  # not declared: from the program's signature
        from modelyard.runtime.models import export_metadata

        outputs = export_metadata(program)[1]
        outputs = [TensorMeta(m.name, m.datatype, (-1, *m.shape[1:])) for m in outputs]
    source_sha256 = _sha256(options.source)
    metadata = aoti.signature_metadata(
        inputs, outputs, options.max_batch, sourceSha256=source_sha256,
        quantize=options.quantize or "none")
    workdir = Path(tempfile.mkdtemp(prefix="modelyard-convert-"))
    try:
        path = Path(torch._inductor.aoti_compile_and_package(
            program, package_path=str(workdir / "model.pt2"),
            inductor_configs={"aot_inductor.metadata": metadata,
                              # weights become constants: folded, pre-packed for the
                              # CPU's GEMM library, and the int8 patterns fuse
                              "freezing": device.type == "cpu",
                              # CPU kernels take the thread count the server sets
                              # (MODELYARD_THREADS), not the converting machine's
                              "cpp.dynamic_threads": device.type == "cpu"}))
    except Exception:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    compile_seconds = time.monotonic() - started
    log.info("compiled %s in %.1fs", options.source, compile_seconds)
    if isinstance(reference, torch.nn.Module):
        reference = reference.to(device)
    return Candidate(options, path, reference, inputs, outputs, device, source_sha256,
                     compile_seconds)


def _delta(got: torch.Tensor, want: torch.Tensor) -> float:
    if got.shape != want.shape:
        return float("inf")
    if want.is_floating_point():
        scale = max(want.abs().max().item(), 1e-6) if want.numel() else 1.0
        return float((got.float() - want.float()).abs().max().item() / scale) if want.numel() \
            else 0.0
    return float((got != want).float().mean().item()) if want.numel() else 0.0


def _rate(run: Callable[[], Any], items: int, seconds: float) -> tuple[float, float]:
    """(items per second, seconds per call), over at least ``seconds`` and 3 calls."""
    run()
    calls, started = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - started < seconds:
        run()
        calls += 1
    per_call = (time.perf_counter() - started) / calls
    return items / per_call, per_call


def verify(candidate: Candidate, tolerance: float | None = None) -> Verification:
    """Run the compiled package against the source model; measure both."""
    options = candidate.options
    if tolerance is None:
        tolerance = options.tolerance
    if tolerance is None:
        tolerance = QUANTIZED_TOLERANCE if options.quantize else FP32_TOLERANCE
    package = aoti.load_package(candidate.path, candidate.device.type)
    names = [meta.name for meta in candidate.outputs]
    deltas: dict[str, float] = dict.fromkeys(names, 0.0)
    batches = sorted({*(b for b in VERIFY_BATCHES if b <= options.max_batch), options.max_batch})
    generator = torch.Generator().manual_seed(options.seed + 1)
    with torch.inference_mode():
        for batch in batches:
            example = _example(candidate.inputs, batch, generator, candidate.device)
            want = _as_tuple(candidate.reference(*example))
            got = _as_tuple(package.module(*example))
            if len(got) != len(want):
                raise ModelLoadError(f"the package returns {len(got)} outputs, the source "
                                     f"{len(want)}")
            for name, g, w in zip(names, got, want, strict=False):
                deltas[name] = max(deltas[name], _delta(g, w))
        performance: dict[str, float] = {}
        threads = torch.get_num_threads()
        if options.threads > 0:
            torch.set_num_threads(options.threads)
        for label, batch in (("Batch1", 1), ("MaxBatch", options.max_batch)):
            example = _example(candidate.inputs, batch, generator, candidate.device)
            for who, model in (("eager", candidate.reference), ("package", package.module)):
                rate, per_call = _rate(functools.partial(model, *example), batch,
                                       options.bench_seconds)
                performance[f"{who}{label}ItemsPerSecond"] = round(rate, 1)
                performance[f"{who}{label}Ms"] = round(per_call * 1000, 3)
        torch.set_num_threads(threads)
        performance["threads"] = options.threads or threads
        performance["speedupMaxBatch"] = round(
            performance["packageMaxBatchItemsPerSecond"]
            / performance["eagerMaxBatchItemsPerSecond"], 3)
        performance["speedupBatch1"] = round(
            performance["eagerBatch1Ms"] / performance["packageBatch1Ms"], 3)
    accuracy = max(deltas.values(), default=0.0)
    return Verification(all(d <= tolerance for d in deltas.values()), tolerance, deltas,
                        accuracy, batches, performance)


def write(candidate: Candidate, verification: Verification, output: Path) -> dict[str, Any]:
    """Move a verified package to ``output`` and write its manifest beside it."""
    if not verification.passed:
        raise VerificationFailed(verification)
    options = candidate.options
    metadata = aoti.package_metadata(candidate.path)
    digest = _sha256(candidate.path)
    manifest: dict[str, Any] = {
        "format": "aoti",
        "sha256": digest,
        "bytes": candidate.path.stat().st_size,
        "source": {"path": str(options.source), "format": options.format,
                   "sha256": candidate.source_sha256, "entryPoint": options.entry_point},
        "target": {"device": candidate.device.type,
                   "cpuIsa": metadata.get("AOTI_CPU_ISA", ""),
                   "computeCapability": metadata.get("AOTI_COMPUTE_CAPABILITY", "")},
        "maxBatch": options.max_batch,
        "quantize": options.quantize,
        "signature": json.loads(metadata[aoti.SIGNATURE_KEY]),
        "verification": {"passed": verification.passed, "tolerance": verification.tolerance,
                         "accuracyDelta": verification.accuracy_delta,
                         "deltas": verification.deltas, "batches": verification.batches,
                         "seed": options.seed},
        "performance": verification.performance,
        "compileSeconds": round(candidate.compile_seconds, 1),
        "versions": {"torch": torch.__version__, "torchao": _torchao_version()},
        "createdAt": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    manifest_path = manifest_file(output)
    partial = output.with_name(output.name + ".partial")
    shutil.copyfile(candidate.path, partial)
    partial.replace(output)
    manifest_partial = manifest_path.with_name(manifest_path.name + ".partial")
    manifest_partial.write_text(json.dumps(manifest, indent=2) + "\n")
    manifest_partial.replace(manifest_path)
    return manifest


def manifest_file(output: Path) -> Path:
    return output.with_name(output.name + ".manifest.json")


def _torchao_version() -> str | None:
    try:
        import torchao  # type: ignore[import-untyped]
    except ImportError:
        return None
    return str(torchao.__version__)


def convert(options: ConvertOptions, output: Path) -> dict[str, Any]:
    """Compile, verify, and only then write ``output`` and its manifest."""
    candidate = compile_package(options)
    try:
        return write(candidate, verify(candidate), output)
    finally:
        candidate.discard()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modelyard convert",
        description="Compile a model into a verified AOTInductor package (format aoti).")
    parser.add_argument("source", type=Path,
                        help="a torch.export program (.pt2) or safetensors weights")
    parser.add_argument("-o", "--output", type=Path, required=True,
                        help="the package to write (.pt2); its manifest goes beside it")
    parser.add_argument("--format", choices=SOURCE_FORMATS,
                        help="the source's format (default: by its suffix)")
    parser.add_argument("--entry-point", help="module:callable building the module "
                                              "(safetensors)")
    parser.add_argument("--metadata", help="tensor metadata, JSON or a file (default: the "
                                           "program's signature or the file's own)")
    parser.add_argument("--max-batch", type=int, default=16,
                        help="largest batch the package takes: the runtime's maxBatchSize "
                             "(default 16)")
    parser.add_argument("--quantize", choices=QUANTIZE, help="torchao quantisation scheme")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="the device to compile for (default: CUDA when visible)")
    parser.add_argument("--tolerance", type=float,
                        help=f"largest accepted output difference (default {FP32_TOLERANCE:g}, "
                             f"quantised {QUANTIZED_TOLERANCE:g})")
    parser.add_argument("--seed", type=int, default=0, help="for the generated inputs")
    parser.add_argument("--bench-seconds", type=float, default=1.0,
                        help="seconds per speed measurement (4 of them; default 1)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads while measuring the speed-up: the runtime's "
                             "MODELYARD_THREADS (default torch's choice)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    options = ConvertOptions(
        source=args.source, source_format=args.format, entry_point=args.entry_point,
        metadata=args.metadata, max_batch=args.max_batch, quantize=args.quantize,
        device=args.device, tolerance=args.tolerance, seed=args.seed, threads=args.threads,
        bench_seconds=args.bench_seconds)
    try:
        manifest = convert(options, args.output)
    except (ConfigError, ModelLoadError, VerificationFailed) as error:
        print(f"modelyard convert: {error}", file=sys.stderr)
        return 1
    performance = manifest["performance"]
    print(f"{args.output}\tsha256 {manifest['sha256']}\taccuracy delta "
          f"{manifest['verification']['accuracyDelta']:.2g}\tspeed-up "
          f"x{performance['speedupMaxBatch']} (batch {options.max_batch}), "
          f"x{performance['speedupBatch1']} (batch 1)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

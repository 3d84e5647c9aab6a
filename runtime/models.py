"""Load a model file into a callable :class:`LoadedModel`, optimise and warm it up.

Called at startup by ``server.py`` (lifespan), after ``storage.fetch``; the
batcher then calls :meth:`LoadedModel.predict` on its inference thread.

Formats:
- ``torchscript``: ``torch.jit.load``. Tensor metadata comes from
  ``MODELYARD_METADATA``, an extra file ``modelyard.json`` inside the archive,
  or a sibling ``<model file>.json``; outputs not declared are read from the
  warm-up run.
- ``export``: a ``torch.export`` ``.pt2`` program; the graph signature gives
  input and output names, datatypes and shapes (symbolic dims become -1).
- ``aoti``: an AOTInductor package (``.pt2`` from ``modelyard convert`` or
  ``torch._inductor.aoti_compile_and_package``), compiled ahead of time for one device;
  its signature (names, datatypes, shapes) is compiled into it by ``modelyard convert``,
  otherwise it must be declared like TorchScript's. See ``aoti.py``.
- ``safetensors``: weights loaded into the ``nn.Module`` built by the entry point
  (``module:callable``). A ``.pt``/``.pth`` state dict is accepted too, loaded
  with ``weights_only=True``.
- ``pickle``: a whole pickled module; refused unless ``allow_pickle`` is set.
"""

from __future__ import annotations

import importlib
import json
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from modelyard.runtime.config import RuntimeConfig
from modelyard.runtime.errors import ConfigError, InferenceFailed, ModelLoadError
from modelyard.runtime.protocol import DATATYPES, TensorMeta, datatype_of

__all__ = ["LoadedModel", "load_model", "load_object", "load_source", "resolve_device"]

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
METADATA_FILE = "modelyard.json"


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when a GPU is visible, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda was asked for, but no CUDA device is visible")
    return torch.device(name)


def load_object(spec: str) -> Any:
    """Import ``module:attribute`` (the entry point and handler syntax)."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"{spec!r} is not of the form module:attribute")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"cannot import {spec!r}: {error}") from None
    return target


@dataclass
class LoadedModel:
    """A model ready to run: its callable, device, and declared tensors."""

    name: str
    version: str
    platform: str
    module: Callable[..., Any]
    device: torch.device
    inputs: list[TensorMeta]
    outputs: list[TensorMeta]
    compute_dtype: torch.dtype | None = None
    load_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def metadata(self) -> dict[str, Any]:
        """The OIP model metadata document."""
        return {
            "name": self.name,
            "versions": [self.version],
            "platform": self.platform,
            "inputs": [meta.as_json() for meta in self.inputs],
            "outputs": [meta.as_json() for meta in self.outputs],
        }

    def predict(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run one batch (blocking; call it on the inference thread)."""
        with torch.inference_mode():
            args = []
            for meta in self.inputs:
                tensor = inputs[meta.name].to(self.device, non_blocking=True)
                if self.compute_dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(self.compute_dtype)
                args.append(tensor)
            result = self.module(*args)
            named = self._name_outputs(result)
            declared = {meta.name: meta for meta in self.outputs}
            out: dict[str, torch.Tensor] = {}
            for name, value in named.items():
                tensor = value
                declaration = declared.get(name)
                if declaration is not None:
                    wanted = DATATYPES[declaration.datatype].torch
                    if tensor.dtype != wanted:
                        tensor = tensor.to(wanted)
                out[name] = tensor.cpu() if tensor.device.type != "cpu" else tensor
            return out

    def _name_outputs(self, result: Any) -> dict[str, torch.Tensor]:
        if isinstance(result, torch.Tensor):
            values = [result]
        elif isinstance(result, (tuple, list)):
            values = list(result)
        elif isinstance(result, dict):
            return {str(k): v for k, v in result.items()}
        else:
            raise InferenceFailed(f"the model returned {type(result).__name__}, not tensors")
        names = [meta.name for meta in self.outputs]
        if len(names) < len(values):
            names += [f"output__{i}" for i in range(len(names), len(values))]
        return dict(zip(names, values, strict=False))

    def example_inputs(self, batch: int) -> dict[str, torch.Tensor]:
        """Zeros shaped like the declared inputs (dynamic dims set to ``batch`` / 1)."""
        example = {}
        for meta in self.inputs:
            shape = [batch if i == 0 else (1 if d == -1 else d) for i, d in enumerate(meta.shape)]
            example[meta.name] = torch.zeros(shape, dtype=DATATYPES[meta.datatype].torch)
        return example

    def warmup(self, max_batch_size: int) -> None:
        """Run the model before reporting ready; learn undeclared outputs from it."""
        if not self.extra.get("declared") or any(-1 in meta.shape[1:] for meta in self.inputs):
            log.warning("input shapes are not fully declared: no warm-up inference")
            return
        started = time.monotonic()
        for batch in sorted({1, max_batch_size}):
            for _ in range(2):  # the TorchScript profiling executor optimises on run 2
                outputs = self.predict(self.example_inputs(batch))
        if not self.outputs:
            self.outputs = [
                TensorMeta(name, datatype_of(t.dtype), (-1, *t.shape[1:]))
                for name, t in outputs.items()
            ]
        log.info("warm-up done in %.2fs", time.monotonic() - started)


def _read_metadata(config: RuntimeConfig, path: Path, embedded: str | None) -> dict[str, Any]:
    text = None
    source = ""
    if config.metadata:
        candidate = config.metadata.strip()
        if candidate.startswith("{"):
            text, source = candidate, "MODELYARD_METADATA"
        else:
            try:
                text, source = Path(candidate).read_text(), candidate
            except OSError as error:
                raise ConfigError(f"cannot read metadata file {candidate}: {error}") from None
    elif embedded:
        text, source = embedded, f"{METADATA_FILE} inside the model"
    else:
        sibling = path.with_name(path.name + ".json")
        if sibling.is_file():
            text, source = sibling.read_text(), str(sibling)
    if text is None:
        return {}
    try:
        document = json.loads(text)
        if not isinstance(document, dict):
            raise ValueError("metadata must be an object with 'inputs' and 'outputs'")
        for key in ("inputs", "outputs"):
            document[key] = [TensorMeta.from_json(item) for item in document.get(key, [])]
    except ValueError as error:
        raise ConfigError(f"bad tensor metadata in {source}: {error}") from None
    return document


def _dim(value: Any) -> int:
    return value if isinstance(value, int) else -1


def export_metadata(program: Any) -> tuple[list[TensorMeta], list[TensorMeta]]:
    signature = program.graph_signature
    user_inputs = list(signature.user_inputs)
    inputs: dict[str, TensorMeta] = {}
    outputs: list[TensorMeta] = []
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in user_inputs:
            val = node.meta["val"]
            inputs[node.name] = TensorMeta(
                node.name, datatype_of(val.dtype), tuple(_dim(d) for d in val.shape)
            )
        elif node.op == "output":
            values = node.args[0]
            names = list(signature.user_outputs)
            for index, arg in enumerate(values[-len(names):] if names else values):
                val = arg.meta["val"]
                name = names[index] if index < len(names) else f"output__{index}"
                outputs.append(
                    TensorMeta(name, datatype_of(val.dtype), tuple(_dim(d) for d in val.shape))
                )
    return [inputs[name] for name in user_inputs if name in inputs], outputs


def _load_weights(path: Path, allow_pickle: bool) -> tuple[dict[str, torch.Tensor], str | None]:
    with path.open("rb") as file:
        head = file.read(8)
    if path.suffix == ".safetensors" or (len(head) == 8 and not head.startswith(b"PK")):
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), framework="pt") as handle:
                embedded = (handle.metadata() or {}).get("modelyard")
            return load_file(str(path)), embedded
        except Exception as error:
            raise ModelLoadError(f"{path} is not a readable safetensors file: {error}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except Exception as error:
        raise ModelLoadError(
            f"refusing to load {path}: it is not a plain state dict ({error}). "
            "Arbitrary pickles run code; set MODELYARD_ALLOW_PICKLE=true only for a file you trust"
        ) from None
    if not isinstance(state, dict):
        raise ModelLoadError(f"{path} does not hold a state dict")
    return state, None


@dataclass
class _Loaded:
    module: Any
    embedded: str | None = None  # metadata JSON carried by the file
    derived: tuple[list[TensorMeta], list[TensorMeta]] | None = None  # read from the program
    eager: bool = False  # a plain nn.Module (quantisable)
    device: torch.device | None = None  # where the model must run (an AOTInductor package)


def _load_module(config: RuntimeConfig, path: Path, device: torch.device) -> _Loaded:
    embedded: str | None = None
    module: Any
    derived: tuple[list[TensorMeta], list[TensorMeta]] | None = None
    eager = False
    try:
        if config.model_format == "aoti":
            from modelyard.runtime.aoti import load_package

            package = load_package(path, config.device)
            derived = (package.inputs, package.outputs) if package.inputs else None
            return _Loaded(package.module, derived=derived, device=package.device)
        if config.model_format == "torchscript":
            extra: dict[str, Any] = {METADATA_FILE: ""}
            module = torch.jit.load(  # type: ignore[no-untyped-call]
                str(path), map_location=device, _extra_files=extra
            )
            raw = extra[METADATA_FILE]
            embedded = (raw.decode() if isinstance(raw, bytes) else str(raw)) or None
        elif config.model_format == "export":
            program = torch.export.load(str(path))
            derived = export_metadata(program)
            module = program.module().to(device)
        elif config.model_format == "safetensors":
            assert config.entry_point is not None
            factory = load_object(config.entry_point)
            module = factory()
            if not isinstance(module, torch.nn.Module):
                raise ModelLoadError(f"entry point {config.entry_point} did not build an nn.Module")
            state, embedded = _load_weights(path, config.allow_pickle)
            module.load_state_dict(state)
            module = module.to(device)
            eager = True
        else:  # pickle
            if not config.allow_pickle:
                raise ModelLoadError(
                    f"refusing to unpickle {path}: arbitrary pickles can run any code. "
                    "Use torchscript, export or safetensors, or set MODELYARD_ALLOW_PICKLE=true"
                )
            module = torch.load(path, map_location=device, weights_only=False)
            if not isinstance(module, torch.nn.Module):
                raise ModelLoadError(f"{path} does not hold an nn.Module")
            eager = True
    except (ModelLoadError, ConfigError):
        raise
    except Exception as error:
        raise ModelLoadError(
            f"cannot load {path} as {config.model_format}: {type(error).__name__}: {error}"
        ) from None
    return _Loaded(module, embedded, derived, eager)


def load_source(
    config: RuntimeConfig, path: Path
) -> tuple[Any, list[TensorMeta], list[TensorMeta], bool]:
    """``modelyard convert``'s input: the module as stored (on CPU, not optimised), its
    declared or derived inputs and outputs, and whether it is an eager ``nn.Module``."""
    loaded = _load_module(config, path, torch.device("cpu"))
    if isinstance(loaded.module, torch.nn.Module) and config.model_format != "export":
        loaded.module.eval()
    document = _read_metadata(config, path, loaded.embedded)
    derived = loaded.derived or ([], [])
    inputs = document.get("inputs") or derived[0]
    outputs = document.get("outputs") or derived[1]
    return loaded.module, list(inputs), list(outputs), loaded.eager


def load_model(config: RuntimeConfig, path: Path) -> LoadedModel:
    """Load ``path`` as ``config.model_format``, place it and optimise it."""
    started = time.monotonic()
    device = resolve_device(config.device)
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    compute_dtype = _DTYPES[config.dtype] if config.dtype else None
    with warnings.catch_warnings():  # torch.jit's deprecation notice, once per load
        warnings.simplefilter("ignore", FutureWarning)
        loaded = _load_module(config, path, device)
    module, embedded, derived, eager = loaded.module, loaded.embedded, loaded.derived, loaded.eager
    if config.model_format == "torchscript":
        log.warning("%s is TorchScript, which PyTorch has deprecated: it keeps loading, but "
                    "serve a torch.export program (format export) or an AOTInductor package "
                    "from `modelyard convert` (format aoti) instead", path)
    device = loaded.device or device
    if isinstance(module, torch.nn.Module) and config.model_format != "export":
        module.eval()  # an exported program is already in inference form (and refuses eval())
    if compute_dtype is not None and isinstance(module, torch.nn.Module):
        module = module.to(compute_dtype)
    if config.quantize == "dynamic-int8":
        if not eager or device.type != "cpu":
            raise ConfigError(
                "dynamic-int8 quantisation needs an eager model (safetensors or pickle) on CPU"
            )
        module = torch.ao.quantization.quantize_dynamic(  # type: ignore[no-untyped-call]
            module, {torch.nn.Linear}, torch.qint8
        )
    if config.compile:
        if isinstance(module, torch.jit.ScriptModule):
            module = torch.jit.optimize_for_inference(torch.jit.freeze(module))
        else:
            module = torch.compile(module)

    document = _read_metadata(config, path, embedded)
    inputs = document.get("inputs") or (derived[0] if derived else [])
    outputs = document.get("outputs") or (derived[1] if derived else [])
    if not inputs and isinstance(module, torch.jit.ScriptModule):
        # names from the TorchScript schema; datatype and shape unknown
        arguments = module.forward.schema.arguments[1:]  # type: ignore[attr-defined]
        inputs = [TensorMeta(arg.name, "FP32", (-1,)) for arg in arguments]
        log.warning("no tensor metadata for %s: declare it with MODELYARD_METADATA", path)
    if not inputs and config.model_format == "aoti":
        raise ModelLoadError(
            f"{path} carries no tensor signature (it was not made by `modelyard convert`): "
            "declare its inputs and outputs with MODELYARD_METADATA or a sibling .json file")
    model = LoadedModel(
        name=config.model_name,
        version=config.model_version,
        platform=f"pytorch_{config.model_format}",
        module=module,
        device=device,
        inputs=list(inputs),
        outputs=list(outputs),
        compute_dtype=compute_dtype,
    )
    model.extra["declared"] = bool(document.get("inputs") or derived)
    model.load_seconds = time.monotonic() - started
    log.info("loaded %s (%s) on %s in %.2fs", path, config.model_format, device,
             model.load_seconds)
    return model

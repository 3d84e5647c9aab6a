"""Model explanations: which parts of each input a prediction rests on, with Captum.

Called by ``server.py`` for ``POST /v2/models/{name}[/versions/{v}]/explain`` when the
deployment turns explanations on (``spec.runtime.explain``, ``MODELYARD_EXPLAIN``); the
runtime builds one :class:`Explainer` at load. The request is an OIP inference request;
the answer holds the model's outputs and, per input, an attribution tensor of the input's
shape (docs/runtime.md#explanations).

Methods (Captum's, never our own arithmetic):

- ``integrated_gradients`` (default): Captum's ``IntegratedGradients`` from a zeros
  baseline in ``steps`` steps; the attributions of a row add up to output(x) minus
  output(baseline) for its target, up to the reported ``convergence_delta``.
- ``saliency``: Captum's ``Saliency``, the absolute gradient at x: one backward pass.

Cost and bounds: an explanation is ``steps`` forward and backward passes per row, so it
never runs on the batcher's inference thread. It runs on threads of its own, at most
``explain_max_concurrent`` at once; past that, a request is refused at once with
:class:`Overloaded` (503, Retry-After), and inference goes on. A request holds at most
``explain_max_batch_size`` rows and at most ``explain_steps`` steps; Captum's passes are
chunked to the batcher's ``max_batch_size`` rows (or two steps of the request's rows, if
more), so memory stays about that of an inference batch.

What can be explained: a model with autograd (eager modules: safetensors and pickle;
exported programs, through ``ExportedProgram.module()``; TorchScript) with floating-point
inputs, and an output of shape [batch] or [batch, classes]. An AOTInductor package and
dynamic-int8 layers have no gradients: ``config.py`` refuses explanations for them.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import orjson
import torch

from modelyard.runtime.config import EXPLAIN_METHODS, RuntimeConfig
from modelyard.runtime.errors import (
    InferenceFailed,
    InvalidInput,
    ModelLoadError,
    NotEnabled,
    Overloaded,
    RuntimeServingError,
    ServiceUnavailable,
    status_for,
)
from modelyard.runtime.models import LoadedModel
from modelyard.runtime.protocol import InferRequest, datatype_of, validate_inputs

__all__ = ["Explainer", "outcome_of"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Ask:
    """What one request asks for, checked."""

    method: str
    steps: int
    output: str
    target: int | list[int] | None


def outcome_of(error: BaseException | None) -> str:
    """The ``outcome`` label of an explain request (metrics.EXPLAIN_OUTCOMES)."""
    if error is None:
        return "ok"
    if isinstance(error, NotEnabled):
        return "off"
    status = status_for(error) if isinstance(error, Exception) else 500
    if status == 503:
        return "overloaded"
    return "invalid" if 400 <= status < 500 else "failed"


class Explainer:
    """Explanations of one loaded model, bounded in rows, steps and concurrency."""

    def __init__(self, model: LoadedModel, config: RuntimeConfig,
                 on_computed: Callable[[float], None] | None = None) -> None:
        # captum.attr imports matplotlib (about 2 s): only in a runtime that explains
        from captum.attr import IntegratedGradients, Saliency

        self._methods: dict[str, Any] = {"integrated_gradients": IntegratedGradients,
                                         "saliency": Saliency}
        self.model = model
        self.method = config.explain_method
        self.steps = config.explain_steps
        self.max_rows = config.explain_max_batch_size
        self.chunk = config.max_batch_size
        self.max_concurrent = config.explain_max_concurrent
        self._running = 0
        self._seconds = 0.0  # recent time of one explanation (Retry-After)
        self._on_computed = on_computed
        self._pool = ThreadPoolExecutor(self.max_concurrent, thread_name_prefix="explain")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # admission ----------------------------------------------------------------------------
    def check_room(self) -> None:
        """Raise :class:`Overloaded` while ``max_concurrent`` explanations run."""
        if self._running >= self.max_concurrent:
            raise Overloaded(
                f"{self._running} explanation(s) running, the bound of this model "
                "(spec.runtime.explain.maxConcurrent); inference is not affected; retry later",
                max(1, math.ceil(self._seconds)))

    def _ask(self, parameters: dict[str, Any]) -> _Ask:
        method = parameters.get("method", self.method)
        if method not in EXPLAIN_METHODS:
            raise InvalidInput(f"parameter 'method' must be one of {', '.join(EXPLAIN_METHODS)}")
        steps = parameters.get("steps", self.steps)
        if isinstance(steps, bool) or not isinstance(steps, int) or not 2 <= steps <= self.steps:
            raise InvalidInput(f"parameter 'steps' must be an integer from 2 to {self.steps} "
                               "(spec.runtime.explain.steps)")
        output = parameters.get("output", self._default_output())
        names = [meta.name for meta in self.model.outputs]
        if not isinstance(output, str) or (names and output not in names):
            raise InvalidInput(f"parameter 'output' must name an output of the model: "
                               f"{', '.join(names)}")
        target = parameters.get("target")
        if target is not None and not (_is_int(target) or (
                isinstance(target, list) and target and all(_is_int(t) for t in target))):
            raise InvalidInput("parameter 'target' must be a class index or a list of one "
                               "index per row")
        return _Ask(method, steps, output, target)

    def _default_output(self) -> str:
        """The first floating-point output declared (a classifier's logits)."""
        for meta in self.model.outputs:
            if meta.datatype in ("FP32", "FP16", "BF16", "FP64"):
                return meta.name
        return self.model.outputs[0].name if self.model.outputs else "output__0"

    # the request --------------------------------------------------------------------------
    async def explain(self, request: InferRequest) -> bytes:
        """Check ``request``, compute its attributions on an explain thread, encode them."""
        model = self.model
        inputs = validate_inputs(request.inputs, model.inputs)
        for name, tensor in inputs.items():
            if not tensor.is_floating_point():
                raise InvalidInput(f"input {name!r} is {datatype_of(tensor.dtype)}: attributions "
                                   "need floating-point inputs")
        rows = next(iter(inputs.values())).shape[0]
        if rows > self.max_rows:
            raise InvalidInput(f"{rows} rows: an explanation takes at most {self.max_rows} "
                               "(spec.runtime.explain.maxBatchSize)")
        ask = self._ask(request.parameters)
        if request.outputs is not None:
            known = {meta.name for meta in model.outputs}
            for wanted in request.outputs:
                if known and wanted.name not in known:
                    raise InvalidInput(f"unknown output {wanted.name!r}; the model returns "
                                       f"{', '.join(sorted(known))}")
        self.check_room()
        self._running += 1
        started = time.perf_counter()
        try:
            loop = asyncio.get_running_loop()
            outputs, attributions, details = await loop.run_in_executor(
                self._pool, self.compute, inputs, ask)
        finally:
            self._running -= 1
        elapsed = time.perf_counter() - started
        self._seconds = elapsed if not self._seconds else 0.7 * self._seconds + 0.3 * elapsed
        if self._on_computed is not None:
            self._on_computed(elapsed)
        wanted_outputs = [o.name for o in request.outputs] if request.outputs else list(outputs)
        document: dict[str, Any] = {
            "model_name": model.name,
            "model_version": model.version,
            "outputs": [_tensor_json(name, outputs[name]) for name in wanted_outputs
                        if name in outputs],
            "attributions": [_tensor_json(name, t) for name, t in attributions.items()],
            "parameters": details,
        }
        if request.id is not None:
            document["id"] = request.id
        return orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)

    # on an explain thread -------------------------------------------------------------------
    def compute(
        self, inputs: dict[str, torch.Tensor], ask: _Ask
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
        """The model's outputs, each input's attributions and what was computed (blocking)."""
        model = self.model
        outputs = model.predict(inputs)
        if ask.output not in outputs:
            raise InvalidInput(f"parameter 'output': the model returned no {ask.output!r} "
                               f"(it returns {', '.join(outputs)})")
        explained = outputs[ask.output]
        if not explained.is_floating_point() or explained.dim() not in (1, 2):
            raise InvalidInput(
                f"output {ask.output!r} is {datatype_of(explained.dtype)} of shape "
                f"{list(explained.shape)}: attributions explain a floating-point output of "
                "shape [batch] or [batch, classes] (choose one with parameter 'output')")
        targets = _targets(explained, ask.target)
        names = list(inputs)
        forward = self._forward(ask.output)
        attribute = self._methods[ask.method](forward).attribute
        args = tuple(inputs[name] for name in names)
        details: dict[str, Any] = {"method": ask.method, "output": ask.output,
                                   "target": targets}
        try:
            if ask.method == "integrated_gradients":
                rows = args[0].shape[0]
                result, delta = attribute(
                    args, baselines=tuple(torch.zeros_like(a) for a in args), target=targets,
                    n_steps=ask.steps, internal_batch_size=max(self.chunk, 2 * rows),
                    return_convergence_delta=True)
                details.update(steps=ask.steps, baseline="zeros",
                               convergence_delta=delta.detach().float().tolist())
            else:  # the gradient at the inputs themselves: they need autograd
                result = attribute(tuple(a.detach().requires_grad_(True) for a in args),
                                   target=targets, abs=True)
        except RuntimeServingError:
            raise
        except torch.OutOfMemoryError:
            raise ServiceUnavailable("out of device memory while explaining; retry later "
                                     "with fewer rows or steps") from None
        except Exception as error:
            raise InferenceFailed(f"the explanation failed: {type(error).__name__}: "
                                  f"{str(error)[:500]}") from None
        attributions = {name: tensor.detach().float().cpu()
                        for name, tensor in zip(names, result, strict=True)}
        return outputs, attributions, details

    def _forward(self, output: str) -> Callable[..., torch.Tensor]:
        """The model as Captum calls it: positional inputs in, the explained output out,
        with autograd (``LoadedModel.predict`` runs in inference mode)."""
        model = self.model

        def forward(*args: torch.Tensor) -> torch.Tensor:
            placed = []
            for tensor in args:
                moved = tensor.to(model.device)
                if model.compute_dtype is not None:
                    moved = moved.to(model.compute_dtype)
                placed.append(moved)
            named = model._name_outputs(model.module(*placed))
            return named[output].float()

        return forward

    def check(self) -> None:
        """At load (blocking): explain zeros shaped like the inputs, two steps, so a model
        that cannot be explained fails its start with the reason, not its first request."""
        example = self.model.example_inputs(1)
        try:
            inputs = validate_inputs(example, self.model.inputs)
            for name, tensor in inputs.items():
                if not tensor.is_floating_point():
                    raise InvalidInput(f"input {name!r} is {datatype_of(tensor.dtype)}, and "
                                       "attributions need floating-point inputs")
            self.compute(inputs, _Ask(self.method, 2, self._default_output(), None))
        except RuntimeServingError as error:
            raise ModelLoadError(f"explanations are on (spec.runtime.explain), but this "
                                 f"model cannot be explained: {error}") from None
        log.info("explanations on: %s, up to %d steps, %d rows, %d at once", self.method,
                 self.steps, self.max_rows, self.max_concurrent)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _targets(explained: torch.Tensor, target: int | list[int] | None) -> list[int] | None:
    """One class index per row: the request's, else each row's highest output."""
    rows = explained.shape[0]
    if explained.dim() == 1:
        if target is not None:
            raise InvalidInput("parameter 'target': the explained output has one value per "
                               "row, there is no class to choose")
        return None
    classes = explained.shape[1]
    if target is None:
        return [int(i) for i in explained.argmax(dim=1).tolist()]
    chosen = [target] * rows if isinstance(target, int) else target
    if len(chosen) != rows:
        raise InvalidInput(f"parameter 'target' has {len(chosen)} indices for {rows} rows")
    if any(not 0 <= t < classes for t in chosen):
        raise InvalidInput(f"parameter 'target' must be a class index from 0 to {classes - 1}")
    return chosen


def _tensor_json(name: str, tensor: torch.Tensor) -> dict[str, Any]:
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return {"name": name, "datatype": datatype_of(tensor.dtype), "shape": list(tensor.shape),
            "data": tensor.contiguous().numpy().reshape(-1)}

"""Dynamic batching: gather queued requests into one forward pass, split results back.

Used by ``server.py``: each inference request calls :meth:`Batcher.submit`
with its validated input tensors (any batch size of its own) and awaits its
slice of the outputs. One worker coroutine drains the queue; the model runs on
one dedicated inference thread, so the event loop keeps accepting requests
while a batch runs.

Policy (no polling: the worker sleeps on an event, or a timer):
- when the model is idle and a request arrives, it is dispatched at once;
- while a batch runs, requests queue; when it ends they are taken together,
  up to ``max_batch_size`` items, concatenated along dim 0;
- the only deliberate wait: right after a batch of k items finishes with q
  items queued, the k clients it answered are likely to send again at once,
  so the worker waits up to ``max_delay_ms`` until min(k + q, max_batch_size)
  items are queued. At concurrency 1 that is never (k = 1, and the next
  request makes q = 1); under steady closed-loop load it turns the
  "two half batches in turn" equilibrium (4 + 4 at concurrency 8) into full
  batches, which a CPU runs faster per item. An idle model (no batch just
  finished) never waits.
- only requests with the same dtypes and trailing shapes are concatenated.
- when a batch fails, each of its requests is run on its own, so only the
  requests that cause the failure fail.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from modelyard.runtime.errors import (
    InferenceFailed,
    RuntimeServingError,
    ServiceUnavailable,
)

__all__ = ["Batcher"]

log = logging.getLogger(__name__)

Tensors = dict[str, torch.Tensor]


@dataclass
class _Pending:
    inputs: Tensors
    size: int
    key: tuple[object, ...]
    future: asyncio.Future[Tensors]


def _key(inputs: Tensors) -> tuple[object, ...]:
    return tuple((name, t.dtype, tuple(t.shape[1:])) for name, t in inputs.items())


class Batcher:
    """Queue requests, run them in batches on one inference thread."""

    def __init__(
        self,
        predict: Callable[[Tensors], Tensors],
        max_batch_size: int,
        max_delay_ms: float,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        self._predict = predict
        self._max_batch = max_batch_size
        self._max_delay = max_delay_ms / 1000.0
        self._on_batch = on_batch
        self._queue: collections.deque[_Pending] = collections.deque()
        self._queued_items = 0
        self._wakeup = asyncio.Event()
        self._closing = False
        self._expected = 0
        self._window_end = 0.0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._worker: asyncio.Task[None] | None = None
        self.busy = False

    @property
    def queue_depth(self) -> int:
        """Items waiting (not yet in a running batch)."""
        return self._queued_items

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    async def stop(self) -> None:
        """Finish every queued request, then stop the worker and the thread."""
        self._closing = True
        self._wakeup.set()
        if self._worker is not None:
            await self._worker
        self._executor.shutdown(wait=True)

    async def submit(self, inputs: Tensors) -> Tensors:
        """Queue one request's inputs; return its outputs."""
        if self._closing:
            raise ServiceUnavailable("the server is shutting down")
        size = next(iter(inputs.values())).shape[0]
        future: asyncio.Future[Tensors] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(inputs, size, _key(inputs), future))
        self._queued_items += size
        self._wakeup.set()
        return await future

    def _take(self) -> list[_Pending]:
        head = self._queue.popleft()
        batch, items = [head], head.size
        kept: list[_Pending] = []
        while self._queue and items < self._max_batch:
            pending = self._queue.popleft()
            if pending.key == head.key and items + pending.size <= self._max_batch:
                batch.append(pending)
                items += pending.size
            else:
                kept.append(pending)
        self._queue.extendleft(reversed(kept))
        self._queued_items -= items
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            remaining = self._window_end - loop.time()
            if self._queued_items < self._expected and remaining > 0 and not self._closing:
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except TimeoutError:
                    self._window_end = 0.0
                continue
            batch = self._take()
            batch = [p for p in batch if not p.future.cancelled()]
            if not batch:
                continue
            self.busy = True
            started = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._executor, self._run_batch, batch)
            except BaseException as error:  # the thread pool itself failed
                results = [error] * len(batch)
            finally:
                self.busy = False
            elapsed = time.perf_counter() - started
            items = sum(p.size for p in batch)
            if self._on_batch is not None:
                self._on_batch(items, elapsed)
            for pending, result in zip(batch, results, strict=True):
                if pending.future.done():
                    continue
                if isinstance(result, BaseException):
                    pending.future.set_exception(result)
                else:
                    pending.future.set_result(result)
            # the clients just answered plus those already queued are likely to be
            # waiting for the next forward pass: worth up to max_delay to gather them
            self._expected = min(items + self._queued_items, self._max_batch)
            self._window_end = loop.time() + self._max_delay

    def _run_batch(self, batch: list[_Pending]) -> list[Tensors | BaseException]:
        """On the inference thread: one forward pass, or one per request on failure."""
        if len(batch) == 1:
            return [self._run_one(batch[0])]
        names = list(batch[0].inputs)
        total = sum(p.size for p in batch)
        try:
            joined = {name: torch.cat([p.inputs[name] for p in batch]) for name in names}
            outputs = self._predict(joined)
            if any(t.dim() == 0 or t.shape[0] != total for t in outputs.values()):
                raise ValueError("outputs do not keep the batch dimension")
        except Exception as error:
            log.warning("batch of %d requests failed (%s); running them one by one",
                        len(batch), error)
            return [self._run_one(p) for p in batch]
        results: list[Tensors | BaseException] = []
        offset = 0
        for pending in batch:
            end = offset + pending.size
            results.append({name: t[offset:end] for name, t in outputs.items()})
            offset = end
        return results

    def _run_one(self, pending: _Pending) -> Tensors | BaseException:
        try:
            return self._predict(pending.inputs)
        except RuntimeServingError as error:
            return error
        except torch.OutOfMemoryError:
            return ServiceUnavailable("out of device memory; retry later")
        except Exception as error:
            return InferenceFailed(f"the model failed on this input: {type(error).__name__}: "
                                   f"{str(error)[:500]}")

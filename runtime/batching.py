"""Dynamic batching: gather queued requests into one forward pass, split results back.

Used by ``server.py``: each inference request calls :meth:`Batcher.submit`
with its validated input tensors (any batch size of its own) and awaits its
slice of the outputs. The model runs on one dedicated inference thread, so the
event loop keeps accepting requests while a batch runs. There is no worker
coroutine: the batcher is a small state machine driven by loop callbacks
(a request arrives, a batch finishes, a window timer fires); a batch goes to
the thread through a ``SimpleQueue`` and comes back with one
``call_soon_threadsafe``, so each forward pass costs two thread wake-ups and
no task switches.

Policy (no polling: nothing runs until a request arrives, a batch ends or a timer fires):
- when the model is idle and a request arrives, it is dispatched at once;
- while a batch runs, requests queue; when it ends they are taken together,
  up to ``max_batch_size`` items, concatenated along dim 0;
- the only deliberate wait: right after a batch of k items finishes with q
  items queued, the k clients it answered are likely to send again at once,
  so the batcher waits up to ``max_delay_ms`` until min(k + q, max_batch_size)
  items are queued. At concurrency 1 that is never (k = 1, and the next
  request makes q = 1); under steady closed-loop load it turns the
  "two half batches in turn" equilibrium (4 + 4 at concurrency 8) into full
  batches, which a CPU runs faster per item. An idle model (no batch just
  finished) never waits.
- only requests with the same dtypes and trailing shapes are concatenated.
- when a batch fails, each of its requests is run on its own, so only the
  requests that cause the failure fail.

Overload (docs/runtime.md#overload-and-deadlines): the queue is bounded.
- by items (``max_queue_items``): a request that would take the queue past it is
  refused at once with :class:`Overloaded` (503, ``Retry-After``); a request is always
  admitted into an empty queue, whatever its size;
- by time (``max_queue_wait_ms``): a request is refused at once when the wait the queue
  ahead of it predicts (its batches times the recent forward-pass time) is over the
  bound, and one still queued when the bound passes is answered 503 then;
- a request with a deadline still queued when the deadline passes is answered
  :class:`DeadlineExceeded` (504) at that moment; it never reaches the model;
- a request whose caller stops waiting (the HTTP client disconnected, the gRPC call was
  cancelled: its task is cancelled) leaves the queue at once. A request already in a
  running batch is finished: a forward pass is not interrupted.
Each shed request is reported through ``on_shed(reason)``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from modelyard.runtime.errors import (
    DeadlineExceeded,
    InferenceFailed,
    Overloaded,
    RuntimeServingError,
    ServiceUnavailable,
)

__all__ = ["DEADLINE", "DISCONNECTED", "QUEUE_FULL", "QUEUE_WAIT", "Batcher"]

# The reasons a request is shed (the label of the runtime's rejected-requests counter).
QUEUE_FULL = "queue_full"  # refused on arrival: the queue holds max_queue_items
QUEUE_WAIT = "queue_wait"  # refused on arrival, or dropped, for max_queue_wait_ms
DEADLINE = "deadline"  # its own deadline passed while it was queued
DISCONNECTED = "disconnected"  # its caller stopped waiting while it was queued

log = logging.getLogger(__name__)

Tensors = dict[str, torch.Tensor]


@dataclass(eq=False)  # identity: the queue removes a request by itself, never by value
class _Pending:
    inputs: Tensors
    size: int
    key: tuple[object, ...]
    future: asyncio.Future[Tensors]
    queued: bool = True
    timer: asyncio.TimerHandle | None = None


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
        *,
        max_queue_items: int = 0,
        max_queue_wait_ms: float = 0.0,
        on_shed: Callable[[str], None] | None = None,
    ) -> None:
        self._predict = predict
        self._max_batch = max_batch_size
        self._max_delay = max_delay_ms / 1000.0
        self._on_batch = on_batch
        self._max_items = max_queue_items  # 0: no bound by items
        self._max_wait = max_queue_wait_ms / 1000.0  # 0: no bound by time
        self._on_shed = on_shed
        self._batch_seconds = 0.0  # moving average of a forward pass's time
        self._queue: collections.deque[_Pending] = collections.deque()
        self._queued_items = 0
        self._closing = False
        self._expected = 0
        self._window_end = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._scheduled = False
        self._drained: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._jobs: queue.SimpleQueue[list[_Pending] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.busy = False

    @property
    def queue_depth(self) -> int:
        """Items waiting (not yet in a running batch)."""
        return self._queued_items

    def start(self) -> None:
        """Start the inference thread (call from the event loop that will submit)."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._serve, name="inference", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Finish every queued request, then stop the inference thread."""
        self._closing = True
        if self._loop is None or self._thread is None:
            return
        self._dispatch()  # a batch window in progress ends now
        while self.busy or self._queue:
            self._drained = self._loop.create_future()
            await self._drained
        self._jobs.put(None)
        await asyncio.to_thread(self._thread.join)

    async def submit(self, inputs: Tensors, deadline: float | None = None) -> Tensors:
        """Queue one request's inputs; return its outputs.

        ``deadline``: the event loop's time (``loop.time()``) past which the caller no
        longer wants the answer. Raises :class:`Overloaded` at once when the queue is at
        its bound, :class:`DeadlineExceeded` when the deadline passes while queued.
        """
        if self._closing:
            raise ServiceUnavailable("the server is shutting down")
        loop = self._loop
        assert loop is not None, "Batcher.start() was not called"
        size = next(iter(inputs.values())).shape[0]
        now = loop.time()
        if deadline is not None and deadline <= now:
            self._shed(DEADLINE)
            raise DeadlineExceeded("the request's deadline passed before it was queued")
        self._admit(size)
        future: asyncio.Future[Tensors] = loop.create_future()
        pending = _Pending(inputs, size, _key(inputs), future)
        expiry, reason = deadline, DEADLINE
        if self._max_wait and (expiry is None or now + self._max_wait < expiry):
            expiry, reason = now + self._max_wait, QUEUE_WAIT
        if expiry is not None:
            pending.timer = loop.call_at(expiry, self._expire, pending, reason)
        self._queue.append(pending)
        self._queued_items += size
        if not self.busy and not self._scheduled:
            # dispatch after the callbacks already due: requests that arrived in the same
            # loop iteration join this batch
            self._scheduled = True
            loop.call_soon(self._dispatch)
        try:
            return await future
        except asyncio.CancelledError:
            if pending.queued:  # the caller left: its work leaves the queue with it
                self._unqueue(pending)
                self._shed(DISCONNECTED)
            raise

    def check_room(self) -> None:
        """Raise :class:`Overloaded` when the queue has no room even for one item: the
        server calls it before reading a request's body, so refusing costs neither."""
        self._admit(1)

    def retry_after(self) -> int:
        """Whole seconds until the queue, as it is, has drained (at least 1)."""
        batches = math.ceil(self._queued_items / self._max_batch) + self.busy
        return max(1, math.ceil(batches * self._batch_seconds))

    def _admit(self, size: int) -> None:
        """Refuse a request of ``size`` items that the queue's bounds have no room for."""
        queued = self._queued_items
        if not queued:
            return
        if self._max_items and queued + size > self._max_items:
            self._shed(QUEUE_FULL)
            raise Overloaded(f"the queue is full ({queued} items waiting, bound "
                             f"{self._max_items}); retry later", self.retry_after())
        if self._max_wait and self._batch_seconds:
            ahead = math.ceil(queued / self._max_batch) + self.busy
            if ahead * self._batch_seconds > self._max_wait:
                self._shed(QUEUE_WAIT)
                raise Overloaded(
                    f"the queue would hold this request about {ahead * self._batch_seconds:.3f}"
                    f" s, over its bound of {self._max_wait:.3f} s; retry later",
                    self.retry_after())

    def _shed(self, reason: str) -> None:
        if self._on_shed is not None:
            self._on_shed(reason)

    def _unqueue(self, pending: _Pending) -> None:
        """Take one request out of the queue (it will not reach the model)."""
        self._queue.remove(pending)
        self._queued_items -= pending.size
        pending.queued = False
        if pending.timer is not None:
            pending.timer.cancel()
        drained = self._drained
        if not self.busy and not self._queue and drained is not None and not drained.done():
            drained.set_result(None)

    def _expire(self, pending: _Pending, reason: str) -> None:
        """Its deadline or the queue's wait bound passed while ``pending`` was queued."""
        if not pending.queued or pending.future.done():
            return
        pending.timer = None
        self._unqueue(pending)
        self._shed(reason)
        if reason == DEADLINE:
            pending.future.set_exception(
                DeadlineExceeded("the request's deadline passed while it was queued"))
        else:
            pending.future.set_exception(Overloaded(
                f"the request waited {self._max_wait:.3f} s in the queue, its bound; retry "
                "later", self.retry_after()))

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
        for pending in batch:
            pending.queued = False
            if pending.timer is not None:
                pending.timer.cancel()
        return batch

    # on the event loop ----------------------------------------------------------------
    def _dispatch(self) -> None:
        """Send the next batch to the thread, unless busy or inside a batch window."""
        self._scheduled = False
        loop = self._loop
        assert loop is not None
        while not self.busy and self._queue:
            waiting = self._queued_items < self._expected and not self._closing
            if waiting and loop.time() < self._window_end:
                if self._timer is None:
                    self._timer = loop.call_at(self._window_end, self._window_over)
                return
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            batch = [p for p in self._take() if not p.future.cancelled()]
            if batch:
                self.busy = True
                self._jobs.put(batch)
        drained = self._drained
        if not self.busy and not self._queue and drained is not None and not drained.done():
            drained.set_result(None)

    def _window_over(self) -> None:
        self._timer = None
        self._window_end = 0.0
        self._dispatch()

    def _finished(
        self, batch: list[_Pending], results: list[Tensors | BaseException], elapsed: float
    ) -> None:
        """A batch came back from the thread: answer its requests, dispatch the next."""
        self.busy = False
        items = sum(p.size for p in batch)
        # the forward pass's recent time (batches are full when it matters: under load)
        self._batch_seconds = elapsed if not self._batch_seconds else (
            0.8 * self._batch_seconds + 0.2 * elapsed)
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
        assert self._loop is not None
        self._expected = min(items + self._queued_items, self._max_batch)
        self._window_end = self._loop.time() + self._max_delay
        self._dispatch()

    # on the inference thread ----------------------------------------------------------
    def _serve(self) -> None:
        loop = self._loop
        assert loop is not None
        while True:
            batch = self._jobs.get()
            if batch is None:
                return
            started = time.perf_counter()
            try:
                results = self._run_batch(batch)
            except BaseException as error:  # reaches every request
                results = [error] * len(batch)
            elapsed = time.perf_counter() - started
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                loop.call_soon_threadsafe(self._finished, batch, results, elapsed)

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

"""How many API calls the operator has in flight, and whose go first.

A thousand ModelDeployments applied at once start a thousand passes, each with a few
writes. Unbounded, they would queue in the API server in arrival order: a user's
``kubectl apply`` behind them, and the status of a model that is already Ready (its pods
came up) behind the creation of the hundredth model. The :class:`Gate` lets
:data:`LIMIT` calls run at once (fewer than the threads that carry them, so a lease
renewal, which does not pass the gate, never waits for a thread) and hands free slots out
by priority, first come first served within one:

* :data:`REPORT`: status patches, Events and replica changes: what users and the
  autoscaler wait for;
* :data:`UPDATE`: applies to children that exist (a rollout, a reverted hand edit);
* :data:`CREATE`: applies that create a model's first children.

The same priorities order whole passes (:data:`PASSES` at once, see
:class:`~.reconcile.Reconciler`): a pass waiting for its turn holds nothing but its key,
where a pass waiting for an API slot holds its rendered plan.

Pure asyncio: no Kubernetes client.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
from collections.abc import AsyncIterator

REPORT, UPDATE, CREATE = 0, 1, 2
LIMIT = 4
PASSES = 8  # passes at once: enough to keep LIMIT calls busy while others plan


class Gate:
    def __init__(self, limit: int = LIMIT):
        if limit < 1:
            raise ValueError("a gate needs at least one slot")
        self.limit = limit
        self._free = limit
        self._waiting: list[tuple[int, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    @property
    def in_flight(self) -> int:
        return self.limit - self._free

    @property
    def queued(self) -> int:
        return sum(1 for *_, future in self._waiting if not future.done())

    @contextlib.asynccontextmanager
    async def slot(self, priority: int) -> AsyncIterator[None]:
        """Hold one of the gate's slots; waits, in ``priority`` order, while all are taken."""
        if self._free:  # a free slot means nobody waits: a release hands slots to waiters
            self._free -= 1
        else:
            future = asyncio.get_running_loop().create_future()
            heapq.heappush(self._waiting, (priority, next(self._order), future))
            try:
                await future
            except asyncio.CancelledError:
                if future.done() and not future.cancelled():
                    self._release()  # handed a slot just as it was cancelled: pass it on
                raise
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        while self._waiting:
            *_, future = heapq.heappop(self._waiting)
            if not future.done():  # a cancelled waiter's future is done
                future.set_result(None)
                return
        self._free += 1

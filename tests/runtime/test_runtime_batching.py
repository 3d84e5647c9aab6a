"""The dynamic batcher on its own: dispatch policy, concat/split, failure isolation, drain."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from modelyard.runtime.batching import Batcher
from modelyard.runtime.errors import InferenceFailed, ServiceUnavailable

Tensors = dict[str, torch.Tensor]


class Recorder:
    """A fake model: doubles x, records every batch, can be held or made to fail."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()

    def __call__(self, inputs: Tensors) -> Tensors:
        x = inputs["x"]
        self.started.set()
        self.gate.wait(timeout=30)
        if bool((x < 0).any()):
            raise RuntimeError("negative input")
        self.batches.append(x.shape[0])
        return {"y": x * 2, "rowsum": x.sum(dim=1)}


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(asyncio.wait_for(coro, timeout=60))


def test_idle_model_dispatches_at_once_even_with_a_long_delay() -> None:
    model = Recorder()

    async def scenario() -> Tensors:
        batcher = Batcher(model, max_batch_size=16, max_delay_ms=60_000)
        batcher.start()
        try:
            # would hang for a minute if the batcher waited for the batch to fill
            return await asyncio.wait_for(batcher.submit({"x": torch.ones(1, 3)}), timeout=30)
        finally:
            await batcher.stop()

    out = run(scenario())
    assert torch.equal(out["y"], torch.full((1, 3), 2.0))
    assert model.batches == [1]


def test_requests_queued_while_busy_form_one_batch_and_split_back() -> None:
    model = Recorder()

    async def scenario() -> list[Tensors]:
        batcher = Batcher(model, max_batch_size=64, max_delay_ms=1)
        batcher.start()
        model.gate.clear()
        first = asyncio.ensure_future(batcher.submit({"x": torch.zeros(1, 2)}))
        await asyncio.to_thread(model.started.wait, 30)
        # the model is busy: these queue, with batches of their own (1, 2, 3, 4 rows)
        xs = [torch.arange(n * 2, dtype=torch.float32).view(n, 2) + 100 * n for n in range(1, 5)]
        rest = [asyncio.ensure_future(batcher.submit({"x": x})) for x in xs]
        await asyncio.sleep(0.05)
        assert batcher.queue_depth == 10
        model.gate.set()
        results = await asyncio.gather(first, *rest)
        await batcher.stop()
        for x, out in zip(xs, results[1:], strict=True):
            assert torch.equal(out["y"], x * 2)
            assert torch.equal(out["rowsum"], x.sum(dim=1))
        return results

    run(scenario())
    assert model.batches == [1, 10]


def test_max_batch_size_is_respected() -> None:
    model = Recorder()

    async def scenario() -> None:
        batcher = Batcher(model, max_batch_size=4, max_delay_ms=1)
        batcher.start()
        model.gate.clear()
        futures = [asyncio.ensure_future(batcher.submit({"x": torch.ones(1, 2)}))
                   for _ in range(11)]
        await asyncio.to_thread(model.started.wait, 30)
        model.gate.set()
        await asyncio.gather(*futures)
        await batcher.stop()

    run(scenario())
    assert sum(model.batches) == 11
    assert max(model.batches) <= 4


def test_a_request_larger_than_the_batch_runs_alone() -> None:
    model = Recorder()

    async def scenario() -> Tensors:
        batcher = Batcher(model, max_batch_size=4, max_delay_ms=1)
        batcher.start()
        out = await batcher.submit({"x": torch.ones(9, 2)})
        await batcher.stop()
        return out

    assert run(scenario())["y"].shape == (9, 2)
    assert model.batches == [9]


def test_only_compatible_shapes_are_concatenated() -> None:
    model = Recorder()

    async def scenario() -> None:
        batcher = Batcher(model, max_batch_size=16, max_delay_ms=1)
        batcher.start()
        model.gate.clear()
        first = asyncio.ensure_future(batcher.submit({"x": torch.ones(1, 2)}))
        await asyncio.to_thread(model.started.wait, 30)
        shapes = [(1, 2), (1, 5), (2, 2), (1, 5)]
        futures = [asyncio.ensure_future(batcher.submit({"x": torch.ones(*s)})) for s in shapes]
        await asyncio.sleep(0.05)
        model.gate.set()
        results = await asyncio.gather(first, *futures)
        await batcher.stop()
        for shape, out in zip(shapes, results[1:], strict=True):
            assert out["y"].shape == shape

    run(scenario())
    assert model.batches == [1, 3, 2]  # the (.,2) requests together, then the (.,5) ones


def test_a_failing_request_fails_alone() -> None:
    model = Recorder()

    async def scenario() -> list[object]:
        batcher = Batcher(model, max_batch_size=16, max_delay_ms=1)
        batcher.start()
        model.gate.clear()
        first = asyncio.ensure_future(batcher.submit({"x": torch.ones(1, 2)}))
        await asyncio.to_thread(model.started.wait, 30)
        values = [1.0, -1.0, 3.0]
        futures = [asyncio.ensure_future(batcher.submit({"x": torch.full((1, 2), v)}))
                   for v in values]
        await asyncio.sleep(0.05)
        model.gate.set()
        results = await asyncio.gather(first, *futures, return_exceptions=True)
        await batcher.stop()
        return list(results)

    results = run(scenario())
    assert isinstance(results[2], InferenceFailed)  # only the request that broke it fails
    assert "negative input" in str(results[2])
    assert torch.equal(results[1]["y"], torch.full((1, 2), 2.0))  # type: ignore[index]
    assert torch.equal(results[3]["y"], torch.full((1, 2), 6.0))  # type: ignore[index]


def test_stop_finishes_queued_requests_then_refuses_new_ones() -> None:
    model = Recorder()

    async def scenario() -> None:
        batcher = Batcher(model, max_batch_size=2, max_delay_ms=1)
        batcher.start()
        model.gate.clear()
        futures = [asyncio.ensure_future(batcher.submit({"x": torch.ones(1, 2)}))
                   for _ in range(5)]
        await asyncio.to_thread(model.started.wait, 30)
        stopping = asyncio.ensure_future(batcher.stop())
        await asyncio.sleep(0.02)
        model.gate.set()
        await stopping
        assert all(f.done() and not f.exception() for f in futures)
        with pytest.raises(ServiceUnavailable):
            await batcher.submit({"x": torch.ones(1, 2)})

    run(scenario())
    assert sum(model.batches) == 5


def test_after_a_batch_of_k_the_batcher_waits_briefly_for_k() -> None:
    """Closed-loop clients resubmit right after their answers: keep batches whole."""
    model = Recorder()

    async def scenario() -> None:
        batcher = Batcher(model, max_batch_size=8, max_delay_ms=200)
        batcher.start()
        model.gate.clear()
        first = asyncio.ensure_future(batcher.submit({"x": torch.ones(1, 2)}))
        await asyncio.to_thread(model.started.wait, 30)
        four = [asyncio.ensure_future(batcher.submit({"x": torch.ones(1, 2)})) for _ in range(4)]
        await asyncio.sleep(0.02)
        model.gate.set()
        await asyncio.gather(first, *four)  # batches [1, 4]: the window now expects 4
        again = []
        for _ in range(4):  # the four clients come back one by one
            again.append(asyncio.ensure_future(batcher.submit({"x": torch.ones(1, 2)})))
            await asyncio.sleep(0.01)
        await asyncio.gather(*again)
        await batcher.stop()

    run(scenario())
    assert model.batches == [1, 4, 4]


def test_one_client_at_a_time_never_waits() -> None:
    model = Recorder()

    async def scenario() -> None:
        batcher = Batcher(model, max_batch_size=16, max_delay_ms=60_000)
        batcher.start()
        for _ in range(5):  # each would wait a minute if the batcher held it back
            await asyncio.wait_for(batcher.submit({"x": torch.ones(1, 2)}), timeout=30)
        await batcher.stop()

    run(scenario())
    assert model.batches == [1, 1, 1, 1, 1]


def test_the_wait_bound_refuses_on_arrival_and_drops_at_the_bound() -> None:
    """maxWaitMs: a request the queue ahead predicts to wait too long is refused at once;
    one still queued when the bound passes is answered 503 then, never run."""
    from modelyard.runtime.batching import QUEUE_WAIT
    from modelyard.runtime.errors import Overloaded

    model = Recorder()
    shed: list[str] = []

    async def scenario() -> None:
        batcher = Batcher(model, max_batch_size=2, max_delay_ms=1, max_queue_wait_ms=100,
                          on_shed=shed.append)
        batcher.start()
        model.gate.clear()
        first = asyncio.ensure_future(batcher.submit({"x": torch.ones(1, 2)}))
        await asyncio.to_thread(model.started.wait, 30)
        await asyncio.sleep(0.15)  # this forward pass takes at least 150 ms...
        model.gate.set()
        await first  # ...which the batcher now knows
        model.gate.clear()
        model.started.clear()
        running = asyncio.ensure_future(batcher.submit({"x": torch.ones(1, 2)}))
        await asyncio.to_thread(model.started.wait, 30)
        queued = asyncio.ensure_future(batcher.submit({"x": torch.full((1, 2), 5.0)}))
        await asyncio.sleep(0)
        # ahead of a new request: the running batch and one queued, >= 300 ms > 100 ms
        with pytest.raises(Overloaded, match="would hold"):
            await batcher.submit({"x": torch.full((1, 2), 6.0)})
        with pytest.raises(Overloaded) as dropped:  # held past the bound: dropped, 503
            await queued
        assert dropped.value.retry_after >= 1
        assert batcher.queue_depth == 0
        model.gate.set()
        await running
        await batcher.stop()

    run(scenario())
    assert shed == [QUEUE_WAIT, QUEUE_WAIT]
    assert model.batches == [1, 1]  # neither refused request reached the model


def test_a_cancelled_request_leaves_the_queue() -> None:
    from modelyard.runtime.batching import DISCONNECTED

    model = Recorder()
    shed: list[str] = []

    async def scenario() -> None:
        batcher = Batcher(model, max_batch_size=4, max_delay_ms=1, on_shed=shed.append)
        batcher.start()
        model.gate.clear()
        running = asyncio.ensure_future(batcher.submit({"x": torch.ones(1, 2)}))
        await asyncio.to_thread(model.started.wait, 30)
        leaving = asyncio.ensure_future(batcher.submit({"x": torch.ones(3, 2)}))
        staying = asyncio.ensure_future(batcher.submit({"x": torch.ones(1, 2)}))
        await asyncio.sleep(0)
        assert batcher.queue_depth == 4
        leaving.cancel()  # the client went away
        with pytest.raises(asyncio.CancelledError):
            await leaving
        assert batcher.queue_depth == 1
        model.gate.set()
        await asyncio.gather(running, staying)
        await batcher.stop()

    run(scenario())
    assert shed == [DISCONNECTED]
    assert model.batches == [1, 1]  # the three cancelled rows were never computed

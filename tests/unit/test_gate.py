"""The operator's API gate: bounded calls in flight, a model's status before another's
creation, and nothing lost when a waiting pass is cancelled."""

from __future__ import annotations

import asyncio

import pytest

from modelyard.operator.gate import CREATE, REPORT, UPDATE, Gate


async def _hold(gate: Gate, priority: int, name: str, started: list[str],
                release: asyncio.Event) -> None:
    async with gate.slot(priority):
        started.append(name)
        await release.wait()


def test_no_more_calls_in_flight_than_the_limit_and_status_goes_first() -> None:
    async def scenario() -> list[str]:
        gate, started, release = Gate(limit=2), [], asyncio.Event()
        holders = [asyncio.create_task(_hold(gate, CREATE, f"create-{i}", started, release))
                   for i in range(2)]
        await asyncio.sleep(0)
        assert gate.in_flight == 2
        # queued behind the two in flight: creations first, then an update and a status
        waiting = [asyncio.create_task(_hold(gate, p, name, started, release)) for p, name in
                   ((CREATE, "create-2"), (CREATE, "create-3"), (UPDATE, "update"),
                    (REPORT, "status"))]
        await asyncio.sleep(0)
        assert gate.in_flight == 2
        assert gate.queued == 4
        release.set()
        await asyncio.gather(*holders, *waiting)
        assert gate.in_flight == 0
        return started

    started = asyncio.run(scenario())
    assert started[:2] == ["create-0", "create-1"]
    assert started[2:] == ["status", "update", "create-2", "create-3"]


def test_a_cancelled_waiter_gives_up_its_turn_and_loses_no_slot() -> None:
    async def scenario() -> None:
        gate, started, release = Gate(limit=1), [], asyncio.Event()
        holder = asyncio.create_task(_hold(gate, CREATE, "a", started, release))
        await asyncio.sleep(0)
        cancelled = asyncio.create_task(_hold(gate, REPORT, "cancelled", started, release))
        after = asyncio.create_task(_hold(gate, CREATE, "b", started, release))
        await asyncio.sleep(0)
        cancelled.cancel()
        release.set()
        await asyncio.gather(holder, after)
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert started == ["a", "b"]
        assert (gate.in_flight, gate.queued) == (0, 0)
        async with gate.slot(CREATE):  # the slot came back
            assert gate.in_flight == 1

    asyncio.run(scenario())


def test_a_waiter_cancelled_as_it_is_handed_a_slot_passes_it_on() -> None:
    async def scenario() -> None:
        gate, started, release = Gate(limit=1), [], asyncio.Event()
        release.set()
        async with gate.slot(CREATE):
            handed = asyncio.create_task(_hold(gate, REPORT, "handed", started, release))
            nxt = asyncio.create_task(_hold(gate, UPDATE, "next", started, release))
            await asyncio.sleep(0)
        handed.cancel()  # its future already has the slot; the task has not run yet
        await asyncio.gather(nxt)
        with pytest.raises(asyncio.CancelledError):
            await handed
        assert started == ["next"]
        assert (gate.in_flight, gate.queued) == (0, 0)

    asyncio.run(scenario())


def test_a_gate_needs_a_slot() -> None:
    with pytest.raises(ValueError, match="at least one slot"):
        Gate(limit=0)

"""SIGTERM under load: readiness false at once, every request answered while requests
still arrive (an endpoint that is slow to leave the Service), exit 0 once they stop."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from modelyard.runtime.client import AsyncClient


def test_sigterm_drains_under_load_with_zero_failures(start_server,
                                                      models: dict[str, Path]) -> None:
    """Traffic goes on for three drain periods after SIGTERM, as when kube-proxy on a
    loaded node takes longer than the drain to drop the endpoint: the listener stays
    open while requests arrive, and closes once they stop."""
    server = start_server({
        "MODELYARD_MODEL_NAME": "slow",
        "MODELYARD_MODEL_FORMAT": "safetensors",
        "MODELYARD_MODEL_URI": str(models["slow"]),
        "MODELYARD_ENTRY_POINT": "runtime_testmodels:SlowEcho",
        "MODELYARD_MAX_BATCH_SIZE": "4",
        "MODELYARD_MAX_DELAY_MS": "2",
        "MODELYARD_DRAIN_SECONDS": "1.0",
    })
    stop = threading.Event()
    outcomes: list[str] = []
    sent_after_sigterm = sent_after_drain_period = 0
    sigterm_at: list[float] = []

    async def client_loop(client: AsyncClient, index: int) -> None:
        nonlocal sent_after_sigterm, sent_after_drain_period
        x = np.full((1, 4), float(index), np.float32)
        while not stop.is_set():
            if sigterm_at:
                sent_after_sigterm += 1
                sent_after_drain_period += time.monotonic() > sigterm_at[0] + 1.0
            try:
                out = await client.infer({"x": x})
                outcomes.append("ok" if np.array_equal(out["y"], x * 2) else "wrong")
            except Exception as error:
                outcomes.append(f"failed: {type(error).__name__}: {error}")

    async def load() -> None:
        async with AsyncClient(server.url, "slow", timeout=30) as client:
            await asyncio.gather(*(client_loop(client, i) for i in range(16)))

    thread = threading.Thread(target=lambda: asyncio.run(load()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while outcomes.count("ok") < 40 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert outcomes.count("ok") >= 40, outcomes[-5:]
    queued = httpx.get(f"{server.url}/metrics").text
    assert 'modelyard_queue_depth{model="slow",version="1"} 0.0' not in queued  # work is queued

    sigterm_at.append(time.monotonic())
    answered_before = len(outcomes)
    server.process.send_signal(signal.SIGTERM)
    _assert_unready_at_once(server.url, deadline)
    # ...while requests keep being answered, for as long as they arrive: here 3 s, three
    # times MODELYARD_DRAIN_SECONDS (the endpoint is slow to be removed)
    time.sleep(3.0)
    assert server.process.poll() is None
    stop.set()  # clients stop sending, as the Service has routed them elsewhere
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert server.wait_exit(timeout=60) == 0

    failures = [o for o in outcomes if o != "ok"]
    assert failures == []
    assert len(outcomes) > answered_before  # requests in flight at SIGTERM were answered
    assert sent_after_sigterm > 0
    assert sent_after_drain_period > 0  # sent after a fixed 1 s drain would have closed
    assert "draining" in server.log()


def _assert_unready_at_once(url: str, deadline: float) -> None:
    """Readiness turns false (both routes) while liveness stays true."""
    code = None
    while time.monotonic() < deadline and code != 503:
        code = httpx.get(f"{url}/v2/models/slow/ready").status_code
        time.sleep(0.01)
    assert code == 503
    assert httpx.get(f"{url}/v2/health/ready").status_code == 503
    assert httpx.get(f"{url}/v2/health/live").status_code == 200

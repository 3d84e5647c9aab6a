"""Request deadlines: how long a client says it will wait for its answer.

Called by ``server.py`` (REST) and ``grpc.py``; the batcher drops a request still
queued when its deadline passes (504 / DEADLINE_EXCEEDED), so a model never computes
an answer nobody waits for. A deadline is a time of the event loop's clock
(``loop.time()``), fixed when the request arrives. Three ways to give one:

* HTTP header ``Request-Timeout: <seconds>`` (a decimal number, e.g. ``0.25``);
* the OIP request parameter ``timeout`` in microseconds (what Triton and its
  ``tritonclient`` send: ``infer(..., timeout=us)``), counted from decoding;
* gRPC's own deadline (the ``grpc-timeout`` metadata every gRPC client sets from
  its call timeout).

When several are given, the earliest wins.
"""

from __future__ import annotations

import asyncio
import math

from modelyard.runtime.errors import InvalidInput

__all__ = ["TIMEOUT_HEADER", "earliest", "from_header", "remaining_to_deadline"]

TIMEOUT_HEADER = b"request-timeout"


def _now() -> float:
    return asyncio.get_running_loop().time()


def from_header(value: bytes) -> float:
    """The deadline a ``Request-Timeout`` header's value sets, from now."""
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise InvalidInput(f"Request-Timeout must be a positive number of seconds, not "
                           f"{value.decode('latin-1')[:40]!r}")
    return _now() + seconds


def earliest(deadline: float | None, timeout_us: object = None) -> float | None:
    """``deadline`` or the one the OIP ``timeout`` parameter (microseconds) sets, the
    earlier; ``None`` when neither is given."""
    if timeout_us is None:
        return deadline
    if isinstance(timeout_us, bool) or not isinstance(timeout_us, int | float) \
            or not timeout_us > 0:
        raise InvalidInput("the timeout parameter must be a positive number of microseconds")
    mine = _now() + timeout_us / 1e6
    return mine if deadline is None else min(deadline, mine)


def remaining_to_deadline(seconds: float | None) -> float | None:
    """The deadline ``seconds`` from now (a gRPC call's ``time_remaining()``)."""
    return None if seconds is None else _now() + seconds

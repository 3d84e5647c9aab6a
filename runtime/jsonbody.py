"""Parse a JSON inference request with its tensor data going straight into numpy.

A 3x64x64 FP32 tensor is 12,288 numbers, ~250 KB of JSON. ``orjson.loads`` makes a
Python float of each and numpy then copies them into an array: ~460 µs on one core,
most of a JSON request's cost. simdjson (pysimdjson) parses the document into its
tape and hands a flat numeric array over as one buffer of doubles or int64s
(``Array.as_buffer``), with no Python object per number: ~250 µs for the same body.

Only the ``data`` arrays of ``inputs`` take that path, and only when they are flat
arrays of numbers (the usual form): everything else in the document (and any data that
is nested, mixed or not numeric) becomes ordinary Python values, which the protocol
code validates and converts exactly as it does orjson's output. A body simdjson
refuses is parsed again by orjson, so malformed JSON gets orjson's error message.
Small bodies go to orjson directly: there, its speed wins.
"""

from __future__ import annotations

import threading
from typing import Any, Literal

import numpy as np
import simdjson

__all__ = ["SIMD_MIN_BYTES", "load_request"]

#: below this size orjson is as fast and its Python values are what we need anyway
SIMD_MIN_BYTES = 16 * 1024

_REUSE_MAX_BYTES = 4 * 1024 * 1024

_FLOAT = frozenset({"FP32", "FP16", "BF16", "FP64"})
_INT = frozenset({"INT64", "INT32", "INT16", "INT8", "UINT8"})
_local = threading.local()  # a Parser reuses its buffers; one per thread


def load_request(body: bytes) -> Any | None:
    """The JSON document with each flat numeric ``inputs[i].data`` as a 1-D numpy array
    (float64 or int64), or None when orjson should parse this body instead."""
    if len(body) < SIMD_MIN_BYTES:
        return None
    # A parser keeps buffers sized to the largest document it has read: only ordinary
    # bodies go through the kept one, so one huge request does not hold memory for good.
    parser = _parser() if len(body) <= _REUSE_MAX_BYTES else simdjson.Parser()
    try:
        document = parser.parse(body)
    except (ValueError, RuntimeError):  # malformed: orjson says why
        return None
    try:
        return _convert(document)
    finally:
        del document  # the parser may be reused only once no view into it is left


def _parser() -> simdjson.Parser:
    parser: simdjson.Parser | None = getattr(_local, "parser", None)
    if parser is None:
        parser = _local.parser = simdjson.Parser()
    return parser


def _convert(document: Any) -> Any:
    if not isinstance(document, simdjson.Object):
        return _python(document)
    header: dict[str, Any] = {}
    for key in document.keys():  # noqa: SIM118 - a simdjson Object, not a dict
        value = document[key]
        if key == "inputs" and isinstance(value, simdjson.Array):
            header[key] = [_input(item) for item in value]
        else:
            header[key] = _python(value)
    return header


def _input(item: Any) -> Any:
    if not isinstance(item, simdjson.Object):
        return _python(item)
    entry: dict[str, Any] = {}
    data = None
    for key in item.keys():  # noqa: SIM118
        if key == "data":
            data = item[key]
        else:
            entry[key] = _python(item[key])
    if data is not None:
        entry["data"] = _numbers(data, entry.get("datatype"))
    return entry


def _numbers(data: Any, datatype: Any) -> Any:
    """A flat array of numbers as one numpy array; anything else as Python values."""
    kind: Literal["d", "i"] | None = (
        "d" if datatype in _FLOAT else "i" if datatype in _INT else None
    )
    if kind is None or not isinstance(data, simdjson.Array):
        return _python(data)
    try:
        buffer = data.as_buffer(of_type=kind)
    except (TypeError, ValueError):  # mixed, not numbers, or out of int64's range
        return data.as_list()
    array = np.frombuffer(buffer, dtype=np.float64 if kind == "d" else np.int64)
    # as_buffer flattens nested arrays: a nested or ragged array, whose count of numbers
    # differs from its count of elements, goes the general way, which checks the nesting
    # (only one-number nestings such as [1, [2], 3] pass here, read as flat)
    if array.size != len(data):
        return data.as_list()
    return array


def _python(value: Any) -> Any:
    if isinstance(value, simdjson.Object):
        return value.as_dict()
    if isinstance(value, simdjson.Array):
        return value.as_list()
    return value

"""Large JSON requests take the simdjson path (``jsonbody``); it must decode exactly what
orjson's path decodes, and refuse exactly what it refuses, with the same message."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
import torch
from test_runtime_bad_requests import BAD

from modelyard.runtime import protocol
from modelyard.runtime.errors import InvalidInput
from modelyard.runtime.jsonbody import SIMD_MIN_BYTES, load_request
from modelyard.runtime.protocol import decode_infer_request

# JSON allows trailing whitespace: the same document, large enough for the simdjson path
PAD = b" " * SIMD_MIN_BYTES


def _outcome(body: bytes) -> object:
    try:
        request = decode_infer_request(body)
    except InvalidInput as error:
        return ("refused", str(error))
    return ("decoded", {name: (t.dtype, t.tolist()) for name, t in request.inputs.items()},
            request.id, request.binary_output, request.parameters)


def _both_paths(body: bytes, monkeypatch: pytest.MonkeyPatch) -> tuple[object, object]:
    """(simdjson's outcome, orjson's outcome) for one large body."""
    fast = _outcome(body)
    with monkeypatch.context() as patch:
        patch.setattr(protocol, "load_request", lambda _: None)
        plain = _outcome(body)
    return fast, plain


JSON_CASES = {case: body for case, (body, headers, status, _) in BAD.items()
              if not headers and status == 400}
VALID = {
    "flat-floats": {"name": "x", "datatype": "FP32", "shape": [2, 3],
                    "data": [0.1, -2.5, 3, 1e-30, 65504.0, 7]},
    "nested-floats": {"name": "x", "datatype": "FP32", "shape": [2, 2],
                      "data": [[1.5, 2], [3, 4.25]]},
    "fp16": {"name": "x", "datatype": "FP16", "shape": [3], "data": [0.5, 1, 65504]},
    "bf16": {"name": "x", "datatype": "BF16", "shape": [2], "data": [1.5, -3]},
    "fp64": {"name": "x", "datatype": "FP64", "shape": [2], "data": [0.1, 1e300]},
    "int64-extremes": {"name": "x", "datatype": "INT64", "shape": [2],
                       "data": [-(2**63), 2**63 - 1]},
    "int8": {"name": "x", "datatype": "INT8", "shape": [3], "data": [-128, 0, 127]},
    "uint8": {"name": "x", "datatype": "UINT8", "shape": [2], "data": [0, 255]},
    "bool": {"name": "x", "datatype": "BOOL", "shape": [2], "data": [True, False]},
    "empty": {"name": "x", "datatype": "FP32", "shape": [0, 3], "data": []},
    "bools-among-floats": {"name": "x", "datatype": "FP32", "shape": [2], "data": [True, 1.5]},
}
REFUSED = {
    "int8-out-of-range": {"name": "x", "datatype": "INT8", "shape": [1], "data": [128]},
    "uint8-negative": {"name": "x", "datatype": "UINT8", "shape": [1], "data": [-1]},
    "float-for-int": {"name": "x", "datatype": "INT32", "shape": [2], "data": [1, 2.5]},
    "beyond-int64": {"name": "x", "datatype": "INT64", "shape": [1], "data": [2**63]},
    "nested-count-mismatch": {"name": "x", "datatype": "FP32", "shape": [3],
                              "data": [1, [2, 3]]},
}


@pytest.mark.parametrize("case", list(JSON_CASES))
def test_bad_requests_are_refused_alike(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    fast, plain = _both_paths(JSON_CASES[case] + PAD, monkeypatch)
    assert fast == plain


@pytest.mark.parametrize("case", list(VALID) + list(REFUSED))
def test_every_datatype_decodes_alike(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    entry = VALID.get(case) or REFUSED[case]
    body = orjson.dumps({"id": "r1", "inputs": [entry, {**entry, "name": "y"}],
                         "parameters": {"binary_data_output": True, "k": [1, {"a": None}]}}) + PAD
    fast, plain = _both_paths(body, monkeypatch)
    assert plain[0] == ("decoded" if case in VALID else "refused"), plain
    assert fast == plain


def test_a_real_image_request_takes_the_fast_path_exactly() -> None:
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    body = orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32",
                                     "shape": [1, 3, 64, 64], "data": x.ravel().tolist()}]})
    assert len(body) > SIMD_MIN_BYTES
    parsed = load_request(body)
    assert parsed is not None
    assert isinstance(parsed["inputs"][0]["data"], np.ndarray)
    tensor = decode_infer_request(body).inputs["input"]
    assert tensor.dtype == torch.float32
    assert torch.equal(tensor, torch.from_numpy(x))


def test_a_huge_body_gets_a_parser_of_its_own_and_the_next_request_still_decodes() -> None:
    x = np.arange(6, dtype=np.float32)
    body = orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 3],
                                     "data": x.tolist()}]})
    huge = body + b" " * (5 * 1024 * 1024)
    assert torch.equal(decode_infer_request(huge).inputs["input"],
                       torch.from_numpy(x.reshape(2, 3)))
    assert torch.equal(decode_infer_request(body + PAD).inputs["input"],
                       torch.from_numpy(x.reshape(2, 3)))

"""Explanations (POST /v2/models/{name}/explain, runtime/explain.py) on the real server
and, in process, on the formats that have gradients.

The server's model is linear, so the attributions are known exactly: integrated gradients
from a zeros baseline give x * W[target] (their sum is output(x) minus output(zeros)), and
saliency |W[target]|. The model holds a forward pass with autograd on while a gate file
exists (an explanation's; inference runs without autograd), so the concurrency bound is
reached by the test's own doing, never by timing.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
import torch
from explain_testmodels import BIAS, METADATA, WEIGHT, GatedLinear
from prometheus_client.parser import text_string_to_metric_families

from modelyard.runtime.client import AsyncClient
from modelyard.runtime.config import RuntimeConfig
from modelyard.runtime.errors import ConfigError
from modelyard.runtime.explain import Explainer
from modelyard.runtime.models import load_model
from modelyard.runtime.protocol import InferRequest

KEY = "explain-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def _request(rows: list[list[float]], **parameters: Any) -> bytes:
    shape = [len(rows), len(rows[0]) if rows else 0]
    document: dict[str, Any] = {"inputs": [{"name": "x", "datatype": "FP32", "shape": shape,
                                            "data": [v for row in rows for v in row]}]}
    if parameters:
        document["parameters"] = parameters
    return orjson.dumps(document)


def _tensor(document: dict[str, Any], key: str, name: str) -> np.ndarray[Any, Any]:
    [entry] = [t for t in document[key] if t["name"] == name]
    return np.asarray(entry["data"], np.float64).reshape(entry["shape"])


def _samples(text: str) -> dict[tuple[str, str], float]:
    """(sample name, outcome or protocol label) -> value."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, s.labels.get("outcome", s.labels.get("protocol", "")))] = s.value
    return out


@pytest.fixture(scope="module")
def linear_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("explain") / "linear.safetensors"
    save_file({k: v.contiguous() for k, v in GatedLinear().state_dict().items()}, str(path),
              metadata={"modelyard": json.dumps(METADATA)})
    return path


def test_explanations_known_answers_bounds_and_metrics(  # noqa: PLR0915 (one story)
        start_server, linear_model: Path, tmp_path: Path) -> None:
    gate, entered = tmp_path / "gate", tmp_path / "entered"
    keys = tmp_path / "keys"
    keys.write_text(KEY + "\n")
    server = start_server({
        "MODELYARD_MODEL_NAME": "linear",
        "MODELYARD_MODEL_FORMAT": "safetensors",
        "MODELYARD_MODEL_URI": str(linear_model),
        "MODELYARD_ENTRY_POINT": "explain_testmodels:GatedLinear",
        "MODELYARD_API_KEYS": str(keys),
        "MODELYARD_EXPLAIN": "true",
        "MODELYARD_EXPLAIN_STEPS": "16",
        "MODELYARD_EXPLAIN_MAX_BATCH_SIZE": "4",
        "MODELYARD_EXPLAIN_MAX_CONCURRENT": "1",
        "TESTMODEL_EXPLAIN_GATE": str(gate),
        "TESTMODEL_EXPLAIN_ENTERED": str(entered),
    })
    url = f"{server.url}/v2/models/linear/explain"
    weight, bias = np.asarray(WEIGHT), np.asarray(BIAS)
    x = np.asarray([[1.0, 1.0, 1.0, 1.0], [2.0, -1.0, 0.5, 3.0]])

    async def scenario() -> None:  # noqa: PLR0915 (one story, step by step)
        async with httpx.AsyncClient(timeout=60, headers=AUTH) as client:
            # the API key applies as it does to inference
            refused = await client.post(url, content=_request(x.tolist()),
                                        headers={"Authorization": "Bearer wrong"})
            assert refused.status_code == 401

            # integrated gradients, each row's highest class: x * W[t], summing to y_t - b_t
            answer = await client.post(url, content=_request(x.tolist()))
            assert answer.status_code == 200, answer.text
            document = answer.json()
            y = _tensor(document, "outputs", "y")
            np.testing.assert_allclose(y, x @ weight.T + bias, rtol=1e-5)
            targets = y.argmax(axis=1).tolist()
            details = document["parameters"]
            assert details["method"] == "integrated_gradients"
            assert (details["target"], details["steps"], details["output"]) == (targets, 16, "y")
            attributions = _tensor(document, "attributions", "x")
            assert attributions.shape == x.shape
            np.testing.assert_allclose(attributions, x * weight[targets], rtol=1e-4, atol=1e-5)
            for row, target in enumerate(targets):  # completeness
                assert attributions[row].sum() == pytest.approx(y[row, target] - bias[target],
                                                                rel=1e-4)
            assert all(abs(d) < 1e-3 for d in details["convergence_delta"])

            # a chosen class per row, fewer steps: through the client, binary tensors in
            async with AsyncClient(server.url, "linear", api_key=KEY) as sdk:
                explanation = await sdk.explain({"x": x.astype(np.float32)}, target=[2, 1],
                                                steps=8)
            assert (explanation.parameters["target"], explanation.parameters["steps"]) == (
                [2, 1], 8)
            np.testing.assert_allclose(explanation.attributions["x"], x * weight[[2, 1]],
                                       rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(explanation.outputs["y"], x @ weight.T + bias, rtol=1e-5)

            # saliency, the cheap method: |W[t]| for every row
            answer = await client.post(url, content=_request(x.tolist(), method="saliency",
                                                             target=1))
            assert answer.status_code == 200, answer.text
            assert answer.json()["parameters"]["method"] == "saliency"
            np.testing.assert_allclose(_tensor(answer.json(), "attributions", "x"),
                                       np.abs(weight[[1, 1]]), rtol=1e-5)

            # bad requests: 400 with a JSON error saying what is wrong
            bad = [
                (_request([[1.0] * 5]), "shape"),
                (_request(x.tolist(), target=3), "class index from 0 to 2"),
                (_request(x.tolist(), target=[0]), "1 indices for 2 rows"),
                (_request(x.tolist(), steps=1000), "from 2 to 16"),
                (_request([[1.0] * 4] * 5), "at most 4"),
                (_request(x.tolist(), method="lime"), "integrated_gradients, saliency"),
                (b'{"inputs": [', "malformed"),
            ]
            for body, message in bad:
                answer = await client.post(url, content=body)
                assert answer.status_code == 400, (message, answer.text)
                assert message in answer.json()["error"]

            # past maxConcurrent: 503 with Retry-After at once, and inference still answers
            gate.touch()
            held = asyncio.ensure_future(client.post(url, content=_request([[1.0] * 4])))
            for _ in range(3000):  # the held explanation is inside the model (bounded poll)
                if entered.exists():
                    break
                await asyncio.sleep(0.01)
            assert entered.exists(), server.log()
            over = await client.post(url, content=_request([[1.0] * 4]))
            assert over.status_code == 503
            assert "maxConcurrent" in over.json()["error"]
            assert int(over.headers["Retry-After"]) >= 1
            infer = await client.post(f"{server.url}/v2/models/linear/infer",
                                      content=_request([[1.0] * 4]))
            assert infer.status_code == 200, infer.text
            assert infer.json()["outputs"][0]["data"] == pytest.approx([10.5, 0.5, 0.0])
            gate.unlink()
            assert (await held).status_code == 200

            seen = _samples((await client.get(f"{server.url}/metrics")).text)
            assert seen[("modelyard_explanations_total", "ok")] == 4
            assert seen[("modelyard_explanations_total", "invalid")] == len(bad)
            assert seen[("modelyard_explanations_total", "overloaded")] == 1
            assert seen[("modelyard_explain_duration_seconds_count", "")] == 4
            # explanations stay out of the inference metrics that analysis and scaling read
            assert seen[("modelyard_requests_total", "v2")] == 1

    asyncio.run(asyncio.wait_for(scenario(), timeout=120))


def test_explanations_off_answer_404(mlp_server) -> None:  # type: ignore[no-untyped-def]
    """Off by default: the route answers 404 with the reason; the model keeps serving."""
    body = orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4],
                                     "data": [0.0] * 4}]})
    off = httpx.post(f"{mlp_server.url}/v2/models/mlp/explain", content=body, timeout=30)
    assert off.status_code == 404
    assert "explanations are off for model 'mlp'" in off.json()["error"]
    unknown = httpx.post(f"{mlp_server.url}/v2/models/nope/explain", content=body, timeout=30)
    assert unknown.status_code == 404
    assert "not served here" in unknown.json()["error"]
    infer = httpx.post(f"{mlp_server.url}/v2/models/mlp/infer", content=body, timeout=30)
    assert infer.status_code == 200


@pytest.mark.parametrize(("name", "model_format", "input_name"),
                         [("mlp", "torchscript", "input"), ("export", "export", "x")])
def test_integrated_gradients_through_each_format_with_gradients(
        models: dict[str, Path], name: str, model_format: str, input_name: str) -> None:
    """A nonlinear model (ReLU) as TorchScript and as an exported program: each row's
    attributions add up to output(x) minus output(zeros), up to the reported delta."""
    config = RuntimeConfig("mlp", str(models[name]), model_format=model_format, explain=True,
                           explain_steps=64)
    model = load_model(config, models[name])
    explainer = Explainer(model, config)
    try:
        explainer.check()
        x = torch.tensor([[0.5, -1.0, 2.0, 0.25], [1.5, 0.5, -0.5, 1.0]])
        request = InferRequest({input_name: x}, parameters={"target": [0, 2]})
        document = orjson.loads(asyncio.run(explainer.explain(request)))
    finally:
        explainer.close()
    explained = document["parameters"]["output"]  # the first floating-point output: logits
    assert explained == model.outputs[0].name
    logits = model.predict({input_name: x})[explained]
    at_zero = model.predict({input_name: torch.zeros_like(x)})[explained]
    attributions = _tensor(document, "attributions", input_name)
    delta = document["parameters"]["convergence_delta"]
    for row, target in enumerate((0, 2)):
        gap = float(logits[row, target] - at_zero[row, target])
        assert attributions[row].sum() - gap == pytest.approx(delta[row], abs=1e-5)
        assert abs(delta[row]) < 0.01 * max(1.0, abs(gap))


def test_formats_without_gradients_refuse_explanations() -> None:
    with pytest.raises(ConfigError, match="aoti package"):
        RuntimeConfig("m", "file:///m.pt2", model_format="aoti", explain=True)
    with pytest.raises(ConfigError, match="dynamic-int8"):
        RuntimeConfig("m", "file:///m.safetensors", model_format="safetensors",
                      entry_point="m:f", quantize="dynamic-int8", explain=True)
    with pytest.raises(ConfigError, match="from 2 to 512"):
        RuntimeConfig("m", "file:///m.pt", explain=True, explain_steps=10_000)

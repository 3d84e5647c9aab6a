"""AOTInductor packages: `modelyard convert` (verified before written) and format aoti served.

Compiling is the slow part (tens of seconds per package on 2 cores), so the module
compiles three times in all: the TinyMLP in fp32 through the CLI, an int8 candidate whose
verification is then judged against an impossible and against its own tolerance, and the
exported TinyMLP quantised as a graph.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from runtime_testmodels import MLP_METADATA, TinyMLP
from test_runtime_bad_requests import BAD

from modelyard.operator.cli import main as modelyard
from modelyard.runtime.aoti import load_package
from modelyard.runtime.client import AsyncClient
from modelyard.runtime.config import RuntimeConfig
from modelyard.runtime.convert import (
    FP32_TOLERANCE,
    QUANTIZED_TOLERANCE,
    Candidate,
    ConvertOptions,
    VerificationFailed,
    compile_package,
    manifest_file,
    verify,
    write,
)
from modelyard.runtime.errors import ConfigError, ModelLoadError
from modelyard.runtime.models import load_model
from modelyard.runtime.protocol import TensorMeta

ENTRY_POINT = "runtime_testmodels:build_tiny_mlp"
MAX_BATCH = 8


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def expected(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return TinyMLP().eval()(x)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def package(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """TinyMLP (safetensors + entry point) converted by `modelyard convert`, fp32."""
    output = tmp_path_factory.mktemp("aoti") / "mlp.pt2"
    code = modelyard(["convert", str(models["safetensors"]), "-o", str(output),
                      "--entry-point", ENTRY_POINT, "--max-batch", str(MAX_BATCH),
                      "--threads", "1", "--bench-seconds", "0.1"])
    assert code == 0
    return output


@pytest.fixture(scope="module")
def quantised(models: dict[str, Path]) -> Iterator[Candidate]:
    """TinyMLP compiled with int8 dynamic quantisation, not yet verified nor written."""
    candidate = compile_package(ConvertOptions(
        source=models["safetensors"], entry_point=ENTRY_POINT, max_batch=MAX_BATCH,
        quantize="int8-dynamic", bench_seconds=0.1, threads=1))
    yield candidate
    candidate.discard()


def test_convert_writes_a_verified_package_and_its_manifest(
        package: Path, models: dict[str, Path]) -> None:
    manifest = json.loads(manifest_file(package).read_text())
    assert manifest["sha256"] == sha256(package)
    assert manifest["source"]["sha256"] == sha256(models["safetensors"])
    assert manifest["signature"] == MLP_METADATA
    assert manifest["maxBatch"] == MAX_BATCH
    assert manifest["target"]["device"] == "cpu"
    verification = manifest["verification"]
    assert verification["passed"]
    assert verification["tolerance"] == FP32_TOLERANCE
    assert verification["accuracyDelta"] <= FP32_TOLERANCE
    assert verification["batches"] == [1, 3, MAX_BATCH]
    assert manifest["performance"]["speedupMaxBatch"] > 0
    assert manifest["performance"]["speedupBatch1"] > 0


def test_the_package_carries_its_signature_and_answers_like_the_model(package: Path) -> None:
    model = load_model(RuntimeConfig(model_name="m", model_uri=str(package),
                                     model_format="aoti"), package)
    assert model.platform == "pytorch_aoti"
    assert model.inputs == [TensorMeta("input", "FP32", (-1, 4))]
    assert [o.name for o in model.outputs] == ["logits", "label"]
    model.warmup(MAX_BATCH)
    # 1 row, and more rows than the package was compiled for (run in slices)
    for rows in (1, 3 * MAX_BATCH + 1):
        x = torch.randn(rows, 4, generator=torch.Generator().manual_seed(rows))
        out = model.predict({"input": x})
        logits, label = expected(x)
        torch.testing.assert_close(out["logits"], logits, atol=1e-5, rtol=1e-4)
        assert torch.equal(out["label"], label)


def test_a_failing_verification_writes_nothing_and_a_passing_one_writes(
        quantised: Candidate, tmp_path: Path) -> None:
    output = tmp_path / "mlp-int8.pt2"
    strict = verify(quantised, tolerance=1e-9)
    assert not strict.passed
    with pytest.raises(VerificationFailed, match="nothing was written"):
        write(quantised, strict, output)
    assert list(tmp_path.iterdir()) == []

    within = verify(quantised)
    assert within.passed, within.deltas
    assert 0 < within.deltas["logits"] <= QUANTIZED_TOLERANCE  # int8 did change the numbers
    manifest = write(quantised, within, output)
    assert manifest["quantize"] == "int8-dynamic"
    assert manifest["sha256"] == sha256(output)
    assert json.loads(manifest_file(output).read_text())["verification"]["accuracyDelta"] \
        == within.accuracy_delta


def test_what_a_package_cannot_do_is_a_clear_error(package: Path, models: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="dtype, quantize and compile do not apply"):
        RuntimeConfig(model_name="m", model_uri="x", model_format="aoti", dtype="float16")
    with pytest.raises(ConfigError, match="compiled for cpu"):
        load_package(package, "cuda")
    with pytest.raises(ModelLoadError, match="not an AOTInductor package"):
        load_model(RuntimeConfig(model_name="m", model_uri="x", model_format="aoti"),
                   models["mlp"])  # a TorchScript zip
    with pytest.raises(ConfigError, match=r"exported program .* int8-dynamic on CPU only"):
        compile_package(ConvertOptions(source=models["export"], quantize="int8-weight-only"))


def test_an_exported_program_is_quantised_as_a_graph(models: dict[str, Path],
                                                      tmp_path: Path) -> None:
    """PT2E: int8-dynamic on an exported program (no nn.Linear left to swap) changes the
    numbers beyond fp32's compile noise and stays within the quantised tolerance."""
    candidate = compile_package(ConvertOptions(
        source=models["export"], max_batch=MAX_BATCH, quantize="int8-dynamic",
        bench_seconds=0.1, threads=1))
    try:
        verification = verify(candidate)
        assert verification.passed, verification.deltas
        logits = next(iter(verification.deltas.values()))  # the float output; then the label
        assert FP32_TOLERANCE < logits <= QUANTIZED_TOLERANCE, verification.deltas
        manifest = write(candidate, verification, tmp_path / "mlp-int8.pt2")
    finally:
        candidate.discard()
    assert (manifest["quantize"], manifest["sha256"]) == (
        "int8-dynamic", sha256(tmp_path / "mlp-int8.pt2"))


@pytest.fixture(scope="module")
def aoti_server(start_server, package: Path):  # type: ignore[no-untyped-def]
    return start_server({
        "MODELYARD_MODEL_NAME": "mlp",
        "MODELYARD_MODEL_URI": f"file://{package}",
        "MODELYARD_MODEL_FORMAT": "aoti",
        "MODELYARD_MODEL_SHA256": sha256(package),
        "MODELYARD_MAX_BATCH_SIZE": str(MAX_BATCH),
        "MODELYARD_MAX_DELAY_MS": "2",
        "MODELYARD_MAX_BODY_BYTES": str(1024 * 1024),
    })


def test_the_runtime_serves_the_package_and_batches(aoti_server) -> None:  # type: ignore[no-untyped-def]
    metadata = httpx.get(f"{aoti_server.url}/v2/models/mlp").json()
    assert metadata["platform"] == "pytorch_aoti"
    assert metadata["inputs"] == MLP_METADATA["inputs"]
    rng = np.random.default_rng(5)
    xs = [rng.standard_normal((1 + i % 3, 4)).astype(np.float32) for i in range(32)]

    async def run() -> list[dict[str, np.ndarray]]:
        async with AsyncClient(aoti_server.url, "mlp") as client:
            return await asyncio.gather(*(client.infer({"input": x}) for x in xs))

    for x, out in zip(xs, asyncio.run(run()), strict=True):
        logits, label = expected(torch.from_numpy(x))
        np.testing.assert_allclose(out["logits"], logits.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(out["label"], label.numpy())
    series = {line.split("{")[0].split()[0]: float(line.split()[-1])
              for line in httpx.get(f"{aoti_server.url}/metrics").text.splitlines()
              if line.startswith("modelyard_batch_size_")}
    assert series["modelyard_batch_size_sum"] > series["modelyard_batch_size_count"]


# the bad inputs that concern the model's declaration, which the package supplies
MODEL_CASES = ["wrong-datatype-for-model", "wrong-rank", "wrong-dimension", "unknown-input-name",
               "binary-size-mismatch-shape"]


@pytest.mark.parametrize("case", MODEL_CASES)
def test_bad_input_is_a_400_and_the_package_keeps_serving(aoti_server, case: str) -> None:  # type: ignore[no-untyped-def]
    body, headers, status, fragment = BAD[case]
    url = f"{aoti_server.url}/v2/models/mlp/infer"
    response = httpx.post(url, content=body, headers=headers)
    assert response.status_code == status, response.text
    assert fragment.lower() in response.json()["error"].lower()
    good = httpx.post(url, json={"inputs": [{"name": "input", "datatype": "FP32",
                                             "shape": [1, 4], "data": [1, 2, 3, 4]}]})
    assert good.status_code == 200

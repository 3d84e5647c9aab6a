"""Loading every format, metadata sources, pickle refusal, optimisation and warm-up."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from runtime_testmodels import MLP_METADATA, TinyMLP, save_torchscript

from modelyard.runtime.config import RuntimeConfig
from modelyard.runtime.errors import ConfigError, ModelLoadError
from modelyard.runtime.models import load_model
from modelyard.runtime.protocol import TensorMeta

X = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, -1.0, 0.0, 2.0]])


def expected() -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return TinyMLP().eval()(X)


def config(path: Path, fmt: str = "torchscript", **changes: object) -> RuntimeConfig:
    return RuntimeConfig(model_name="m", model_uri=str(path), model_format=fmt, device="cpu",
                         **changes)  # type: ignore[arg-type]


def check_mlp(model_path: Path, cfg: RuntimeConfig, *, atol: float = 1e-5) -> None:
    model = load_model(cfg, model_path)
    model.warmup(4)
    assert model.inputs == [TensorMeta("input", "FP32", (-1, 4))]
    out = model.predict({"input": X})
    logits, label = expected()
    torch.testing.assert_close(out[model.outputs[0].name], logits, atol=atol, rtol=1e-3)
    assert torch.equal(out[model.outputs[1].name], label)


def test_torchscript_with_embedded_metadata(models: dict[str, Path],
                                           caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="modelyard.runtime.models"):
        check_mlp(models["mlp"], config(models["mlp"]))
    assert "TorchScript, which PyTorch has deprecated" in caplog.text  # legacy: say so
    meta = load_model(config(models["mlp"]), models["mlp"]).metadata()
    assert meta["platform"] == "pytorch_torchscript"
    assert [o["name"] for o in meta["outputs"]] == ["logits", "label"]


def test_torchscript_metadata_from_flag_or_sibling_file(models: dict[str, Path],
                                                        tmp_path: Path) -> None:
    bare = models["mlp_bare"]
    inline = {"inputs": MLP_METADATA["inputs"]}
    model = load_model(config(bare, metadata=json.dumps(inline)), bare)
    assert model.outputs == []
    model.warmup(2)  # outputs learnt from the warm-up run
    assert [(o.datatype, o.shape) for o in model.outputs] == [("FP32", (-1, 3)), ("INT64", (-1,))]

    copy = tmp_path / "bare.pt"
    copy.write_bytes(bare.read_bytes())
    (tmp_path / "bare.pt.json").write_text(json.dumps(MLP_METADATA))
    check_mlp(copy, config(copy))


def test_torchscript_without_metadata_uses_the_schema(models: dict[str, Path]) -> None:
    model = load_model(config(models["mlp_bare"]), models["mlp_bare"])
    assert [i.name for i in model.inputs] == ["x"]
    model.warmup(2)  # nothing declared: no warm-up, no crash


def test_bad_metadata_is_a_config_error(models: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="bad tensor metadata"):
        load_model(config(models["mlp_bare"], metadata='{"inputs": [{"name": 3}]}'),
                   models["mlp_bare"])


def test_export_program_metadata_from_its_signature(models: dict[str, Path]) -> None:
    model = load_model(config(models["export"], "export"), models["export"])
    assert model.inputs == [TensorMeta("x", "FP32", (-1, 4))]
    assert [(o.datatype, o.shape) for o in model.outputs] == [("FP32", (-1, 3)), ("INT64", (-1,))]
    model.warmup(8)
    out = model.predict({"x": X})
    logits, label = expected()
    torch.testing.assert_close(next(iter(out.values())), logits)
    assert torch.equal(list(out.values())[1], label)


def test_safetensors_with_entry_point(models: dict[str, Path]) -> None:
    cfg = config(models["safetensors"], "safetensors",
                 entry_point="runtime_testmodels:build_tiny_mlp")
    check_mlp(models["safetensors"], cfg)


def test_state_dict_loads_weights_only(models: dict[str, Path]) -> None:
    cfg = config(models["state_dict"], "safetensors", entry_point="runtime_testmodels:TinyMLP",
                 metadata=json.dumps(MLP_METADATA))
    check_mlp(models["state_dict"], cfg)


def test_arbitrary_pickles_are_refused_unless_opted_in(models: dict[str, Path]) -> None:
    with pytest.raises(ModelLoadError, match="refusing to unpickle"):
        load_model(config(models["pickled"], "pickle"), models["pickled"])
    # a pickled module passed off as weights is refused by weights_only loading
    with pytest.raises(ModelLoadError, match="refusing to load"):
        load_model(config(models["pickled"], "safetensors",
                          entry_point="runtime_testmodels:TinyMLP"), models["pickled"])
    check_mlp(models["pickled"], config(models["pickled"], "pickle", allow_pickle=True,
                                        metadata=json.dumps(MLP_METADATA)))


def test_a_file_of_the_wrong_format_is_a_load_error(models: dict[str, Path]) -> None:
    with pytest.raises(ModelLoadError, match="cannot load"):
        load_model(config(models["safetensors"]), models["safetensors"])
    with pytest.raises(ModelLoadError, match="cannot load"):
        load_model(config(models["mlp"], "export"), models["mlp"])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision(models: dict[str, Path], dtype: str) -> None:
    cfg = config(models["safetensors"], "safetensors",
                 entry_point="runtime_testmodels:build_tiny_mlp", dtype=dtype)
    model = load_model(cfg, models["safetensors"])
    model.warmup(2)
    out = model.predict({"input": X})
    assert out["logits"].dtype == torch.float32  # declared output datatype is kept
    torch.testing.assert_close(out["logits"], expected()[0], atol=0.05, rtol=0.05)


def test_dynamic_int8_quantisation(models: dict[str, Path]) -> None:
    cfg = config(models["safetensors"], "safetensors",
                 entry_point="runtime_testmodels:build_tiny_mlp", quantize="dynamic-int8")
    model = load_model(cfg, models["safetensors"])
    model.warmup(2)
    torch.testing.assert_close(model.predict({"input": X})["logits"], expected()[0],
                               atol=0.05, rtol=0.05)
    with pytest.raises(ConfigError, match="eager model"):
        load_model(config(models["mlp"], quantize="dynamic-int8"), models["mlp"])


def test_compile_torchscript_freezes_it(models: dict[str, Path]) -> None:
    check_mlp(models["mlp"], config(models["mlp"], compile=True))


def test_cuda_asked_without_a_gpu_is_a_config_error(models: dict[str, Path]) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ConfigError, match="no CUDA device"):
        load_model(RuntimeConfig(model_name="m", model_uri="x", device="cuda"), models["mlp"])


def test_metadata_file_beside_a_tmp_scripted_model(tmp_path: Path) -> None:
    path = save_torchscript(TinyMLP(), tmp_path / "m.pt", MLP_METADATA)
    assert os.path.getsize(path) > 0
    check_mlp(path, config(path))


def test_a_signature_declared_in_the_spec_is_served_and_warms_up(
        models: dict[str, Path]) -> None:
    """spec.model.inputs of a TorchScript file without metadata: the operator's environment
    gives the runtime the shapes, so it warms up and learns the outputs from the model."""
    from modelyard.operator import api, render
    from modelyard.runtime.config import parse_config

    spec = api.parse_spec({"model": {"version": "1", "uri": "file:///m.pt", "inputs": [
        {"name": "input", "datatype": "FP32", "shape": [-1, 4]}]}})
    env = {e["name"]: e["value"] for e in render.runtime_env(render.Owner("m", "ns", "u"), spec)}
    cfg = parse_config([], {**env, "MODELYARD_MODEL_URI": str(models["mlp_bare"]),
                            "MODELYARD_DEVICE": "cpu"})
    model = load_model(cfg, models["mlp_bare"])
    model.warmup(2)
    assert model.metadata()["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]
    assert [o["datatype"] for o in model.metadata()["outputs"]] == ["FP32", "INT64"]
    assert [o["shape"] for o in model.metadata()["outputs"]] == [[-1, 3], [-1]]

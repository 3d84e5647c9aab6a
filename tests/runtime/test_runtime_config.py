"""Flags over MODELYARD_* variables, validation, and the command's exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from modelyard.runtime.__main__ import main
from modelyard.runtime.config import RuntimeConfig, parse_config
from modelyard.runtime.errors import ConfigError

ENV = {
    "MODELYARD_MODEL_NAME": "resnet",
    "MODELYARD_MODEL_VERSION": "3",
    "MODELYARD_MODEL_URI": "s3://models/resnet/3/model.pt",
    "MODELYARD_MODEL_FORMAT": "torchscript",
    "MODELYARD_MODEL_SHA256": "ab" * 32,
    "MODELYARD_MAX_BATCH_SIZE": "32",
    "MODELYARD_MAX_DELAY_MS": "2.5",
    "MODELYARD_HANDLER": "pkg.mod:Handler",
    "MODELYARD_PORT": "9000",
    "MODELYARD_HOST": "127.0.0.2",
    "MODELYARD_CACHE_DIR": "/tmp/cache",
    "MODELYARD_DEVICE": "cpu",
    "MODELYARD_DTYPE": "float16",
    "MODELYARD_COMPILE": "true",
}


def test_environment_contract() -> None:
    cfg = parse_config([], ENV)
    assert cfg == RuntimeConfig(
        model_name="resnet", model_version="3", model_uri="s3://models/resnet/3/model.pt",
        model_format="torchscript", sha256="ab" * 32, max_batch_size=32, max_delay_ms=2.5,
        handler="pkg.mod:Handler", port=9000, host="127.0.0.2", cache_dir=Path("/tmp/cache"),
        device="cpu", dtype="float16", compile=True,
    )


def test_flags_win_over_environment() -> None:
    cfg = parse_config(["--port", "9100", "--max-batch-size", "4", "--compile", "false"], ENV)
    assert (cfg.port, cfg.max_batch_size, cfg.compile) == (9100, 4, False)


def test_empty_optional_variables_mean_unset() -> None:
    cfg = parse_config([], {**ENV, "MODELYARD_MODEL_SHA256": "", "MODELYARD_DTYPE": "",
                            "MODELYARD_QUANTIZE": "", "MODELYARD_HANDLER": ""})
    assert (cfg.sha256, cfg.dtype, cfg.quantize, cfg.handler) == (None, None, None, None)


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"MODELYARD_MODEL_NAME": ""}, "model name is required"),
        ({"MODELYARD_MODEL_FORMAT": "onnx"}, "format must be one of"),
        ({"MODELYARD_MODEL_FORMAT": "safetensors"}, "needs an entry point"),
        ({"MODELYARD_MAX_BATCH_SIZE": "0"}, "at least 1"),
        ({"MODELYARD_MAX_BATCH_SIZE": "many"}, "MODELYARD_MAX_BATCH_SIZE"),
        ({"MODELYARD_DEVICE": "tpu"}, "device must be"),
        ({"MODELYARD_DTYPE": "int4"}, "dtype must be"),
        ({"MODELYARD_QUANTIZE": "static"}, "quantize must be"),
        ({"MODELYARD_COMPILE": "maybe"}, "not a boolean"),
        ({"MODELYARD_MODEL_SHA256": "xyz"}, "64 hex digits"),
        ({"MODELYARD_PORT": "70000"}, "out of range"),
    ],
)
def test_invalid_settings_are_refused(changes: dict[str, str], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        parse_config([], {**ENV, **changes})


def test_main_exits_2_on_bad_configuration(capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MODELYARD_MODEL_NAME", raising=False)
    monkeypatch.delenv("MODELYARD_MODEL_URI", raising=False)
    assert main([]) == 2
    assert "model name is required" in capsys.readouterr().err


def test_python_dash_m_help() -> None:
    result = subprocess.run([sys.executable, "-m", "modelyard.runtime", "--help"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0
    assert "MODELYARD_MAX_BATCH_SIZE" in result.stdout


def test_the_settings_table_and_the_config_agree_field_for_field() -> None:
    """One table (modelyard.contract) names every setting's variable for both sides."""
    import dataclasses

    from modelyard import contract

    assert sorted(s.field for s in contract.SETTINGS) == sorted(
        f.name for f in dataclasses.fields(RuntimeConfig))


def test_a_misspelt_variable_is_reported_with_the_name_it_meant(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="modelyard.runtime.config"):
        cfg = parse_config([], {**ENV, "MODELYARD_MAX_BATCH": "64"})
    assert cfg.max_batch_size == 32  # not taken for the real setting
    assert "MODELYARD_MAX_BATCH (did you mean MODELYARD_MAX_BATCH_SIZE?) is not a runtime " \
        "setting" in caplog.text


def test_the_operator_renders_only_names_the_runtime_reads() -> None:
    from modelyard import contract
    from modelyard.operator import api, render

    spec = api.parse_spec({"model": {"version": "1", "uri": "s3://m/1", "sha256": "ab" * 32,
                                     "optimize": {"dtype": "float16", "compile": True}},
                           "runtime": {"handler": "pkg:H"}})
    env = {e["name"]: e["value"] for e in render.runtime_env(render.Owner("m", "ns", "u"), spec)}
    assert contract.unknown_variables(env) == []
    cfg = parse_config([], env)
    assert (cfg.model_name, cfg.sha256, cfg.dtype, cfg.compile, cfg.handler) == (
        "m", "ab" * 32, "float16", True, "pkg:H")
    with pytest.raises(contract.UnknownSetting, match="did you mean max_batch_size"):
        contract.runtime_env({"max_batchsize": "4"})

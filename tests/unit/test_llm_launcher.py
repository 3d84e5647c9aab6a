"""The generative launcher's pure parts: its settings, and reading vLLM's own reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelyard.runtime import llm

# The tail of a real vLLM 0.32 (CPU) start on weights it cannot load.
VLLM_TAIL = """\
(Worker pid=17850) ERROR 12-06 13:15:31 [multiproc_executor.py:953]     raise SafetensorError
(Worker pid=17850) ERROR 12-06 13:15:31 [multiproc_executor.py:953] safetensors._safetensors_rust.SafetensorError: Error while deserializing header: invalid shape, data type, or offset for tensor
(EngineCore pid=17837) ERROR 12-06 13:15:33 [core.py:1510] Exception: WorkerProc initialization failed due to an exception in a background process. See stack trace for root cause.
Exception: WorkerProc initialization failed due to an exception in a background process. See stack trace for root cause.
    raise RuntimeError(
RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}
""".splitlines()  # noqa: E501


def test_the_reason_is_the_engine_s_root_cause_not_its_wrapper() -> None:
    assert llm.engine_reason(VLLM_TAIL) == (
        "safetensors._safetensors_rust.SafetensorError: Error while deserializing header: "
        "invalid shape, data type, or offset for tensor")
    # Only wrappers: the last one is still better than nothing.
    assert llm.engine_reason(VLLM_TAIL[-2:]) == (
        "RuntimeError: Engine core initialization failed. See root cause above. "
        "Failed core proc(s): {}")
    assert llm.engine_reason(["starting", "INFO 12-06 13:15:31 [x.py:1] all fine"]) is None
    assert llm.engine_reason([
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"]) == (
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")


def test_settings_come_from_the_contract_and_the_arguments_are_vllm_s() -> None:
    config = llm.parse_config(["--dtype", "bfloat16"], {
        "MODELYARD_MODEL_NAME": "chat", "MODELYARD_MODEL_URI": "s3://m/chat/7/",
        "MODELYARD_HEALTH_PORT": "9001", "MODELYARD_CACHE_MAX_BYTES": "1000",
        "MODELYARD_CACHE_DIR": "/var/cache/modelyard/models"})
    assert config.engine_args == ("--dtype", "bfloat16")
    assert config.health_port == 9001
    assert config.cache_max_bytes == 1000
    assert config.cache_dir == Path("/var/cache/modelyard/models")
    assert config.termination_log == Path("/dev/termination-log")
    with pytest.raises(llm.ConfigError, match="MODELYARD_MODEL_URI must be set"):
        llm.parse_config([], {"MODELYARD_MODEL_NAME": "chat"})
    with pytest.raises(llm.ConfigError, match="MODELYARD_HEALTH_PORT"):
        llm.parse_config([], {"MODELYARD_MODEL_NAME": "c", "MODELYARD_MODEL_URI": "s3://m/c/",
                              "MODELYARD_HEALTH_PORT": "http"})


def test_modelyard_digest_writes_the_manifest_and_prints_its_digest(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from modelyard.operator.cli import main
    from modelyard.runtime import modeldir

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "model-00001.safetensors").write_bytes(b"\0" * 64)
    assert main(["digest", str(tmp_path)]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == modeldir.digest(modeldir.manifest_of(tmp_path))
    assert modeldir.parse_manifest((tmp_path / "SHA256SUMS").read_text()).keys() == {
        "config.json", "shards/model-00001.safetensors"}


def test_the_probe_server_binds_without_a_dns_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    import http.server
    import socket

    def no_dns(name: str = "") -> str:
        raise AssertionError(f"looked up {name!r}: a pod without DNS would wait 10 s here")

    monkeypatch.setattr(socket, "getfqdn", no_dns)
    server = llm._ProbeServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    try:
        assert server.server_name == "127.0.0.1"
        assert server.server_port > 0
    finally:
        server.server_close()

"""Fixtures of the runtime tests: tiny models, a real server process on loopback.

``RuntimeServer`` starts ``python -m modelyard.runtime`` exactly as a pod does
(configuration through MODELYARD_* variables), on a free 127.0.0.1 port, and
waits for readiness with a bounded deadline.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from runtime_support import free_port  # noqa: E402
from runtime_testmodels import build_models  # noqa: E402


class RuntimeServer:
    """One runtime process; ``url`` once ready."""

    def __init__(self, env: dict[str, str], log_path: Path, host: str = "127.0.0.1") -> None:
        self.port = free_port(host)
        self.host = host
        self.url = f"http://{host}:{self.port}"
        self.grpc_port = int(env.get("MODELYARD_GRPC_PORT", "0"))  # 0: no gRPC
        self.name = env["MODELYARD_MODEL_NAME"]
        self.log_path = log_path
        full_env = {
            **os.environ,
            "MODELYARD_HOST": host,
            "MODELYARD_PORT": str(self.port),
            "MODELYARD_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
            **env,
        }
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "modelyard.runtime"],
            env=full_env, stdout=self._log, stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 90.0) -> RuntimeServer:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"runtime exited with {self.process.returncode}:\n{self.log()}")
            try:
                response = httpx.get(f"{self.url}/v2/models/{self.name}/ready", timeout=2)
                if response.status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"runtime not ready after {timeout}s:\n{self.log()}")

    def wait_exit(self, timeout: float = 60.0) -> int:
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)
        self._log.close()


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def start_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """``start_server(env, ready=True)`` -> RuntimeServer, stopped at session end."""
    started: list[RuntimeServer] = []
    logs = tmp_path_factory.mktemp("server-logs")

    def start(env: dict[str, str], *, ready: bool = True, host: str = "127.0.0.1") -> RuntimeServer:
        env = {"MODELYARD_CACHE_DIR": str(logs / "cache"), "MODELYARD_DRAIN_SECONDS": "0", **env}
        server = RuntimeServer(env, logs / f"server-{len(started)}.log", host)
        started.append(server)
        return server.wait_ready() if ready else server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def mlp_server(start_server, models: dict[str, Path]) -> RuntimeServer:  # type: ignore[no-untyped-def]
    """The TinyMLP TorchScript model, batching 8 / 2 ms, body limit 1 MiB, gRPC on too."""
    return start_server({  # type: ignore[no-any-return]
        "MODELYARD_GRPC_PORT": str(free_port()),
        "MODELYARD_MODEL_NAME": "mlp",
        "MODELYARD_MODEL_VERSION": "3",
        "MODELYARD_MODEL_URI": f"file://{models['mlp']}",
        "MODELYARD_MAX_BATCH_SIZE": "8",
        "MODELYARD_MAX_DELAY_MS": "2",
        "MODELYARD_MAX_BODY_BYTES": str(1024 * 1024),
    })

"""Run a real runtime process for each runtime pod of the local cluster.

kwok simulates pods without running anything. For the main job (and later the
rollout and autoscaling tests) a model must really answer, so :class:`PodProcesses`
plays the part of a kubelet for modelyard's runtime pods: it watches the pods the
operator manages and, for each running pod, starts ``python -m modelyard.runtime``
with the container's environment, bound to the pod's own IP (a loopback address:
see ``topology.py``) and port. When the pod goes away, the process is stopped with
SIGTERM (the runtime drains). Each process logs to ``<dir>/<namespace>_<pod>.log``.

Two things differ from a real node, on purpose:

* ``file:///models/...`` inside a pod is ``<models_dir>/...`` on this machine, as if
  the node mounted a model disk at ``/models``;
* a pod that asks for ``cuda`` runs on CPU when this machine has no GPU (the
  simulated GPUs are for scheduling only).

Used by ``modelyard dev up``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cluster import LocalCluster

log = logging.getLogger(__name__)

SELECTOR = "app.kubernetes.io/managed-by=modelyard"
MODELS_MOUNT = "/models/"


@dataclass
class _Running:
    uid: str
    ip: str
    port: int
    process: subprocess.Popen[bytes]


class PodProcesses:
    def __init__(self, cluster: LocalCluster, models_dir: Path, log_dir: Path,
                 *, poll_s: float = 0.5, device: str | None = None):
        self.cluster = cluster
        self.models_dir = models_dir
        self.log_dir = log_dir
        self.poll_s = poll_s
        self._device = device
        self._running: dict[str, _Running] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="pod-processes", daemon=True)

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        for key in list(self._running):
            self._end(key)

    def endpoints(self) -> dict[str, tuple[str, int]]:
        """``namespace/pod`` -> (ip, port) of every process started."""
        return {key: (r.ip, r.port) for key, r in self._running.items()
                if r.process.poll() is None}

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._sync()
            except Exception:
                log.exception("syncing runtime processes failed")
            self._stop.wait(self.poll_s)

    def _sync(self) -> None:
        proc = self.cluster.kubectl("get", "pods", "-A", "-l", SELECTOR, "-o", "json",
                                    check=False)
        if proc.returncode != 0:
            return
        wanted: dict[str, dict[str, Any]] = {}
        for pod in json.loads(proc.stdout)["items"]:
            meta, status = pod["metadata"], pod.get("status", {})
            if meta.get("deletionTimestamp") or status.get("phase") != "Running" \
                    or not status.get("podIP"):
                continue
            wanted[f"{meta['namespace']}/{meta['name']}"] = pod
        for key in [k for k in self._running if k not in wanted]:
            self._end(key)
        for key, pod in wanted.items():
            current = self._running.get(key)
            if current is None or current.uid != pod["metadata"]["uid"]:
                if current is not None:
                    self._end(key)
                self._begin(key, pod)

    def _begin(self, key: str, pod: dict[str, Any]) -> None:
        container = pod["spec"]["containers"][0]
        env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
        port = next((p["containerPort"] for p in container.get("ports", [])
                     if p.get("name") == "http"), 8080)
        ip = pod["status"]["podIP"]
        uri = env.get("MODELYARD_MODEL_URI", "")
        if uri.startswith(f"file://{MODELS_MOUNT}"):
            env["MODELYARD_MODEL_URI"] = (self.models_dir / uri.removeprefix(
                f"file://{MODELS_MOUNT}")).as_uri()
        env |= {
            "MODELYARD_HOST": ip,
            "MODELYARD_PORT": str(port),
            "MODELYARD_CACHE_DIR": str(self.log_dir.parent / "model-cache"),
            "MODELYARD_DEVICE": self._device or _device_for(env.get("MODELYARD_DEVICE", "auto")),
        }
        logfile = self.log_dir / f"{key.replace('/', '_')}.log"
        with logfile.open("ab") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "modelyard.runtime"],
                env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        self._running[key] = _Running(pod["metadata"]["uid"], ip, port, process)
        log.info("started the runtime of pod %s on %s:%d", key, ip, port)

    def _end(self, key: str) -> None:
        running = self._running.pop(key)
        process = running.process
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(5)
        log.info("stopped the runtime of pod %s", key)


def _device_for(asked: str) -> str:
    if asked != "cuda":
        return asked
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"

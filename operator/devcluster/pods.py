"""Run a real runtime process for each runtime pod of the local cluster.

kwok simulates pods without running anything. For the main job (and later the
rollout and autoscaling tests) a model must really answer, so :class:`PodProcesses`
plays the part of a kubelet for modelyard's runtime pods: it watches the pods the
operator manages and, for each running pod, starts ``python -m modelyard.runtime``
with the container's environment, inside the cluster's pod network and bound to the
pod's own IP (see ``podnet.py``) and port. When the pod goes away, the process is stopped with
SIGTERM (the runtime drains). Each process logs to ``<dir>/<namespace>_<pod>.log``.

On a cluster started with ``real_pods=True`` (kwok then leaves runtime pods
unready, see ``stages.py``) it also does a kubelet's status work: the pod's Ready
condition follows the runtime's real readiness probe, and a process that exits is
restarted with exponential back-off while the pod reports ``CrashLoopBackOff``
with its restart count, so a model that cannot load never looks Ready.

A pod of a generative model (``runtime.engine: vllm``) runs its container's command the
same way: ``python -m modelyard.runtime.llm`` with the rendered vLLM flags, under the
Python of the vLLM environment ``scripts/prepare.py`` builds (``llm.py``), probed on the
launcher's health port; its model cache is one directory per node, shared by that node's
pods as a node's cache would be, and its termination message is reported in the pod's
status as a kubelet reports ``/dev/termination-log``.

A conversion Job's pod (``spec.model.convert``, label ``modelyard.dev/convert-for``) runs
its container's command (``python -m modelyard.runtime.convertjob ...``) once, to its end:
the pod then reports phase Succeeded or Failed, its container terminated with the exit
code and the termination message the command wrote, as a kubelet reports a finished
container of a ``restartPolicy: Never`` pod; the Job controller takes it from there.

Two things differ from a real node, on purpose:

* ``file:///models/...`` inside a pod is ``<models_dir>/...`` on this machine, as if
  the node mounted a model disk at ``/models``;
* a pod that asks for ``cuda`` runs on CPU when this machine has no GPU (the
  simulated GPUs are for scheduling only).

Used by ``modelyard dev up``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cluster import LocalCluster

log = logging.getLogger(__name__)

SELECTOR = "app.kubernetes.io/managed-by=modelyard"
MODELS_MOUNT = "/models/"
CONVERT_LABEL = "modelyard.dev/convert-for"  # a conversion Job's pod (operator/conversion.py)


@dataclass
class _Running:
    uid: str
    ip: str
    port: int
    probe_path: str
    env: dict[str, str]
    logfile: Path
    probe_port: int = 0
    argv: tuple[str, ...] = ("-m", "modelyard.runtime")
    python: str = sys.executable
    termination_log: Path | None = None
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    start_after: float = 0.0  # back-off: do not restart before this (monotonic)
    last_exit: int | None = None
    reported: tuple[bool, str] | None = None  # (ready, container state) last patched
    container: str = "runtime"
    run_once: bool = False  # a Job's pod: never restarted, its end reported
    started_at: str = ""


class PodProcesses:
    def __init__(self, cluster: LocalCluster, models_dir: Path, log_dir: Path,
                 *, poll_s: float = 0.5, device: str | None = None,
                 max_backoff_s: float = 30.0, llm_python: str | None = None):
        self.cluster = cluster
        self.manage_status = cluster.config.real_pods
        self.max_backoff_s = max_backoff_s
        self.models_dir = models_dir
        self.log_dir = log_dir
        self.poll_s = poll_s
        self._device = device
        self._llm_python = llm_python
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
                if r.process is not None and r.process.poll() is None}

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
                current = self._running[key] = self._prepare(key, pod)
            self._tend(key, current)

    def _tend(self, key: str, running: _Running) -> None:
        """Start or restart the process, and report its state as a kubelet would."""
        now = time.monotonic()
        if running.run_once:
            self._tend_once(key, running)
            return
        if running.process is not None and running.process.poll() is not None:
            running.last_exit = running.process.returncode
            running.process = None
            running.restarts += 1
            delay = min(2 ** (running.restarts - 1), self.max_backoff_s)
            running.start_after = now + delay
            log.warning("the runtime of pod %s exited with %s; restarting in %.0f s",
                        key, running.last_exit, delay)
        if running.process is None and now >= running.start_after:
            self._spawn(key, running)
        if not self.manage_status:
            return
        if running.process is None:
            state = "CrashLoopBackOff"
            ready = False
        else:
            state = "running"
            ready = _probe(running.ip, running.probe_port or running.port, running.probe_path)
        if running.reported != (ready, state):
            self._report(key, running, ready, state)
            running.reported = (ready, state)

    def _tend_once(self, key: str, running: _Running) -> None:
        """A Job's pod: start its command once; when it exits, report how it ended."""
        if running.process is None and running.last_exit is None:
            running.started_at = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            self._spawn(key, running)
            return
        if running.process is None or running.process.poll() is None \
                or running.reported is not None:
            return
        code = running.last_exit = running.process.returncode
        namespace, name = key.split("/", 1)
        stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        terminated: dict[str, Any] = {"exitCode": code, "startedAt": running.started_at,
                                      "finishedAt": stamp,
                                      "reason": "Completed" if code == 0 else "Error"}
        if message := _termination_message(running.termination_log):
            terminated["message"] = message
        patch = {"status": {
            "phase": "Succeeded" if code == 0 else "Failed",
            "conditions": [{"type": kind, "status": "False", "lastTransitionTime": stamp,
                            "reason": "PodCompleted"} for kind in ("Ready", "ContainersReady")],
            "containerStatuses": [{"name": running.container, "ready": False,
                                   "restartCount": 0, "started": False,
                                   "state": {"terminated": terminated}}],
        }}
        proc = self.cluster.kubectl("patch", "pod", name, "-n", namespace, "--subresource=status",
                                    "--type=strategic", "-p", json.dumps(patch), check=False)
        if proc.returncode != 0 and "NotFound" not in proc.stderr:
            log.warning("could not report the end of pod %s: %s", key, proc.stderr.strip())
            return
        running.reported = (False, "terminated")
        log.info("the command of pod %s exited with %s", key, code)

    def _report(self, key: str, running: _Running, ready: bool, state: str) -> None:
        namespace, name = key.split("/", 1)
        stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        value = "True" if ready else "False"
        container: dict[str, Any] = {"name": "runtime", "ready": ready,
                                     "restartCount": running.restarts,
                                     "started": state == "running"}
        if state == "running":
            container["state"] = {"running": {"startedAt": stamp}}
        else:
            container["state"] = {"waiting": {
                "reason": "CrashLoopBackOff",
                "message": f"back-off restarting the runtime (exit code {running.last_exit}); "
                           f"see {running.logfile}"}}
        if running.last_exit is not None:
            terminated: dict[str, Any] = {"exitCode": running.last_exit, "finishedAt": stamp,
                                          "reason": "Error"}
            if message := _termination_message(running.termination_log):
                terminated["message"] = message
            container["lastState"] = {"terminated": terminated}
        patch = {"status": {
            "conditions": [{"type": kind, "status": value, "lastTransitionTime": stamp}
                           for kind in ("Ready", "ContainersReady")],
            "containerStatuses": [container],
        }}
        proc = self.cluster.kubectl("patch", "pod", name, "-n", namespace, "--subresource=status",
                                    "--type=strategic", "-p", json.dumps(patch), check=False)
        if proc.returncode != 0 and "NotFound" not in proc.stderr:
            log.warning("could not report the status of pod %s: %s", key, proc.stderr.strip())

    def _prepare(self, key: str, pod: dict[str, Any]) -> _Running:
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
        probe = (container.get("readinessProbe") or {}).get("httpGet") or {}
        probe_port = probe.get("port", "http")
        if isinstance(probe_port, str):
            probe_port = next((p["containerPort"] for p in container.get("ports", [])
                               if p.get("name") == probe_port), port)
        running = _Running(uid=pod["metadata"]["uid"], ip=ip, port=port,
                           probe_path=str(probe.get("path", "/v2/health/ready")), env=env,
                           logfile=self.log_dir / f"{key.replace('/', '_')}.log",
                           probe_port=int(probe_port))
        command = [*container.get("command", []), *container.get("args", [])]
        if CONVERT_LABEL in pod["metadata"].get("labels", {}):
            # The Job's command, its model URIs on this machine's models directory, its
            # container paths (cache, home, temp) in the log directory.
            work = self.log_dir.parent / "convert-work"
            running.run_once, running.container = True, container["name"]
            argv = command[command.index("-m"):]
            device = self._device or _device_for("cuda")
            running.argv = tuple(
                self._local_uri(a) if before == "--source"
                else device if before == "--device" and a == "cuda" else a
                for before, a in zip(["", *argv], argv, strict=False))
            running.termination_log = self.log_dir / f"{key.replace('/', '_')}.termination"
            for sub in ("tmp", "home"):
                (work / sub).mkdir(parents=True, exist_ok=True)
            env |= {"MODELYARD_CACHE_DIR": str(work), "HOME": str(work / "home"),
                    "TMPDIR": str(work / "tmp"),
                    "MODELYARD_TERMINATION_LOG": str(running.termination_log)}
        elif "modelyard.runtime.llm" in command:
            # The image's python3 is vLLM's environment: here, the one prepare.py builds,
            # with modelyard importable from the source tree.
            from . import llm

            running.python = self._llm_python or str(llm.ensure_vllm())
            running.argv = tuple(command[command.index("-m"):])
            node = pod["spec"].get("nodeName") or "node"
            running.termination_log = self.log_dir / f"{key.replace('/', '_')}.termination"
            env |= {
                "MODELYARD_CACHE_DIR": str(self.log_dir.parent / "node-cache" / node),
                "MODELYARD_TERMINATION_LOG": str(running.termination_log),
                "PYTHONPATH": str(llm.IMPORT_ROOT),
                "HOME": str(self.log_dir.parent / "home"),
            }
        return running

    def _local_uri(self, value: str) -> str:
        """``file:///models/...`` (a pod's model disk) on this machine."""
        if value.startswith(f"file://{MODELS_MOUNT}"):
            return (self.models_dir / value.removeprefix(f"file://{MODELS_MOUNT}")).as_uri()
        return value

    def _spawn(self, key: str, running: _Running) -> None:
        network = self.cluster.pod_network
        assert network is not None, "the cluster is not running"
        if running.termination_log is not None:
            running.termination_log.unlink(missing_ok=True)
        with running.logfile.open("ab") as out:
            running.process = subprocess.Popen(
                network.command([running.python, *running.argv]),
                env={**os.environ, **running.env}, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        log.info("started the runtime of pod %s on %s:%d", key, running.ip, running.port)

    def _end(self, key: str) -> None:
        running = self._running.pop(key)
        process = running.process
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(5)
        log.info("stopped the runtime of pod %s", key)


def _termination_message(path: Path | None) -> str | None:
    if path is None or not path.is_file():
        return None
    return path.read_text(errors="replace").strip()[-4096:] or None


def _probe(ip: str, port: int, path: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{ip}:{port}{path}", timeout=1) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _device_for(asked: str) -> str:
    if asked != "cuda":
        return asked
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"

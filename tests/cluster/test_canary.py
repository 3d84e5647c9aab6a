"""Canary rollouts on the real control plane: steps, the GPU budget, capacity, promotion."""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any

import yaml
from support import Kube, ready_endpoint_pods, wait_for

GPUS = 2
REPLICAS = 4


def canary(name: str, version: str, steps: list[dict[str, Any]]) -> str:
    return manifest(name, version, {"strategy": "Canary", "steps": steps})


def manifest(name: str, version: str, rollout: dict[str, Any]) -> str:
    return yaml.safe_dump({
        "apiVersion": "modelyard.dev/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": name},
        "spec": {
            "model": {"version": version, "uri": f"s3://models/{name}/{version}/model.pt"},
            "resources": {"gpu": {"count": GPUS, "product": "NVIDIA-H100-80GB-HBM3"}},
            "replicas": REPLICAS,
            "rollout": rollout,
        },
    })


def status(kube: Kube, name: str) -> dict[str, Any]:
    return dict((kube.get("md", name) or {}).get("status", {}))


class Sampler(threading.Thread):
    """Records, while a rollout runs, the GPUs the model's Deployments ask for and the
    ready pods behind its stable Service."""

    def __init__(self, kube: Kube, name: str):
        super().__init__(daemon=True)
        self.kube, self.name = kube, name
        self.gpus: list[int] = []
        self.ready_endpoints: list[int] = []
        self.serving: list[frozenset[str]] = []  # versions behind the stable Service
        self.progress: set[str] = set()
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            deps = self.kube.get("deployments",
                                 selector=f"modelyard.dev/model-deployment={self.name}") or []
            self.gpus.append(sum(d["spec"]["replicas"] for d in deps) * GPUS)
            # What the stable Service routes to: the ready endpoints of its EndpointSlices.
            behind = ready_endpoint_pods(self.kube, self.name)
            self.ready_endpoints.append(len(behind))
            self.serving.append(frozenset(pod.split("-")[1] for pod in behind.values()))
            progress = status(self.kube, self.name).get("canary", {}).get("progress")
            if progress:
                self.progress.add(progress)
            time.sleep(0.2)


def _stable(kube: Kube, name: str, version: str) -> bool:
    st = status(kube, name)
    return st.get("stableVersion") == version and not st.get("canary") \
        and st.get("readyReplicas") == REPLICAS \
        and kube.get("deployment", f"{name}-v{'1' if version == '2' else '2'}") is None


def test_canary_walks_its_steps_within_the_gpu_budget(kube: Kube, operator: Any) -> None:
    steps = [{"weight": 25, "pauseSeconds": 2}, {"weight": 50, "pauseSeconds": 2}]
    kube.apply(canary("cnr", "1", steps))
    wait_for(lambda: status(kube, "cnr").get("readyReplicas") == REPLICAS, what="v1 ready")
    wait_for(lambda: len(ready_endpoint_pods(kube, "cnr")) == REPLICAS, what="v1 endpoints")

    sampler = Sampler(kube, "cnr")
    sampler.start()
    kube.apply(canary("cnr", "2", steps))
    wait_for(lambda: status(kube, "cnr").get("canary"), what="canary started")
    wait_for(lambda: kube.get("service", "cnr-v2") and kube.get("service", "cnr-v1"),
             what="a Service per live version")
    wait_for(lambda: _stable(kube, "cnr", "2"), timeout=120, what="v2 promoted")
    sampler.stop.set()
    sampler.join()

    steady = REPLICAS * GPUS
    print(f"GPUs requested during the canary: peak {max(sampler.gpus)}, steady {steady}; "
          f"ready endpoints never below {min(sampler.ready_endpoints)}")
    assert max(sampler.gpus) <= steady + GPUS, sampler.gpus  # one replica of surge
    assert {"25% (step 1/2)", "50% (step 2/2)"} <= sampler.progress, sampler.progress
    assert min(sampler.ready_endpoints) >= REPLICAS, sampler.ready_endpoints
    st = status(kube, "cnr")
    assert [(v["version"], v["phase"]) for v in st["versions"]] == [("2", "Stable"),
                                                                  ("1", "Superseded")]
    assert st["versions"][0]["reason"] == "promoted after its canary"
    assert kube.get("service", "cnr-v1") is None
    assert kube.condition("cnr", "Progressing")["reason"] == "Complete"  # type: ignore[index]


def test_a_step_without_pause_waits_for_a_manual_promote(kube: Kube, operator: Any) -> None:
    kube.apply(canary("held", "1", [{"weight": 50}]))
    wait_for(lambda: status(kube, "held").get("readyReplicas") == REPLICAS, what="v1 ready")
    kube.apply(canary("held", "2", [{"weight": 50}]))

    def holding() -> bool:
        progressing = kube.condition("held", "Progressing") or {}
        return "waiting for promote" in progressing.get("message", "")

    wait_for(holding, what="holding at 50%")
    time.sleep(3)
    assert status(kube, "held")["canary"]["progress"] == "50% (step 1/1, paused)"
    assert status(kube, "held")["canary"]["paused"] is True
    deps = {d["metadata"]["name"]: d["spec"]["replicas"] for d in kube.get("deployments")}
    assert deps == {"held-v1": 2, "held-v2": 2}
    assert [v["phase"] for v in status(kube, "held")["versions"]] == ["Canary", "Stable"]

    shown = _cli(kube, "status", "held")
    assert "canary: version 2 at 50% (step 1/1, paused)" in shown.stdout
    promoted = _cli(kube, "promote", "held")
    assert promoted.returncode == 0, promoted.stderr
    assert "promoting version 2" in promoted.stdout
    wait_for(lambda: _stable(kube, "held", "2"), timeout=90, what="promoted")
    history = _cli(kube, "history", "held").stdout.splitlines()
    assert history[0].split()[:2] == ["VERSION", "PHASE"]
    assert history[1].split()[:2] == ["2", "Stable"]
    assert history[2].split()[:2] == ["1", "Superseded"]
    nothing = _cli(kube, "promote", "held")
    assert nothing.returncode == 1
    assert "no canary in progress" in nothing.stderr
    assert _cli(kube, "status", "missing").returncode == 2


def _cli(kube: Kube, *args: str) -> Any:
    import os
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "modelyard.operator.cli", *args, "-n", kube.namespace],
        env={**os.environ, "KUBECONFIG": str(kube.cluster.kubeconfig)},
        capture_output=True, text=True, timeout=60, check=False)


def test_an_operator_restarted_mid_canary_resumes_at_the_same_step(
        kube: Kube, operator_identity: str) -> None:
    from modelyard.operator.runner import OperatorThread

    steps = [{"weight": 25, "pauseSeconds": 3600}, {"weight": 50}]
    with OperatorThread():
        kube.apply(canary("resume", "1", steps))
        wait_for(lambda: status(kube, "resume").get("readyReplicas") == REPLICAS,
                 what="v1 ready")
        kube.apply(canary("resume", "2", steps))
        wait_for(lambda: (status(kube, "resume").get("canary") or {}).get("reachedAt"),
                 what="step 1 reached")
    before = status(kube, "resume")["canary"]
    objects = sorted(f"{o['kind']}/{o['metadata']['name']}" for o in
                     kube.get("deployments") + kube.get("services"))

    with OperatorThread():
        time.sleep(6)  # resume handlers and several resync passes
        after = status(kube, "resume")["canary"]
        assert after == before  # same step, same clocks: nothing restarted
        assert sorted(f"{o['kind']}/{o['metadata']['name']}" for o in
                      kube.get("deployments") + kube.get("services")) == objects
        deps = {d["metadata"]["name"]: d["spec"]["replicas"] for d in kube.get("deployments")}
        assert deps == {"resume-v1": 3, "resume-v2": 1}
        kube.run("annotate", "md", "resume", "modelyard.dev/promote=2")
        wait_for(lambda: _stable(kube, "resume", "2"), timeout=90, what="promoted")


def test_blue_green_previews_then_switches_the_stable_service_at_once(
        kube: Kube, operator: Any) -> None:
    rollout = {"strategy": "BlueGreen", "autoPromoteSeconds": 3}
    kube.apply(manifest("bg", "1", rollout))
    wait_for(lambda: status(kube, "bg").get("readyReplicas") == REPLICAS, what="v1 ready")
    wait_for(lambda: len(ready_endpoint_pods(kube, "bg")) == REPLICAS, what="v1 endpoints")
    sampler = Sampler(kube, "bg")
    sampler.start()
    kube.apply(manifest("bg", "2", rollout))

    def previewing() -> bool:
        preview = ready_endpoint_pods(kube, "bg-preview")
        return len(preview) == REPLICAS and all(p.startswith("bg-v2-") for p in preview.values())

    wait_for(previewing, timeout=60, what="the preview Service on the ready v2 pods")
    assert status(kube, "bg")["canary"]["strategy"] == "BlueGreen"
    assert kube.get("service", "bg")["spec"]["selector"]["modelyard.dev/version"] == "1"
    wait_for(lambda: _stable(kube, "bg", "2"), timeout=90, what="v2 promoted")
    wait_for(lambda: sampler.serving and sampler.serving[-1] == {"v2"}
             and sampler.ready_endpoints[-1] == REPLICAS, what="the stable Service on v2")
    sampler.stop.set()
    sampler.join()

    # Never both versions behind the stable Service, never fewer than REPLICAS ready:
    # one switch from v1 to v2.
    assert all(len(versions) <= 1 for versions in sampler.serving), set(sampler.serving)
    seen = [next(iter(v)) for v in sampler.serving if v]
    assert seen[0] == "v1"
    assert seen[-1] == "v2"
    assert sum(1 for a, b in itertools.pairwise(seen) if a != b) == 1
    assert min(sampler.ready_endpoints) >= REPLICAS, sampler.ready_endpoints
    assert max(sampler.gpus) <= 2 * REPLICAS * GPUS  # a full preview copy, no more
    wait_for(lambda: kube.get("service", "bg-preview") is None, what="preview Service removed")
    st = status(kube, "bg")
    assert [(v["version"], v["phase"]) for v in st["versions"]] == [("2", "Stable"),
                                                                  ("1", "Superseded")]
    assert st["versions"][0]["promotedAt"]


def test_blue_green_waits_for_a_manual_promote(kube: Kube, operator: Any) -> None:
    rollout = {"strategy": "BlueGreen", "maxSurgeGPUs": GPUS}  # a one-replica preview
    kube.apply(manifest("bgm", "1", rollout))
    wait_for(lambda: status(kube, "bgm").get("readyReplicas") == REPLICAS, what="v1 ready")
    kube.apply(manifest("bgm", "2", rollout))
    wait_for(lambda: (status(kube, "bgm").get("canary") or {}).get("paused"),
             what="preview ready, paused")
    deps = {d["metadata"]["name"]: d["spec"]["replicas"] for d in kube.get("deployments")}
    assert deps == {"bgm-v1": REPLICAS, "bgm-v2": 1}
    assert _cli(kube, "promote", "bgm").returncode == 0
    wait_for(lambda: _stable(kube, "bgm", "2"), timeout=90, what="v2 promoted")
    wait_for(lambda: len(ready_endpoint_pods(kube, "bgm")) == REPLICAS, what="v2 at full size")


def test_abort_retry_and_rollback_to_a_recorded_version(kube: Kube, operator: Any) -> None:
    steps = [{"weight": 50}]
    kube.apply(canary("ctl", "1", steps))
    wait_for(lambda: status(kube, "ctl").get("readyReplicas") == REPLICAS, what="v1 ready")
    assert _cli(kube, "abort", "ctl").returncode == 1  # nothing to abort yet
    kube.apply(canary("ctl", "2", steps))
    wait_for(lambda: (status(kube, "ctl").get("canary") or {}).get("paused"), what="paused")

    aborted = _cli(kube, "abort", "ctl")
    assert aborted.returncode == 0, aborted.stderr
    wait_for(lambda: status(kube, "ctl")["versions"][0]["phase"] == "RolledBack",
             what="aborted")
    wait_for(lambda: len(ready_endpoint_pods(kube, "ctl")) == REPLICAS
             and kube.get("deployment", "ctl-v2")["spec"]["replicas"] == 0, what="v1 only")
    st = status(kube, "ctl")
    assert "aborted" in st["versions"][0]["reason"]
    assert st["stableVersion"] == "1"
    assert kube.condition("ctl", "Degraded")["reason"] == "RolledBack"  # type: ignore[index]
    assert kube.condition("ctl", "Ready")["status"] == "True"  # type: ignore[index]
    time.sleep(3)  # the abort annotation stays; it is not acted on twice
    assert status(kube, "ctl")["versions"][0]["phase"] == "RolledBack"

    assert _cli(kube, "retry", "ctl").returncode == 0
    wait_for(lambda: (status(kube, "ctl").get("canary") or {}).get("paused"),
             what="the canary again, paused")
    assert [(v["version"], v["phase"]) for v in status(kube, "ctl")["versions"]] == [
        ("2", "Canary"), ("2", "RolledBack"), ("1", "Stable")]
    assert kube.condition("ctl", "Degraded")["status"] == "False"  # type: ignore[index]
    assert _cli(kube, "promote", "ctl").returncode == 0
    wait_for(lambda: _stable(kube, "ctl", "2"), timeout=90, what="v2 promoted")

    # Back to version 1: it served before, so no canary step waits for a promote.
    back = _cli(kube, "rollback", "ctl")
    assert back.returncode == 0, back.stderr
    assert "back from version 2 to 1" in back.stdout
    wait_for(lambda: _stable(kube, "ctl", "1"), timeout=90, what="back on v1")
    assert [(v["version"], v["phase"]) for v in status(kube, "ctl")["versions"]] == [
        ("1", "Stable"), ("2", "Superseded"), ("2", "RolledBack"), ("1", "Superseded")]
    assert kube.get("md", "ctl")["spec"]["model"]["uri"] == "s3://models/ctl/1/model.pt"
    never = _cli(kube, "rollback", "ctl", "--to", "7")
    assert never.returncode == 1
    assert "never served" in never.stderr


def test_an_operator_restarted_again_and_again_walks_every_step_once(
        kube: Kube, operator_identity: str) -> None:
    """The operator is stopped and started anew every few seconds through a whole canary:
    every step is walked once, in order, on the same clocks, and nothing is duplicated."""
    from modelyard.operator.runner import OperatorThread

    # Pauses long enough that the canary spans several restarts (each lives about 3 s)
    steps = [{"weight": 25, "pauseSeconds": 6}, {"weight": 50, "pauseSeconds": 6},
             {"weight": 75, "pauseSeconds": 6}]
    with OperatorThread():
        kube.apply(canary("chaos", "1", steps))
        wait_for(lambda: status(kube, "chaos").get("readyReplicas") == REPLICAS,
                 what="v1 ready")
        kube.apply(canary("chaos", "2", steps))
        wait_for(lambda: status(kube, "chaos").get("canary"), what="canary started")
    seen: list[tuple[int, str]] = []
    restarts = 0
    deadline = time.monotonic() + 180
    while not _stable(kube, "chaos", "2") and time.monotonic() < deadline:
        with OperatorThread():
            restarts += 1
            for _ in range(6):
                current = status(kube, "chaos").get("canary")
                if current:
                    seen.append((current["step"], current["startedAt"]))
                names = sorted(d["metadata"]["name"] for d in kube.get("deployments"))
                assert set(names) <= {"chaos-v1", "chaos-v2"}, names
                time.sleep(0.5)
    assert _stable(kube, "chaos", "2"), seen[-3:]
    print(f"canary completed across {restarts} operator restarts")
    assert restarts >= 4
    assert [step for step, _ in seen] == sorted(step for step, _ in seen)  # never went back
    assert {step for step, _ in seen} >= {1, 2, 3}  # every step was walked
    assert len({started for _, started in seen}) == 1  # never restarted the canary

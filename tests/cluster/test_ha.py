"""Two operator replicas against the real control plane: only the Lease holder acts, and
when it is killed mid-rollout the other takes over within the lease time and finishes the
rollout, with no duplicate objects and no repeated step."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import Kube, wait_for
from test_canary import REPLICAS, canary, status

LEASE_S, RENEW_S, RETRY_S = 6, 4, 1
WRITE_LOG_MARKS = ("applying ", "scaling version", "retiring ", "status of ")


class Replica:
    """One operator process, as a pod of the chart's Deployment would run it."""

    def __init__(self, kube: Kube, name: str, logs: Path):
        self.name = name
        self.log = logs / f"{name}.log"
        env = {
            **os.environ, "KUBECONFIG": str(kube.cluster.operator_kubeconfig),
            "MODELYARD_LEADER_ELECTION": "true", "POD_NAME": name,
            "POD_NAMESPACE": kube.namespace,
            "MODELYARD_LEASE_DURATION_SECONDS": str(LEASE_S),
            "MODELYARD_LEASE_RENEW_DEADLINE_SECONDS": str(RENEW_S),
            "MODELYARD_LEASE_RETRY_SECONDS": str(RETRY_S),
        }
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "modelyard.operator.cli", "operator",
                 "-n", kube.namespace], env=env, stdout=out, stderr=subprocess.STDOUT)

    def writes(self) -> list[str]:
        return [line for line in self.log.read_text().splitlines()
                if any(mark in line for mark in WRITE_LOG_MARKS)]

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(30)


@pytest.fixture
def replicas(kube: Kube, tmp_path: Path) -> Iterator[dict[str, Replica]]:
    running = {name: Replica(kube, name, tmp_path) for name in ("op-a", "op-b")}
    try:
        yield running
    finally:
        for replica in running.values():
            replica.stop(signal.SIGKILL)


def holder(kube: Kube) -> str | None:
    lease = kube.get("lease", "modelyard-operator")
    return (lease or {}).get("spec", {}).get("holderIdentity") or None


def children(kube: Kube) -> list[str]:
    return sorted(f"{o['kind']}/{o['metadata']['name']}"
                  for o in kube.get("deployments") + kube.get("services"))


def test_only_the_leader_acts_and_a_killed_leader_is_replaced_mid_rollout(
        kube: Kube, replicas: dict[str, Replica]) -> None:
    leader_name = wait_for(lambda: holder(kube), timeout=60, what="a leader")
    leader = replicas[leader_name]
    follower = next(r for r in replicas.values() if r is not leader)

    steps: list[dict[str, Any]] = [{"weight": 25, "pauseSeconds": 1}, {"weight": 50}]
    kube.apply(canary("ha", "1", steps))
    wait_for(lambda: status(kube, "ha").get("readyReplicas") == REPLICAS, timeout=90,
             what="v1 ready")
    kube.apply(canary("ha", "2", steps))
    wait_for(lambda: (status(kube, "ha").get("canary") or {}).get("paused"), timeout=90,
             what="the canary paused at step 2")
    assert leader.writes()
    assert follower.writes() == [], follower.writes()  # it watched, and did nothing
    before, objects = status(kube, "ha")["canary"], children(kube)

    leader.stop(signal.SIGKILL)  # no chance to release the Lease
    killed = time.monotonic()
    wait_for(lambda: holder(kube) == follower.name, timeout=LEASE_S * 3,
             interval=0.1, what="the follower holding the Lease")
    takeover_s = time.monotonic() - killed
    print(f"takeover after the leader was killed: {takeover_s:.1f} s "
          f"(lease {LEASE_S} s, retry {RETRY_S} s)")
    assert takeover_s <= LEASE_S + 2 * RETRY_S + 1

    time.sleep(4)  # several resync passes by the new leader
    assert status(kube, "ha")["canary"] == before  # same step, same clocks
    assert children(kube) == objects  # nothing recreated or duplicated
    kube.run("annotate", "md", "ha", "modelyard.dev/promote=2")
    wait_for(lambda: status(kube, "ha").get("stableVersion") == "2"
             and not status(kube, "ha").get("canary")
             and kube.get("deployment", "ha-v1") is None, timeout=90,
             what="the new leader finishing the rollout")
    assert any("status of" in line for line in follower.writes())


def test_a_leader_that_stops_cleanly_hands_over_at_once(
        kube: Kube, replicas: dict[str, Replica]) -> None:
    leader_name = wait_for(lambda: holder(kube), timeout=60, what="a leader")
    other = next(name for name in replicas if name != leader_name)
    stopped = time.monotonic()
    replicas[leader_name].stop(signal.SIGTERM)  # a rolling upgrade: the Lease is released
    wait_for(lambda: holder(kube) == other, timeout=LEASE_S * 3, interval=0.1,
             what="the other replica holding the Lease")
    handover_s = time.monotonic() - stopped
    print(f"handover after a clean stop: {handover_s:.1f} s")
    assert replicas[leader_name].process.returncode == 0
    lease = kube.get("lease", "modelyard-operator")["spec"]
    assert lease["leaseTransitions"] >= 1


def test_a_leader_killed_mid_scale_leaves_the_scale_to_the_other(
        kube: Kube, replicas: dict[str, Replica]) -> None:
    leader_name = wait_for(lambda: holder(kube), timeout=60, what="a leader")
    kube.apply(canary("grow", "1", [{"weight": 50}]))
    wait_for(lambda: status(kube, "grow").get("readyReplicas") == REPLICAS, timeout=90,
             what="ready")
    kube.run("scale", "md", "grow", "--replicas=7")
    replicas[leader_name].stop(signal.SIGKILL)  # possibly before it acted on the scale
    wait_for(lambda: status(kube, "grow").get("readyReplicas") == 7, timeout=LEASE_S * 6,
             what="the other replica finishing the scale")
    deployments = kube.get("deployments", selector="modelyard.dev/model-deployment=grow")
    assert [(d["metadata"]["name"], d["spec"]["replicas"]) for d in deployments] == [
        ("grow-v1", 7)]  # one Deployment, scaled once to the asked count
    assert len(kube.get("pods", selector="modelyard.dev/model-deployment=grow")) == 7

"""Conversion as a step of the rollout (spec.model.convert): the Job, and the state machine
pending → converting → converted | failed, driven through whole passes of the pure plan.

No API server: :class:`Cluster` carries each plan out (Deployments and Jobs appear, a
Job finishes when the test says so, with the termination message its pod would leave),
and reads the next pass's world from what the last pass wrote, as a restarted operator
reads status and its indexes.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest
from worlds import world_of

from modelyard.operator import api, api_status, conversion, plan, rollout
from modelyard.operator.render import GPU_PRODUCT_LABEL, MODEL_LABEL, VERSION_LABEL
from modelyard.operator.world import VersionState, World

T0 = dt.datetime(2026, 12, 6, 20, 0, tzinfo=dt.UTC)
SHA_SOURCE = "a" * 64
SHA_PACKAGE = "b" * 64
CONVERT = {"quantize": "none", "tolerance": 0.001}


def spec(version: str = "1", *, convert: dict[str, Any] | None = None,
         **more: Any) -> dict[str, Any]:
    model: dict[str, Any] = {"version": version, "uri": f"s3://models/m/{version}/model.pt2",
                             "format": "export", "sha256": SHA_SOURCE}
    if convert is not None:
        model["convert"] = convert
    return {"model": model, "replicas": 2,
            "resources": {"gpu": {"count": 1, "product": "NVIDIA-H100-80GB-HBM3"}},
            "rollout": {"strategy": "Canary", "steps": [{"weight": 50, "pauseSeconds": 10}]},
            **more}


def report(version: str, **more: Any) -> str:
    """What the Job's container leaves as its termination message on success."""
    return json.dumps({"sourceSha256": SHA_SOURCE,
                       "artifactUri": f"s3://models/m/{version}/aoti/{SHA_PACKAGE}.pt2",
                       "artifactSha256": SHA_PACKAGE, "speedup": 1.8, "speedupBatch1": 2.4,
                       "accuracyDelta": 3e-7, "tolerance": 0.001, "compileSeconds": 31.5}
                      | more)


class Cluster:
    """Deployments (ready one pass after they are asked for) and conversion Jobs."""

    def __init__(self, spec_: dict[str, Any]):
        self.spec = spec_
        self.annotations: dict[str, str] = {}
        self.desired: dict[str, int] = {}
        self.templates: dict[str, dict[str, Any]] = {}  # version -> pod template
        self.jobs: dict[str, dict[str, Any]] = {}  # name -> Job as created
        self.job_pods: list[dict[str, Any]] = []
        self.status = api_status.ModelDeploymentStatus()
        self.now = T0
        self.created: list[str] = []  # Jobs created, in order
        self.deleted: list[str] = []

    def world(self) -> World:
        versions = {v: VersionState(v, f"m-v{v}", desired=n, replicas=n, ready=n, updated=n)
                    for v, n in self.desired.items()}
        live: dict[tuple[str, str], Any] = {
            ("Deployment", f"m-v{v}"): {"metadata": {"name": f"m-v{v}"}} for v in self.desired}
        live |= {("Job", name): job for name, job in self.jobs.items()}
        return world_of(self.spec, versions, previous=self.status,
                        annotations=dict(self.annotations), live=live,
                        jobs=dict(self.jobs), job_pods=tuple(self.job_pods))

    def run_pass(self) -> plan.Plan:
        todo = plan.plan(self.world(), None, None, self.now)
        for obj in todo.apply:
            if obj["kind"] == "Deployment":
                version = obj["metadata"]["labels"][VERSION_LABEL]
                self.desired[version] = obj["spec"]["replicas"]
                self.templates[version] = obj["spec"]["template"]
            if obj["kind"] == "Job" and obj["metadata"]["name"] not in self.jobs:
                self.jobs[obj["metadata"]["name"]] = obj
                self.created.append(obj["metadata"]["name"])
        for name, replicas in todo.scale.items():
            self.desired[name.removeprefix("m-v")] = replicas
        for gone in todo.retire:
            if gone.kind == "Deployment":
                self.desired.pop(gone.name.removeprefix("m-v"), None)
            if gone.kind == "Job":
                self.jobs.pop(gone.name, None)
                self.deleted.append(gone.name)
        assert todo.status is not None
        self.status = todo.status
        self.now += dt.timedelta(seconds=todo.recheck_after or 1)
        return todo

    def passes(self, n: int) -> None:
        for _ in range(n):
            self.run_pass()

    def finish(self, name: str, *, ok: bool, message: str, reason: str | None = None) -> None:
        """The Job ends: its condition, and its pod's termination message."""
        condition = {"type": "Complete" if ok else "Failed", "status": "True"}
        if reason:
            condition |= {"reason": reason, "message": "Job was active longer than specified "
                                                       "deadline"}
        self.jobs[name] = self.jobs[name] | {"status": {"conditions": [condition]}}
        self.job_pods.append({
            "metadata": {"name": f"{name}-x1", "labels": {conversion.JOB_NAME_LABEL: name}},
            "status": {"phase": "Succeeded" if ok else "Failed", "containerStatuses": [{
                "name": "convert", "state": {"terminated": {
                    "exitCode": 0 if ok else 1, "message": message}}}]}})

    def condition(self, kind: str) -> api_status.Condition:
        return next(c for c in self.status.conditions if c.type == kind)

    def env(self, version: str) -> dict[str, str]:
        container = self.templates[version]["spec"]["containers"][0]
        return {e["name"]: e["value"] for e in container["env"] if "value" in e}


def stable_at_1() -> Cluster:
    cluster = Cluster(spec("1"))
    cluster.passes(3)
    assert [(r.version, r.phase) for r in cluster.status.versions] == [("1", "Stable")]
    return cluster


def bump(cluster: Cluster, version: str = "2", **convert: Any) -> None:
    cluster.spec = spec(version, convert=CONVERT | convert)


def test_the_job_is_placed_like_the_models_pods_and_reports_through_its_pod() -> None:
    world = world_of(spec("2", convert=CONVERT | {"quantize": "none"},
                          scheduling={"tolerations": [{"key": "team", "operator": "Exists"}]},
                          runtime={"batching": {"maxBatchSize": 8}}))
    assert world.spec is not None
    key = conversion.conversion_key(world.spec)
    name = conversion.job_name("m", key)
    job = conversion.render_job(world.owner, world.spec, name, key)

    assert job["metadata"]["name"] == name
    assert len(name) <= 63
    assert job["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    assert job["spec"]["backoffLimit"] == 0
    assert job["spec"]["ttlSecondsAfterFinished"] == conversion.JOB_TTL_S
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["nodeSelector"] == {GPU_PRODUCT_LABEL: "NVIDIA-H100-80GB-HBM3"}
    assert [t.get("key") for t in pod["tolerations"]] == ["nvidia.com/gpu", "team"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    # a read-only root: Inductor builds in /tmp, a volume of the Job's own
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    assert {"name": "tmp", "emptyDir": {}} in pod["volumes"]
    args = container["args"]
    assert args[args.index("--source") + 1] == "s3://models/m/2/model.pt2"
    assert args[args.index("--max-batch") + 1] == "8"
    assert args[args.index("--device") + 1] == "cuda"
    assert args[args.index("--sha256") + 1] == SHA_SOURCE
    assert args[args.index("--tolerance") + 1] == "0.001"
    # the model's Services select MODEL_LABEL: a Job's pod must never receive traffic
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert MODEL_LABEL not in labels
    assert labels[conversion.CONVERT_LABEL] == "m"


def test_a_pvc_source_is_mounted_writable_and_published_under_its_claim() -> None:
    world = world_of(spec("2", convert=CONVERT) | {"model": {
        "version": "2", "uri": "pvc://store/m/2/model.pt2", "format": "export",
        "convert": CONVERT}})
    assert world.spec is not None
    job = conversion.render_job(world.owner, world.spec, "m-convert-x", "k")
    pod = job["spec"]["template"]["spec"]
    assert {"name": "model-store", "persistentVolumeClaim": {"claimName": "store"}} \
        in pod["volumes"]
    args = pod["containers"][0]["args"]
    assert args[args.index("--source") + 1] == "file:///mnt/models/store/m/2/model.pt2"
    assert args[args.index("--publish-as") + 1] == "pvc://store/m/2/model.pt2"


def test_a_converted_version_rolls_out_as_its_package_and_the_ledger_keeps_the_figures() -> None:
    cluster = stable_at_1()
    bump(cluster)
    cluster.passes(3)  # pending → converting: one Job, however many passes
    [name] = cluster.created
    assert "2" not in cluster.desired, "no canary before the package exists"
    assert cluster.desired == {"1": 2}
    assert cluster.condition("Progressing").reason == "Converting"
    assert cluster.condition("Converted").status == "False"
    record = cluster.status.versions[0]
    assert (record.version, record.phase) == ("2", "Pending")
    assert record.conversion is not None
    assert record.conversion.phase == "Converting"
    assert record.conversion.job == name

    cluster.finish(name, ok=True, message=report("2"))
    cluster.passes(12)
    assert cluster.created == [name]
    assert cluster.condition("Converted").status == "True"
    assert [(r.version, r.phase) for r in cluster.status.versions] == [
        ("2", "Stable"), ("1", "Superseded")]
    env = cluster.env("2")
    assert env["MODELYARD_MODEL_FORMAT"] == "aoti"
    assert env["MODELYARD_MODEL_URI"] == f"s3://models/m/2/aoti/{SHA_PACKAGE}.pt2"
    assert env["MODELYARD_MODEL_SHA256"] == SHA_PACKAGE
    converted = cluster.status.versions[0].conversion
    assert converted is not None
    assert (converted.phase, converted.source_sha256, converted.artifact_sha256,
            converted.speedup, converted.accuracy_delta) == (
        "Converted", SHA_SOURCE, SHA_PACKAGE, 1.8, 3e-7)
    # the canary ran its steps on the package (the stable version shared the traffic)
    assert cluster.env("2")["MODELYARD_MODEL_URI"].endswith(".pt2")


def test_a_failed_conversion_stops_the_rollout_and_stable_serves_on() -> None:
    cluster = stable_at_1()
    bump(cluster, tolerance=1e-12)
    cluster.passes(2)
    [name] = cluster.created
    error = ("verification failed: output 'logits' differs by 2.1e-07 (tolerance 1e-12); "
             "nothing was written")
    cluster.finish(name, ok=False, message=json.dumps({"error": error, "accuracyDelta": 2.1e-7,
                                                       "tolerance": 1e-12}))
    cluster.passes(3)
    assert cluster.desired == {"1": 2}, "stable untouched, no canary"
    assert (cluster.condition("Converted").status, cluster.condition("Converted").reason) == (
        "False", "ConversionFailed")
    assert cluster.condition("Degraded").reason == "ConversionFailed"
    assert error in cluster.condition("Degraded").message
    assert cluster.condition("Ready").status == "True"
    record = cluster.status.versions[0]
    assert (record.version, record.phase) == ("2", "Failed")
    assert record.conversion is not None
    assert record.conversion.accuracy_delta == 2.1e-7
    assert cluster.status.stable_version == "1"

    cluster.jobs.clear()  # the Job's TTL ran out: a failure stays a failure
    cluster.passes(3)
    assert cluster.created == [name]
    assert cluster.status.versions[0].phase == "Failed"

    cluster.annotations[api.RETRY_ANNOTATION] = "once-more"  # modelyard retry
    cluster.passes(2)
    assert len(cluster.created) == 2
    assert cluster.created[1] != name
    assert cluster.condition("Progressing").reason == "Converting"


def test_a_restarted_operator_reads_the_job_it_created_and_the_converted_package() -> None:
    cluster = stable_at_1()
    bump(cluster)
    cluster.run_pass()
    [name] = cluster.created
    restarted = Cluster(cluster.spec)  # a new operator: status and indexes, nothing else
    restarted.status, restarted.desired = cluster.status, dict(cluster.desired)
    restarted.jobs = dict(cluster.jobs)
    restarted.passes(2)
    assert restarted.created == []
    restarted.finish(name, ok=True, message=report("2"))
    restarted.run_pass()
    restarted.jobs.clear()  # gone (TTL) once recorded: the ledger holds the package
    restarted.job_pods.clear()
    restarted.passes(12)
    assert restarted.created == []
    assert restarted.env("2")["MODELYARD_MODEL_FORMAT"] == "aoti"


@pytest.mark.parametrize(("message", "why"), [
    ("", "without reporting its package"),
    (report("2", artifactUri="s3://elsewhere/x.pt2"), "outside s3://models/m/2/aoti/"),
])
def test_a_job_that_completes_without_a_usable_package_is_a_failure(message: str,
                                                                      why: str) -> None:
    cluster = stable_at_1()
    bump(cluster)
    cluster.run_pass()
    cluster.finish(cluster.created[0], ok=True, message=message)
    cluster.run_pass()
    assert why in cluster.condition("Converted").message
    assert cluster.desired == {"1": 2}


def test_a_job_that_dies_without_a_report_is_told_by_its_last_log_line() -> None:
    """With FallbackToLogsOnError the termination message is the log's tail, cut anywhere:
    the condition starts with the exception, the traceback's last line."""
    cluster = stable_at_1()
    bump(cluster)
    cluster.run_pass()
    tail = ("n()\n" + "  File \"/usr/lib/python3.11/tempfile.py\", line 362\n" * 30
            + "FileNotFoundError: [Errno 2] No usable temporary directory found\n")
    cluster.finish(cluster.created[0], ok=False, message=tail)
    cluster.run_pass()
    message = cluster.condition("Converted").message
    assert message.startswith(f"Job {cluster.created[0]}: FileNotFoundError: [Errno 2] No "
                              "usable temporary directory found (the log before it: …"), message


def test_a_job_past_its_deadline_says_so() -> None:
    cluster = stable_at_1()
    bump(cluster)
    cluster.run_pass()
    cluster.finish(cluster.created[0], ok=False, message="", reason="DeadlineExceeded")
    cluster.run_pass()
    assert "longer than specified deadline" in cluster.condition("Degraded").message


def test_the_first_version_converts_before_its_pods_start_and_jobs_are_cleaned_up() -> None:
    cluster = Cluster(spec("1", convert=CONVERT))
    cluster.passes(2)
    assert cluster.desired == {}
    assert cluster.condition("Ready").status == "False"
    [first] = cluster.created
    cluster.finish(first, ok=True, message=report("1"))
    cluster.passes(3)
    assert cluster.env("1")["MODELYARD_MODEL_FORMAT"] == "aoti"
    bump(cluster, "2")
    cluster.passes(2)
    assert first in cluster.deleted, "a Job that is no longer the current one is deleted"
    assert cluster.desired["1"] == 2


def test_a_hold_keeps_what_runs() -> None:
    world = world_of(spec("2", convert=CONVERT),
                     {"1": VersionState("1", "m-v1", desired=2, ready=2, replicas=2, updated=2)},
                     previous=api_status.ModelDeploymentStatus(stable_version="1"))
    step = rollout.hold(world, 2)
    assert step.replicas == {"1": 2}
    assert step.versions.retire == frozenset()


def test_a_job_seen_complete_before_its_pod_s_end_waits_for_the_pod() -> None:
    """Jobs and pods are two watches: the Job's condition may arrive first."""
    cluster = stable_at_1()
    bump(cluster)
    cluster.run_pass()
    [name] = cluster.created
    cluster.finish(name, ok=True, message=report("2"))
    pod = cluster.job_pods[0]
    pod["status"] = {"phase": "Running", "containerStatuses": [
        {"name": "convert", "state": {"running": {}}}]}
    cluster.run_pass()
    assert cluster.condition("Converted").reason == "Converting"
    cluster.job_pods.clear()
    cluster.finish(name, ok=True, message=report("2"))
    cluster.run_pass()
    assert cluster.condition("Converted").status == "True"

"""Real Argo CD (built from its pinned release) syncs a ModelDeployment from Git, judges its
health with our Lua check and runs our actions: the GitOps journey of docs/gitops.md.

The application controller, repo server, API server and Redis run as local processes against
a local cluster whose model pods are real runtime processes (so Healthy means the model
answers), every Argo CD setting at its default. A bare Git repository made here is served by
``git daemon``; after each commit the test asks for a refresh (``argocd app get --refresh``),
as a Git webhook would. Everything is judged from Argo CD's own view: the Application's
status (``argocd app get -o json``), the resource tree the UI reads, and ``argocd app diff``,
with client-side and with server-side diff.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shlex
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import ROOT, as_operator, real_pod_cluster, wait_for

from modelyard.operator.devcluster.argocd import NAMESPACE, LocalArgoCD
from modelyard.operator.devcluster.ports import release_port, reserve_port

DOC = ROOT / "docs" / "gitops.md"
APP = "vision"
MODEL = "resnet"
URI = "file:///models/demo/1/model.pt"
COMPARE_OPTIONS = "argocd.argoproj.io/compare-options"


class GitServer:
    """A bare repository served read-only by ``git daemon`` on loopback, and a clone to
    commit to."""

    def __init__(self, root: Path):
        self.root = root
        self.bare = root / "served" / "models.git"
        self.work = root / "work"
        self.port = 0
        self._daemon: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"git://127.0.0.1:{self.port}/models.git"

    def __enter__(self) -> GitServer:
        self._git("init", "--quiet", "--bare", "--initial-branch=main", str(self.bare))
        self._git("init", "--quiet", "--initial-branch=main", str(self.work))
        self._git("-C", str(self.work), "remote", "add", "origin", str(self.bare))
        self.port = reserve_port()
        self._daemon = subprocess.Popen(
            ["git", "daemon", "--reuseaddr", "--export-all", "--informative-errors",
             "--listen=127.0.0.1", f"--port={self.port}", f"--base-path={self.bare.parent}",
             str(self.bare.parent)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        wait_for(lambda: subprocess.run(["git", "ls-remote", self.url], capture_output=True,
                                        check=False).returncode == 0, what="git daemon")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._daemon is not None:
            self._daemon.terminate()
            self._daemon.wait(timeout=10)
        release_port(self.port)

    def commit(self, path: str, text: str, message: str) -> str:
        """Commit ``text`` as ``path``, push it, return the new revision."""
        target = self.work / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        work = ["-C", str(self.work)]
        self._git(*work, "add", path)
        self._git(*work, "-c", "user.name=ML engineer", "-c", "user.email=ml@example.com",
                  "commit", "--quiet", "-m", message)
        self._git(*work, "push", "--quiet", "origin", "main")
        return self._git(*work, "rev-parse", "HEAD").strip()

    @staticmethod
    def _git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True,
                              check=True).stdout


@dataclass
class GitOps:
    cluster: Any
    argo: LocalArgoCD
    git: GitServer
    namespace: str
    models: Path
    commits: list[str] = field(default_factory=list)

    def app(self, refresh: bool = False) -> dict[str, Any]:
        """``argocd app get vision -o json`` (with ``--refresh``: re-read Git first, as a Git
        webhook makes Argo CD do)."""
        args = ["app", "get", APP, "-o", "json", *(["--refresh"] if refresh else [])]
        result: dict[str, Any] = json.loads(self.argo.cli(*args).stdout)
        return result

    def health(self) -> dict[str, Any]:
        """The ModelDeployment's health in the resource tree Argo CD's UI shows."""
        url = f"http://127.0.0.1:{self.argo.api_port}/api/v1/applications/{APP}/resource-tree"
        with urllib.request.urlopen(url, timeout=10) as reply:
            tree = json.load(reply)
        node = next(n for n in tree.get("nodes", []) if n["kind"] == "ModelDeployment")
        health: dict[str, Any] = node.get("health") or {}
        return health

    def commit(self, version: str, sha256: str | None = None) -> str:
        model: dict[str, Any] = {"version": version, "uri": URI}
        if sha256:
            model["sha256"] = sha256
        manifest = yaml.safe_dump({
            "apiVersion": "modelyard.dev/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": MODEL},
            "spec": {"model": model, "resources": {"gpu": {"count": 1}}, "replicas": 1,
                     "rollout": {"strategy": "Canary", "steps": [{"weight": 50}]}},
        })
        revision = self.git.commit(f"{APP}/{MODEL}.yaml", manifest, f"resnet version {version}")
        self.commits.append(revision)
        return revision

    def synced_to(self, revision: str) -> dict[str, Any] | None:
        """The Application once Argo CD has compared and synced ``revision``."""
        app = self.app(refresh=True)
        status = app.get("status", {})
        operation = status.get("operationState") or {}
        done = (status.get("sync", {}).get("revision") == revision
                and (operation.get("syncResult") or {}).get("revision") == revision
                and operation.get("phase") == "Succeeded")
        return app if done else None

    def wait_health(self, want: str, what: str, timeout: float = 120) -> dict[str, Any]:
        return wait_for(lambda: (h := self.health()).get("status") == want and h,
                        timeout=timeout, interval=0.5, what=what)

    def action(self, name: str) -> subprocess.CompletedProcess[str]:
        """The action as docs/gitops.md runs it."""
        return self.argo.cli("app", "actions", "run", APP, name, "--kind", "ModelDeployment",
                             "--resource-name", MODEL, "--namespace", self.namespace,
                             check=False)

    def md(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.cluster.kubectl(
            "-n", self.namespace, "get", "md", MODEL, "-o", "json").stdout)
        return result


@dataclass(frozen=True)
class Sample:
    at: float
    sync: str
    spurious: bool  # OutOfSync although the compared revision is the one already synced
    health: str


class Watch(threading.Thread):
    """Samples, all along the journey, the Application's sync status and the
    ModelDeployment's health as Argo CD shows them. OutOfSync is spurious when Argo CD has
    already synced the revision it compares against: Git did not change, so something in
    the cluster (the operator, an action) drifted from it."""

    def __init__(self, gitops: GitOps):
        super().__init__(daemon=True)
        self.gitops = gitops
        self.samples: list[Sample] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.3):
            proc = self.gitops.cluster.kubectl("-n", NAMESPACE, "get", "application", APP,
                                               "-o", "json", check=False)
            if proc.returncode != 0:
                continue
            status = json.loads(proc.stdout).get("status", {})
            sync = status.get("sync", {})
            operation = status.get("operationState") or {}
            # Compared after the last sync finished, against the revision that sync applied.
            compared_since_sync = (status.get("reconciledAt") or "") > (
                operation.get("finishedAt") or "~")
            spurious = (sync.get("status") == "OutOfSync" and compared_since_sync
                        and sync.get("revision") == (operation.get("syncResult") or {}).get(
                            "revision"))
            with contextlib.suppress(OSError, StopIteration, ValueError):
                health = self.gitops.health().get("status", "")
                self.samples.append(Sample(time.monotonic(), sync.get("status", ""),
                                           spurious, health))

    def health_since(self, since: float) -> list[str]:
        """The health statuses seen since ``since``, each change once."""
        seen: list[str] = []
        for sample in self.samples:
            if sample.at >= since and (not seen or seen[-1] != sample.health):
                seen.append(sample.health)
        return seen


def _docs_patch_command() -> list[str]:
    """The command docs/gitops.md gives for registering the customizations."""
    text = DOC.read_text()
    start = text.index("kubectl -n argocd patch configmap argocd-cm")
    command = ""
    for line in text[start:].splitlines():
        command += line.removesuffix("\\") + " "
        if not line.endswith("\\"):
            break
    return shlex.split(command)[1:]  # the test's kubectl stands in for "kubectl"


@pytest.fixture(scope="module")
def gitops(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GitOps]:
    from modelyard.operator.runner import OperatorThread

    state = tmp_path_factory.mktemp("argocd")
    with contextlib.ExitStack() as stack:
        cluster = stack.enter_context(real_pod_cluster(state))
        argo = stack.enter_context(LocalArgoCD(cluster, state_dir=state / "argocd"))
        git = stack.enter_context(GitServer(state / "git"))
        namespace = stack.enter_context(cluster.fresh_namespace("gitops"))
        # Register the health check and actions exactly as docs/gitops.md tells users.
        patched = subprocess.run(
            [str(cluster.binaries.path("kubectl")), f"--kubeconfig={cluster.kubeconfig}",
             *_docs_patch_command()], cwd=ROOT, capture_output=True, text=True, check=False)
        assert patched.returncode == 0, patched.stderr
        stack.enter_context(as_operator(cluster))
        stack.enter_context(OperatorThread())
        yield GitOps(cluster, argo, git, namespace, cluster.models_dir)


def test_argo_cd_registers_what_the_docs_show(gitops: GitOps) -> None:
    live = json.loads(gitops.cluster.kubectl("-n", NAMESPACE, "get", "configmap", "argocd-cm",
                                             "-o", "json").stdout)["data"]
    snippet = yaml.safe_load((ROOT / "argocd" / "argocd-cm.yaml").read_text())
    assert live == snippet["data"]
    shown = DOC.read_text()
    assert f"```yaml\n{(ROOT / 'argocd' / 'argocd-cm.yaml').read_text()}```" in shown


def test_the_gitops_journey_seen_from_argo_cd(gitops: GitOps) -> None:
    watch = Watch(gitops)
    watch.start()
    try:
        _first_sync(gitops)
        _version_bump_and_promote(gitops, watch)
        _bad_version_and_retry(gitops, watch)
        _abort(gitops)
    finally:
        watch.stop.set()
        watch.join()
    # 7. Never OutOfSync because of anything the operator or an action wrote, and each
    # commit synced once, nothing more (self-heal would have re-synced a drift).
    assert watch.samples
    assert [s for s in watch.samples if s.spurious] == []
    history = [h["revision"] for h in gitops.app()["status"].get("history", [])]
    assert history == gitops.commits, "a sync beyond one per commit means Argo CD saw drift"


def _first_sync(g: GitOps) -> None:
    """1. First sync: Synced, and Healthy once the model answers."""
    first = g.commit("1")
    g.cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump({
        "apiVersion": "argoproj.io/v1alpha1", "kind": "Application",
        "metadata": {"name": APP, "namespace": NAMESPACE},
        "spec": {"project": "default",
                 "source": {"repoURL": g.git.url, "targetRevision": "main", "path": APP},
                 "destination": {"server": "https://kubernetes.default.svc",
                                 "namespace": g.namespace},
                 "syncPolicy": {"automated": {"prune": True, "selfHeal": True}}},
    }))
    wait_for(lambda: g.synced_to(first), timeout=120, interval=1, what="first sync")
    healthy = g.wait_health("Healthy", "v1 Healthy")
    assert healthy["message"] == "version 1 serving, 1/1 replicas ready"
    _assert_no_diff(g, first)


def _version_bump_and_promote(g: GitOps, watch: Watch) -> None:
    """2. A version bump committed: Progressing while the canary starts; 3. Suspended at its
    manual step; 4. promoted through Argo CD's action: the rollout completes, Healthy."""
    bumped_at = time.monotonic()
    second = g.commit("2")
    wait_for(lambda: g.synced_to(second), timeout=60, interval=1, what="v2 synced")
    synced = time.monotonic() - bumped_at
    suspended = g.wait_health("Suspended", "v2 Suspended at its manual step")
    seen_suspended = time.monotonic() - bumped_at
    assert suspended["message"] == ("Canary of version 2 at 50% (step 1/1, paused): "
                                    "waiting for a manual promote")
    assert "Progressing" in watch.health_since(bumped_at), "Argo CD saw the canary start"
    assert g.app()["status"]["health"]["status"] == "Suspended"
    _assert_no_diff(g, second)

    promoted_at = time.monotonic()
    promote = g.action("promote")
    assert promote.returncode == 0, promote.stderr
    assert g.md()["metadata"]["annotations"]["modelyard.dev/promote"] == "2"
    healthy = g.wait_health("Healthy", "v2 Healthy after the promote")
    promote_to_healthy = time.monotonic() - promoted_at
    assert healthy["message"] == "version 2 serving, 1/1 replicas ready"
    assert g.md()["status"]["stableVersion"] == "2"
    _assert_no_diff(g, second)
    print(f"version bump seen by Argo CD: synced {synced:.1f} s and Suspended at the manual "
          f"step {seen_suspended:.1f} s after the commit; Healthy {promote_to_healthy:.1f} s "
          "after the promote action")


def _bad_version_and_retry(g: GitOps, watch: Watch) -> None:
    """5. A bad version committed (its checksum does not match the model): the operator
    rolls it back, Argo CD shows Degraded with our message; 6. retry through Argo CD's
    action: the canary runs again and is rolled back again."""
    model = g.models / "demo" / "1" / "model.pt"
    third = g.commit("3", sha256=hashlib.sha256(model.read_bytes() + b"!").hexdigest())
    wait_for(lambda: g.synced_to(third), timeout=60, interval=1, what="v3 synced")
    degraded = g.wait_health("Degraded", "v3 rolled back, Degraded", timeout=180)
    cond = next(c for c in g.md()["status"]["conditions"] if c["type"] == "Degraded")
    assert degraded["message"] == f"{cond['reason']}: {cond['message']}"
    assert degraded["message"].startswith(
        "RolledBack: version 3 was rolled back: its pods are failing (CrashLoopBackOff")
    assert g.app()["status"]["health"]["status"] == "Degraded"
    _assert_no_diff(g, third)

    refused = g.action("promote")  # a disabled action says why
    assert refused.returncode != 0
    assert "no canary in progress" in refused.stderr + refused.stdout
    retried_at = time.monotonic()
    retry = g.action("retry")
    assert retry.returncode == 0, retry.stderr

    def rolled_back_twice() -> bool:
        phases = [(v["version"], v["phase"]) for v in g.md()["status"]["versions"]]
        return phases[:3] == [("3", "RolledBack"), ("3", "RolledBack"), ("2", "Stable")]

    wait_for(rolled_back_twice, timeout=180, what="the retried canary rolled back again")
    g.wait_health("Degraded", "v3 Degraded again")
    assert "Progressing" in watch.health_since(retried_at), "Argo CD saw the retry run"
    _assert_no_diff(g, third)


def _abort(g: GitOps) -> None:
    """6. abort through Argo CD's action, at the manual step of a good version."""
    fourth = g.commit("4")
    wait_for(lambda: g.synced_to(fourth), timeout=60, interval=1, what="v4 synced")
    g.wait_health("Suspended", "v4 Suspended at its manual step")
    abort = g.action("abort")
    assert abort.returncode == 0, abort.stderr
    degraded = g.wait_health("Degraded", "v4 aborted")
    assert degraded["message"].startswith("RolledBack: version 4 was rolled back")
    assert "abort" in degraded["message"]
    _assert_no_diff(g, fourth)


def _assert_no_diff(g: GitOps, revision: str) -> None:
    """Synced with nothing to show in ``argocd app diff``, with the client-side diff (the
    default) and with server-side diff (the Application's compare option)."""
    for server_side in (False, True):
        if server_side:
            g.cluster.kubectl("-n", NAMESPACE, "annotate", "application", APP,
                              f"{COMPARE_OPTIONS}=ServerSideDiff=true", "--overwrite")
        try:
            app = g.app(refresh=True)
            how = "server-side" if server_side else "client-side"
            assert app["status"]["sync"] == {**app["status"]["sync"], "status": "Synced",
                                             "revision": revision}, how
            diff = g.argo.cli("app", "diff", APP, check=False)
            assert diff.returncode == 0, f"{how} diff:\n{diff.stdout}{diff.stderr}"
        finally:
            if server_side:
                g.cluster.kubectl("-n", NAMESPACE, "annotate", "application", APP,
                                  f"{COMPARE_OPTIONS}-")

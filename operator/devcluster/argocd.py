"""Build real Argo CD from its pinned release, and run it as local processes on a cluster.

Argo CD ships one binary, ``argocd``, that is the CLI or one of its servers depending on the
name it is called by (``cmd/main.go``: ``argocd-application-controller``,
``argocd-repo-server``, ``argocd-server``...). It is built like the cluster's own binaries
(:mod:`.binaries`): through the Go module proxy only, once, into
``<cache>/argocd-v<version>/``, under the same file lock and atomic rename. Argo CD's go.mod
carries ``replace`` lines for the ``k8s.io/*`` staging modules and one for its own
``gitops-engine`` folder, so ``go install`` refuses it; the wrapper module ``argocd-gomod/``
repeats those replace lines (the gitops-engine one pointing at that module's published
release of the same version) and its committed ``go.sum`` pins every byte. The release needs
Go 1.27, which the go command fetches from the module proxy as the approved toolchain
(``GOTOOLCHAIN``). The build runs at the lowest priority, one package at a time, so the
machine's two cores stay usable. Argo CD's own CRDs are copied from the very module source
that was built (``manifests/crds``).

:class:`LocalArgoCD` runs Redis (Debian's ``redis-server``), the repo server, the application
controller and the API server as local processes against a :class:`.LocalCluster`, the way
Argo CD's own development setup does (its ``Procfile``: ``ARGOCD_FAKE_IN_CLUSTER``), with
every Argo CD setting at its default. ``tests/cluster/test_gitops.py`` is the caller;
``python -m modelyard.operator.devcluster.argocd`` builds it now and prints where.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from .binaries import BuildError, _json_field, cached_build, run_tool
from .ports import release_port, reserve_port

if TYPE_CHECKING:
    from .cluster import LocalCluster

ARGOCD_VERSION = "3.6.1"
ARGOCD_MODULE = "github.com/argoproj/argo-cd/v3"
# Argo CD 3.6's go.mod says `go 1.27.0`; the go command takes this approved toolchain from
# the module proxy (about 76 MB, once per machine).
GO_TOOLCHAIN = "go1.27.3"
NAMESPACE = "argocd"
# The names cmd/main.go dispatches on; each is a link to the one binary.
SERVERS = ("argocd-application-controller", "argocd-repo-server", "argocd-server")
CRDS = ("application-crd.yaml", "appproject-crd.yaml")
# The helper scripts Argo CD's image puts beside the binary (its Dockerfile): the repo server
# runs git-verify-wrapper.sh on every revision it checks out.
SCRIPTS = ("git-verify-wrapper.sh", "gpg-wrapper.sh")
LOOPBACK = "127.0.0.1"
_STOP_GRACE_S = 10


class ArgoCDStartError(RuntimeError):
    """A component did not come up; the message carries its log's tail."""


@dataclass(frozen=True)
class ArgoCD:
    """A built Argo CD: ``bin/argocd`` (and its server names, and the scripts its image
    carries beside it), ``crds/``."""

    root: Path

    @property
    def cli(self) -> Path:
        return self.root / "bin" / "argocd"

    def path(self, name: str) -> Path:
        return self.root / "bin" / name

    @property
    def crds(self) -> list[Path]:
        return [self.root / "crds" / name for name in CRDS]

    def is_complete(self) -> bool:
        return self.cli.is_file() and all(self.path(n).exists() for n in (*SERVERS, *SCRIPTS)) \
            and all(p.is_file() for p in self.crds)


def version_key() -> str:
    return f"argocd-v{ARGOCD_VERSION}"


def ensure_argocd(root: Path | None = None) -> ArgoCD:
    """Return the cached Argo CD, building it first when missing (safe across processes)."""
    built = cached_build(f"Argo CD v{ARGOCD_VERSION}", version_key(),
                         lambda path: ArgoCD(path).is_complete(),
                         lambda go, out, work: _build(go, work, ArgoCD(out)), root=root)
    return ArgoCD(built)


def ldflags() -> str:
    """What Argo CD's Makefile stamps into ``common`` (its version, the kubectl it embeds)."""
    common = f"{ARGOCD_MODULE}/common"
    return " ".join([
        "-s -w", f"-X {common}.version={ARGOCD_VERSION}", f"-X {common}.gitTag=v{ARGOCD_VERSION}",
        f"-X {common}.gitTreeState=clean", f"-X {common}.kubectlVersion=v0.37.0",
    ])


def _build(go: str, workdir: Path, out: ArgoCD) -> None:
    out.cli.parent.mkdir(parents=True, exist_ok=True)
    module = workdir / "argocd-gomod"
    module.mkdir()
    for name in ("go.mod", "go.sum", "tools.go"):
        source = resources.files("modelyard.operator.devcluster").joinpath("argocd-gomod", name)
        (module / name).write_bytes(source.read_bytes())
    # Every core, at normal priority: it runs in `make test`'s set-up, before any test, with
    # nothing else to share the machine with (like the Kubernetes build).
    env = {**os.environ, "GOTOOLCHAIN": GO_TOOLCHAIN, "CGO_ENABLED": "0",
           "GOFLAGS": "-mod=readonly -buildvcs=false"}
    run_tool([go, "build", "-trimpath", f"-ldflags={ldflags()}", "-o", str(out.cli),
              f"{ARGOCD_MODULE}/cmd"], cwd=module, env=env)
    for name in SERVERS:
        out.path(name).symlink_to("argocd")
    listing = run_tool([go, "list", "-m", "-json", ARGOCD_MODULE], cwd=module, env=env)
    source = Path(_json_field(listing, "Dir"))
    for name in SCRIPTS:
        shutil.copyfile(source / "hack" / name, out.path(name))
        out.path(name).chmod(0o755)
    (out.root / "crds").mkdir()
    for name in CRDS:
        shutil.copyfile(source / "manifests" / "crds" / name, out.root / "crds" / name)


# ------------------------------------------------------------------------------ running


@dataclass
class _Process:
    name: str
    argv: list[str]
    env: dict[str, str]
    port: int
    popen: subprocess.Popen[bytes] | None = None
    log: Path = field(default_factory=Path)


class LocalArgoCD:
    """Redis, the repo server, the application controller and the API server of a built
    Argo CD, as local processes managing ``cluster`` (its in-cluster destination), with
    every setting at Argo CD's default. The API server runs without authentication on
    loopback; :meth:`cli` is the ``argocd`` CLI pointed at it."""

    def __init__(self, cluster: LocalCluster, argocd: ArgoCD | None = None,
                 state_dir: Path | None = None):
        self.cluster = cluster
        self.argocd = argocd or ensure_argocd()
        self.state = state_dir or Path(tempfile.mkdtemp(prefix="modelyard-argocd-"))
        self._processes: list[_Process] = []

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    @property
    def api_port(self) -> int:
        return next(p.port for p in self._processes if p.name == "argocd-server")

    def install(self) -> None:
        """Argo CD's CRDs (its own files) and the objects its install manifest creates
        empty: the ``argocd`` namespace, ``argocd-cm``, ``argocd-secret``, ``argocd-rbac-cm``."""
        for crd in self.argocd.crds:
            self.cluster.kubectl("apply", "--server-side", "-f", str(crd))
        for name in ("applications.argoproj.io", "appprojects.argoproj.io"):
            self._await_established(name)
        labels = {"app.kubernetes.io/part-of": "argocd"}
        objects: list[dict[str, Any]] = [
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}]
        for kind, name in (("ConfigMap", "argocd-cm"), ("Secret", "argocd-secret"),
                           ("ConfigMap", "argocd-rbac-cm")):
            objects.append({"apiVersion": "v1", "kind": kind, "metadata": {
                "name": name, "namespace": NAMESPACE,
                "labels": {**labels, "app.kubernetes.io/name": name}}})
        self.cluster.kubectl("apply", "-f", "-",
                             input=json.dumps({"apiVersion": "v1", "kind": "List",
                                               "items": objects}))

    def _await_established(self, crd: str, timeout: float = 60) -> None:
        """Until the API server serves ``crd`` (``kubectl wait`` gives up at once while a
        CRD this large has no conditions yet)."""
        deadline = time.monotonic() + timeout
        conditions: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            got = self.cluster.kubectl("get", "crd", crd, "-o", "json", check=False)
            if got.returncode == 0:
                conditions = json.loads(got.stdout).get("status", {}).get("conditions") or []
                if any(c["type"] == "Established" and c["status"] == "True"
                       for c in conditions):
                    return
            time.sleep(0.5)
        raise ArgoCDStartError(f"CRD {crd} not established within {timeout:.0f} s: "
                               f"{conditions}")

    def start(self) -> None:
        self.install()
        for sub in ("tls", "ssh", "gpg/keys", "gpg/source", "tmp", "home"):
            (self.state / sub).mkdir(parents=True, exist_ok=True)
        redis = shutil.which("redis-server")
        if redis is None:
            raise ArgoCDStartError("redis-server is missing: scripts/bootstrap installs "
                                   "Debian's redis-server (scripts/system-packages.txt)")
        try:
            redis_port = self._launch("redis", [
                redis, "--bind", LOOPBACK, "--port", "{port}", "--save", "",
                "--appendonly", "no", "--dir", str(self.state)], {})
            redis_addr = f"{LOOPBACK}:{redis_port}"
            common = ["--namespace", NAMESPACE, "--kubeconfig", str(self.cluster.kubeconfig),
                      "--redis", redis_addr, "--loglevel", "info"]
            repo_port = self._launch("argocd-repo-server", [
                str(self.argocd.path("argocd-repo-server")), "--port", "{port}",
                "--address", LOOPBACK, "--metrics-address", LOOPBACK,
                "--metrics-port", str(self._spare_port()), "--redis", redis_addr,
                "--loglevel", "info"], {
                    "ARGOCD_GPG_ENABLED": "false",
                    "ARGOCD_GNUPGHOME": str(self.state / "gpg/keys"),
                    "ARGOCD_GPG_DATA_PATH": str(self.state / "gpg/source"),
                })
            repo_addr = f"{LOOPBACK}:{repo_port}"
            self._launch("argocd-application-controller", [
                str(self.argocd.path("argocd-application-controller")), *common,
                "--repo-server", repo_addr, "--metrics-port", "{port}"], {})
            self._launch("argocd-server", [
                str(self.argocd.path("argocd-server")), *common, "--repo-server", repo_addr,
                "--port", "{port}", "--address", LOOPBACK, "--insecure", "--disable-auth",
                "--metrics-address", LOOPBACK, "--metrics-port", str(self._spare_port())], {})
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for process in reversed(self._processes):
            popen = process.popen
            if popen is not None and popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(popen.pid, signal.SIGTERM)
                try:
                    popen.wait(timeout=_STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(popen.pid, signal.SIGKILL)
                    popen.wait(timeout=_STOP_GRACE_S)
            release_port(process.port)
        self._processes = []

    def cli(self, *args: str, check: bool = True, timeout: float = 60,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """``argocd ARGS`` against the local API server, as a user's terminal would run it."""
        proc = subprocess.run(
            [str(self.argocd.cli), "--server", f"{LOOPBACK}:{self.api_port}", "--plaintext",
             *args], input=input, capture_output=True, text=True, check=False,
            timeout=timeout, env={**self._env(), "ARGOCD_BINARY_NAME": "argocd"})
        if check and proc.returncode != 0:
            raise subprocess.CalledProcessError(proc.returncode, proc.args, proc.stdout,
                                                proc.stderr)
        return proc

    def admin(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """``argocd admin ARGS`` (offline commands: no server needed)."""
        return subprocess.run([str(self.argocd.cli), "admin", *args], capture_output=True,
                              text=True, check=False, timeout=timeout, env=self._env())

    def log_tail(self, name: str, lines: int = 40) -> str:
        log = self.state / f"{name}.log"
        if not log.exists():
            return "(no log)"
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])

    # -- start-up -----------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        path = f"{self.argocd.cli.parent}{os.pathsep}{os.environ.get('PATH', os.defpath)}"
        return {**os.environ, "PATH": path, "KUBECONFIG": str(self.cluster.kubeconfig),
                "HOME": str(self.state / "home"), "TMPDIR": str(self.state / "tmp"),
                "ARGOCD_FAKE_IN_CLUSTER": "true",
                "ARGOCD_TLS_DATA_PATH": str(self.state / "tls"),
                "ARGOCD_SSH_DATA_PATH": str(self.state / "ssh")}

    def _spare_port(self) -> int:
        """A port for a listener we never call (metrics), held until :meth:`stop`."""
        port = reserve_port()
        self._processes.append(_Process(f"port-{port}", [], {}, port))
        return port

    def _launch(self, name: str, argv: list[str], env: dict[str, str]) -> int:
        port = reserve_port()
        process = _Process(name, [a.replace("{port}", str(port)) for a in argv],
                           {**self._env(), **env}, port, log=self.state / f"{name}.log")
        self._processes.append(process)
        with process.log.open("wb") as out:
            process.popen = subprocess.Popen(
                process.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, cwd=self.state, env=process.env)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if process.popen.poll() is not None:
                raise ArgoCDStartError(f"{name} exited ({process.popen.returncode}):\n"
                                       f"{self.log_tail(name)}")
            with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), 1):
                return port
            time.sleep(0.2)
        raise ArgoCDStartError(f"{name} did not listen on {port} within 120 s:\n"
                               f"{self.log_tail(name)}")


def _main() -> int:
    try:
        print(ensure_argocd().root)
    except BuildError as error:
        print(error)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())

"""A real Kubernetes control plane on loopback, with kwok-simulated GPU nodes.

:class:`LocalCluster` starts etcd, kube-apiserver, kube-controller-manager,
kube-scheduler and kwok as child processes (each in its own process group, logging
to ``<data_dir>/logs/<component>.log``), waits for each to report healthy, creates
the nodes of the topology and waits for them to be Ready. Scheduling, garbage
collection, Deployment rollouts, EndpointSlices and RBAC are the real upstream code;
only the kubelet is simulated. Pods get addresses of a private pod network
(:mod:`.podnet`) that only this machine can reach, so Services get real endpoints and
a real process can serve a pod's address.

Failures are loud: if a component exits or does not become healthy, start()
stops whatever it had started and raises :class:`ClusterStartError` naming the
component with the tail of its log. stop() terminates every process group
(SIGTERM, then SIGKILL), so no process or port is left behind, and removes the
data directory unless asked to keep it.

Used by the pytest fixture in ``tests/conftest.py`` and by ``modelyard dev``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import yaml

from .binaries import Binaries, ensure_binaries
from .images import Image, Images
from .nodeartefacts import NodeArtefacts
from .pki import ADMIN_USER, OPERATOR_USER, Pki, create_pki
from .podnet import PodNetwork
from .ports import release_port, reserve_port
from .realnode import RealNode
from .stages import real_pod_stages
from .topology import DEFAULT_TOPOLOGY, NodePool, node_manifests

SERVICE_CIDR = "10.96.0.0/16"  # virtual ClusterIPs: allocated, never routed or contacted
SERVICE_IP = "10.96.0.1"
LOOPBACK = "127.0.0.1"
_STOP_GRACE_S = 10.0


# Log who wrote what (not reads, not bodies): enough to count an operator's writes.
_AUDIT_POLICY = """\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: Metadata
  verbs: [create, update, patch, delete, deletecollection]
- level: None
"""


class KubectlError(subprocess.CalledProcessError):
    """kubectl failed; unlike its base class, the message says why."""

    def __str__(self) -> str:
        return f"{super().__str__()}\n{(self.stderr or '').strip()[-2000:]}"


class ClusterStartError(RuntimeError):
    """A component did not come up; the message holds its name and log tail."""


@dataclass
class _Component:
    name: str
    argv: list[str]
    health: Callable[[], bool]
    process: subprocess.Popen[bytes] | None = None
    log: Path | None = None


@dataclass
class ClusterConfig:
    """What to start. ``data_dir=None`` means a fresh temporary directory."""

    topology: Sequence[NodePool] = DEFAULT_TOPOLOGY
    data_dir: Path | None = None
    keep_data: bool = False
    start_timeout_s: float = 90.0
    # Runtime pods start unready; a process supervisor (pods.PodProcesses) makes them Ready
    # when their real runtime answers. Otherwise kwok makes every pod Ready at once.
    real_pods: bool = False
    # Install the Gateway API's standard CRDs (HTTPRoute, Gateway, ...), as a cluster with a
    # Gateway API implementation has them.
    gateway_api: bool = False
    # Real nodes (containerd + kubelet + kube-proxy, :mod:`.realnode`) beside the kwok ones,
    # labelled modelyard.dev/node=real, running the images `modelyard build-node` built.
    real_nodes: int = 0
    extra_apiserver_args: list[str] = field(default_factory=list)


class LocalCluster:
    """A running local control plane. Use as a context manager or start()/stop()."""

    def __init__(self, config: ClusterConfig | None = None, binaries: Binaries | None = None):
        self.config = config or ClusterConfig()
        self._binaries = binaries
        self._owns_dir = self.config.data_dir is None
        self.data_dir = self.config.data_dir or Path(tempfile.mkdtemp(prefix="modelyard-cluster-"))
        self._components: list[_Component] = []
        self.ports: dict[str, int] = {}
        self.started_in_s: float | None = None
        self.pod_network: PodNetwork | None = None
        self.real_nodes: list[RealNode] = []
        self.real_node_images: Images | None = None  # what the real nodes have imported
        self._node_artefacts: NodeArtefacts | None = None

    # -- public surface -------------------------------------------------------------

    @property
    def kubeconfig(self) -> Path:
        return self.data_dir / "kubeconfig"

    @property
    def operator_kubeconfig(self) -> Path:
        """Credentials of user ``modelyard-operator``: run a local operator with these."""
        return self.data_dir / "operator.kubeconfig"

    @property
    def audit_log(self) -> Path:
        """Every write request the API server served, one JSON object per line."""
        return self.data_dir / "audit.log"

    def writes_by(self, username: str, since: float = 0.0) -> list[dict[str, Any]]:
        """Write requests (create/update/patch/delete) by ``username`` after ``since``."""
        if not self.audit_log.exists():
            return []
        found = []
        with self.audit_log.open() as handle:
            for line in handle:
                entry = json.loads(line)
                if entry.get("user", {}).get("username") != username:
                    continue
                stamp = dt.datetime.fromisoformat(entry["stageTimestamp"]).timestamp()
                if stamp >= since:
                    found.append(entry)
        return found

    @property
    def server(self) -> str:
        return f"https://{LOOPBACK}:{self.ports['apiserver']}"

    @property
    def binaries(self) -> Binaries:
        if self._binaries is None:
            self._binaries = ensure_binaries()
        return self._binaries

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        binaries = self.binaries  # may build: not part of the start time
        started = time.monotonic()
        try:
            self._start(binaries)
        except ClusterStartError as exc:
            # Our ports are reserved (``ports``), but a process we don't know of may still
            # bind one with a fixed number: start again, on other ports, once.
            if "address already in use" not in str(exc):
                raise
            self._start(binaries)
        self.started_in_s = time.monotonic() - started

    def _start(self, binaries: Binaries) -> None:
        if self.data_dir.exists() and any(self.data_dir.iterdir()):
            shutil.rmtree(self.data_dir)  # a previous run's etcd would hold stale state
        (self.data_dir / "logs").mkdir(parents=True, exist_ok=True)
        self.ports = {name: reserve_port() for name in
                      ("etcd", "etcd-peer", "apiserver", "controller-manager", "scheduler", "kwok")}
        pki = create_pki(self.data_dir / "pki", SERVICE_IP)
        self._write_kubeconfig(self.kubeconfig, pki.admin_cert, pki.admin_key, ADMIN_USER)
        self._write_kubeconfig(self.operator_kubeconfig, pki.operator_cert, pki.operator_key,
                               OPERATOR_USER)
        (self.data_dir / "audit-policy.yaml").write_text(_AUDIT_POLICY)
        stages = binaries.kwok_stages.read_text()
        if self.config.real_pods:
            stages = real_pod_stages(stages)
        (self.data_dir / "kwok-stages.yaml").write_text(stages)
        try:
            self.pod_network = PodNetwork.create()
            for component in self._plan(binaries, pki, self.pod_network):
                self._launch(component)
                self._await_healthy(component)
            self._create_nodes()
            if self.config.gateway_api:
                self._install_gateway_api()
            self._start_real_nodes()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop every component (newest first), the pod network and the data directory."""
        for node in reversed(self.real_nodes):
            node.stop()
        self.real_nodes.clear()
        for component in reversed(self._components):
            _terminate(component.process)
        self._components.clear()
        if self.pod_network is not None:
            self.pod_network.delete()
            self.pod_network = None
        for port in self.ports.values():
            release_port(port)
        self.ports = {}
        if not self.config.keep_data:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    # -- what every user of a local cluster (the CLI, the tests, the benchmarks) does ------

    def install_crd(self, manifest: str | None = None) -> None:
        """Apply the ModelDeployment CRD (default: generated from the API models; the tests
        pass the committed file) and wait until it is served."""
        from ..crd import CRD_FILE, render_yaml

        proc = self.kubectl("apply", "--server-side", "-f", "-",
                            input=manifest if manifest is not None else render_yaml(),
                            check=False)
        if proc.returncode != 0:
            raise ClusterStartError(f"installing the CRD failed: {proc.stderr.strip()}")
        # Polled, not `kubectl wait`: on a loaded machine the API server's establishing
        # controller can take longer than a single wait's budget right after its start.
        name, deadline, conditions = CRD_FILE[:-5], time.monotonic() + 120, ""
        while time.monotonic() < deadline:
            got = self.kubectl("get", "crd", name, "-o", "json", check=False)
            if got.returncode != 0:
                conditions = got.stderr.strip()
            else:
                found = json.loads(got.stdout).get("status", {}).get("conditions") or []
                conditions = json.dumps(found)
                if any(c.get("type") == "Established" and c.get("status") == "True"
                       for c in found):
                    return
            time.sleep(0.5)
        raise ClusterStartError(f"the CRD {name} was not Established within 120 s: "
                                f"{conditions}\n{self.log_tail('kube-apiserver')}")

    @contextlib.contextmanager
    def fresh_namespace(self, prefix: str = "t") -> Iterator[str]:
        """A new namespace, ready for pods (its default ServiceAccount exists), deleted after."""
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        self.kubectl("create", "namespace", name)
        self.kubectl("wait", "--for=create", "serviceaccount/default", "-n", name,
                     "--timeout=30s")
        try:
            yield name
        finally:
            self.kubectl("delete", "namespace", name, "--wait=false", check=False)

    @contextlib.contextmanager
    def as_operator(self) -> Iterator[str]:
        """Point in-process operators (``$KUBECONFIG``) at this cluster, under the operator's
        own user (so the audit log can count its writes); yields that user name."""
        previous = os.environ.get("KUBECONFIG")
        os.environ["KUBECONFIG"] = str(self.operator_kubeconfig)
        try:
            yield OPERATOR_USER
        finally:
            if previous is None:
                os.environ.pop("KUBECONFIG", None)
            else:
                os.environ["KUBECONFIG"] = previous

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run the pinned kubectl against this cluster; with ``check``, a failure raises
        :class:`KubectlError`, whose message ends with kubectl's own error."""
        proc = subprocess.run(
            [str(self.binaries.path("kubectl")), f"--kubeconfig={self.kubeconfig}", *args],
            input=input, capture_output=True, text=True, check=False, timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise KubectlError(proc.returncode, proc.args, proc.stdout, proc.stderr)
        return proc

    def env(self) -> dict[str, str]:
        """Environment for a child process that should talk to this cluster."""
        path = f"{self.binaries.bin}{os.pathsep}{os.environ.get('PATH', '')}"
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig), "PATH": path}

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.data_dir / "logs" / f"{name}.log"
        if not path.exists():
            return "(no log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    # -- start-up -------------------------------------------------------------------

    def _plan(self, b: Binaries, pki: Pki, pods: PodNetwork) -> list[_Component]:
        p = self.ports
        kc = str(self.kubeconfig)
        data = self.data_dir
        etcd = _Component("etcd", [
            str(b.path("etcd")), "--name=local", f"--data-dir={data / 'etcd'}",
            f"--listen-client-urls=http://{LOOPBACK}:{p['etcd']}",
            f"--advertise-client-urls=http://{LOOPBACK}:{p['etcd']}",
            f"--listen-peer-urls=http://{LOOPBACK}:{p['etcd-peer']}",
            f"--initial-advertise-peer-urls=http://{LOOPBACK}:{p['etcd-peer']}",
            f"--initial-cluster=local=http://{LOOPBACK}:{p['etcd-peer']}",
            "--unsafe-no-fsync", "--quota-backend-bytes=2147483648", "--log-level=warn",
        ], health=lambda: _http_ok(f"http://{LOOPBACK}:{p['etcd']}/health"))
        apiserver = _Component("kube-apiserver", [
            str(b.path("kube-apiserver")),
            f"--etcd-servers=http://{LOOPBACK}:{p['etcd']}",
            f"--bind-address={LOOPBACK}", f"--advertise-address={LOOPBACK}",
            f"--secure-port={p['apiserver']}",
            f"--cert-dir={data / 'pki'}",
            f"--tls-cert-file={pki.serving_cert}", f"--tls-private-key-file={pki.serving_key}",
            f"--client-ca-file={pki.ca_cert}",
            f"--service-account-key-file={pki.sa_pub}",
            f"--service-account-signing-key-file={pki.sa_key}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--authorization-mode=Node,RBAC",
            "--allow-privileged=true",
            "--kubelet-preferred-address-types=InternalIP",
            "--endpoint-reconciler-type=none",
            f"--audit-policy-file={data / 'audit-policy.yaml'}",
            f"--audit-log-path={self.audit_log}", "--audit-log-format=json",
            "--audit-log-maxsize=200", "--audit-log-maxbackup=1",
            *self.config.extra_apiserver_args,
        ], health=lambda: self._apiserver_ready(pki))
        controller_manager = _Component("kube-controller-manager", [
            str(b.path("kube-controller-manager")),
            f"--kubeconfig={kc}", f"--authentication-kubeconfig={kc}",
            f"--authorization-kubeconfig={kc}",
            f"--bind-address={LOOPBACK}", f"--secure-port={p['controller-manager']}",
            f"--cert-dir={data / 'controller-manager'}",
            "--leader-elect=false",
            f"--service-account-private-key-file={pki.sa_key}",
            f"--root-ca-file={pki.ca_cert}",
            "--use-service-account-credentials=true",
            "--concurrent-gc-syncs=20", "--concurrent-deployment-syncs=10",
            "--concurrent-replicaset-syncs=10",
        ], health=lambda: _http_ok(f"https://{LOOPBACK}:{p['controller-manager']}/healthz"))
        scheduler = _Component("kube-scheduler", [
            str(b.path("kube-scheduler")),
            f"--kubeconfig={kc}", f"--authentication-kubeconfig={kc}",
            f"--authorization-kubeconfig={kc}",
            f"--bind-address={LOOPBACK}", f"--secure-port={p['scheduler']}",
            f"--cert-dir={data / 'scheduler'}",
            "--leader-elect=false",
        ], health=lambda: _http_ok(f"https://{LOOPBACK}:{p['scheduler']}/healthz"))
        kwok = _Component("kwok", [
            str(b.path("kwok")), f"--kubeconfig={kc}", f"--config={data / 'kwok-stages.yaml'}",
            "--manage-all-nodes=false",
            "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
            f"--node-ip={LOOPBACK}", f"--node-port={p['kwok']}",
            f"--server-address={LOOPBACK}:{p['kwok']}",
            f"--cidr={pods.spare_cidr}",  # only used for nodes without a podCIDR
            # The heartbeat stage refreshes node status only every ~10 minutes and relies on
            # node Leases, which kwok renews only when given a lease duration. Without one,
            # nodes expire after the controller-manager's grace period and their pods turn
            # unready.
            "--node-lease-duration-seconds=40",
        ], health=lambda: _http_ok(f"http://{LOOPBACK}:{p['kwok']}/healthz"))
        return [etcd, apiserver, controller_manager, scheduler, kwok]

    def _launch(self, component: _Component) -> None:
        component.log = self.data_dir / "logs" / f"{component.name}.log"
        with component.log.open("wb") as log:
            component.process = subprocess.Popen(
                component.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, cwd=self.data_dir,
            )
        self._components.append(component)

    def _await_healthy(self, component: _Component) -> None:
        deadline = time.monotonic() + self.config.start_timeout_s
        assert component.process is not None
        while time.monotonic() < deadline:
            code = component.process.poll()
            if code is not None:
                raise ClusterStartError(
                    f"{component.name} exited with code {code} while starting; "
                    f"its log ({component.log}):\n{self.log_tail(component.name)}"
                )
            if component.health():
                return
            time.sleep(0.1)
        raise ClusterStartError(
            f"{component.name} did not become healthy within {self.config.start_timeout_s:.0f} s; "
            f"its log ({component.log}):\n{self.log_tail(component.name)}"
        )

    def _apiserver_ready(self, pki: Pki) -> bool:
        context = ssl.create_default_context(cafile=str(pki.ca_cert))
        context.load_cert_chain(str(pki.admin_cert), str(pki.admin_key))
        return _http_ok(f"{self.server}/readyz", context=context)

    def _create_nodes(self) -> None:
        assert self.pod_network is not None
        nodes = node_manifests(self.config.topology, self.pod_network.node_cidr)
        if not nodes:
            return
        manifest = yaml.safe_dump_all(nodes)
        self._kubectl_or_fail("create", "-f", "-", input=manifest)
        self._kubectl_or_fail("wait", "--for=condition=Ready", "node", "--all", "--timeout=60s")
        # Pods cannot be created in a namespace before its default ServiceAccount exists.
        self._kubectl_or_fail("wait", "--for=create", "serviceaccount/default",
                              "--namespace=default", "--timeout=60s")

    def add_real_node(self, name: str, images: Sequence[Image] | None = None) -> RealNode:
        """Start one more real node (``images`` default: all that `modelyard build-node`
        built) and wait until it is Ready; :meth:`stop` stops it with the rest."""
        from .nodeartefacts import find_node_artefacts

        # Looked up once: the images a running cluster's nodes hold stay those it started
        # with, even if the source tree changes meanwhile.
        found = self._node_artefacts = self._node_artefacts or find_node_artefacts()
        self.real_node_images = found.images
        node = RealNode(name, self.data_dir / "nodes" / name, binaries=found.binaries,
                        tools=found.tools, pki=Pki(self.data_dir / "pki"),
                        apiserver_port=self.ports["apiserver"], service_cidr=SERVICE_CIDR)
        self.real_nodes.append(node)
        kubectl = [str(self.binaries.path("kubectl")), f"--kubeconfig={self.kubeconfig}"]
        node.start(found.images.all() if images is None else images, kubectl)
        return node

    def _start_real_nodes(self) -> None:
        if not self.config.real_nodes:
            return
        for index in range(self.config.real_nodes):
            self.add_real_node(f"real-{index}")
        # In-cluster clients (the chart's operator) reach the API server through the
        # `kubernetes` Service; with no endpoint reconciler, point it at the first node's
        # forwarder (the API server's certificate names the Service's address).
        self._kubectl_or_fail("apply", "-f", "-", input=self.real_nodes[0].api_endpoints())

    def _install_gateway_api(self) -> None:
        from .gateway import ensure_gateway_crds

        for manifest in ensure_gateway_crds():
            self._kubectl_or_fail("apply", "--server-side", "-f", str(manifest))
        self._kubectl_or_fail("wait", "--for=condition=Established", "--timeout=60s",
                              "crd/httproutes.gateway.networking.k8s.io")

    def _kubectl_or_fail(self, *args: str, input: str | None = None) -> str:
        proc = self.kubectl(*args, input=input, check=False, timeout=90)
        if proc.returncode != 0:
            logs = "\n".join(f"--- {c.name} ---\n{self.log_tail(c.name, 15)}"
                             for c in self._components)
            raise ClusterStartError(f"kubectl {' '.join(args)} failed: {proc.stderr}\n{logs}")
        return proc.stdout

    def _write_kubeconfig(self, path: Path, cert: Path, key: Path, user: str) -> None:
        import base64

        def b64(path: Path) -> str:
            return base64.b64encode(path.read_bytes()).decode()

        config: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "modelyard-local", "cluster": {
                "server": self.server,
                "certificate-authority-data": b64(self.data_dir / "pki" / "ca.crt")}}],
            "users": [{"name": user, "user": {
                "client-certificate-data": b64(cert), "client-key-data": b64(key)}}],
            "contexts": [{"name": "modelyard-local", "context": {
                "cluster": "modelyard-local", "user": user}}],
            "current-context": "modelyard-local",
        }
        path.write_text(json.dumps(config, indent=2))
        path.chmod(0o600)


def _http_ok(url: str, context: ssl.SSLContext | None = None) -> bool:
    if context is None and url.startswith("https"):
        context = ssl._create_unverified_context()  # health endpoints of self-signed servers
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError, ssl.SSLError):
        return False


def _terminate(process: subprocess.Popen[bytes] | None) -> None:
    if process is None or process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=_STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=_STOP_GRACE_S)

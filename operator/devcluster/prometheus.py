"""A real Prometheus server for the local cluster, discovering runtime pods like a cluster's own.

:class:`LocalPrometheus` starts a ``prometheus`` binary on a free loopback port, with its
time series database in a fresh directory, and waits for ``/-/ready``. Which binary:

* Debian's package (``scripts/bootstrap`` installs it) is built without Kubernetes
  service discovery, so for discovery :func:`ensure_prometheus` compiles the pinned
  upstream release once through the Go module proxy, with only the Kubernetes
  discoverer (build tags ``remove_all_sd,enable_kubernetes_sd``), and caches it under
  ``~/.cache/modelyard/`` next to the cluster's binaries (3.5 CPU-minutes, 9 minutes on a
  busy 2-core machine);
* static targets alone run Debian's binary when it is on ``PATH``, the built one
  otherwise; ``PrometheusConfig.binary`` overrides both.

Two ways to find what to scrape:

* **Kubernetes service discovery** against a :class:`~.cluster.LocalCluster`'s real
  API server (``kubernetes_sd_configs``, role ``pod``), authenticated by a client
  certificate of its own, ``modelyard-prometheus``, whose ClusterRole may only
  get/list/watch pods: the least privilege a cluster's Prometheus needs. Relabelling
  keeps the running pods carrying ``modelyard.dev/model-deployment`` with an address,
  scrapes their container port named ``http`` on the pod IP, and gives every series
  the target labels ``namespace``, ``pod``, ``model_deployment`` and ``version`` (the
  pod's ``modelyard.dev/version``; the runtime's own ``version`` label holds the same
  value and is dropped rather than kept as ``exported_version``).
* **static targets** (``host:port`` lists with labels of your choice) for runtime-only
  tests and benchmarks without a cluster.

Failures are loud, as in :mod:`.cluster`: if the server exits or is not ready in time,
start() stops it and raises :class:`PrometheusStartError` with the tail of its log.
stop() ends its process group (SIGTERM, then SIGKILL) and removes the data directory
unless asked to keep it. Used by ``tests/cluster/test_prometheus.py``; the queries are
:mod:`modelyard.operator.promql`'s.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..render import MODEL_LABEL, VERSION_LABEL
from .binaries import _run, cached_build
from .cluster import LocalCluster
from .ports import release_port, reserve_port

log = logging.getLogger(__name__)

PROMETHEUS_VERSION = "3.16.0"  # published as the Go module version v0.316.0
_MODULE = "github.com/prometheus/prometheus"
LOOPBACK = "127.0.0.1"
PORT_NAME = "http"  # the runtime container's port, as render.py names it
JOB = "modelyard-runtime"
USER = "modelyard-prometheus"
_STOP_GRACE_S = 10.0

# RBAC of the discovery identity: read pods, nothing else.
_RBAC = """\
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: modelyard-prometheus}
rules:
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: modelyard-prometheus}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: modelyard-prometheus}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: modelyard-prometheus}
"""


class PrometheusStartError(RuntimeError):
    """Prometheus did not come up; the message holds why and its log tail."""


@dataclass(frozen=True)
class StaticTargets:
    """``host:port`` targets scraped without discovery, each series given ``labels``."""

    targets: Sequence[str]
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass
class PrometheusConfig:
    """How to run it. ``data_dir=None`` means a fresh temporary directory."""

    scrape_interval_s: float = 15.0
    data_dir: Path | None = None
    keep_data: bool = False
    start_timeout_s: float = 60.0
    retention: str = "1d"
    binary: str | None = None  # a path or command name; None: see the module docstring
    namespaces: Sequence[str] = ()  # discovery limited to these; empty = every namespace


@dataclass(frozen=True)
class Discovery:
    """Where and as whom Kubernetes service discovery connects."""

    api_server: str
    ca_file: Path
    cert_file: Path
    key_file: Path


def _duration(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


def scrape_config(
    config: PrometheusConfig, discovery: Discovery | None, static: Sequence[StaticTargets],
) -> dict[str, Any]:
    """The ``prometheus.yml`` content (pure, so the relabelling can be read and tested)."""
    interval = _duration(config.scrape_interval_s)
    jobs: list[dict[str, Any]] = []
    if discovery is not None:
        sd: dict[str, Any] = {
            "role": "pod",
            "api_server": discovery.api_server,
            "tls_config": {"ca_file": str(discovery.ca_file),
                           "cert_file": str(discovery.cert_file),
                           "key_file": str(discovery.key_file)},
        }
        if config.namespaces:
            sd["namespaces"] = {"names": list(config.namespaces)}
        jobs.append({
            "job_name": JOB,
            "kubernetes_sd_configs": [sd],
            "relabel_configs": _pod_relabelling(),
            # The runtime labels its series with the version it serves, which is the pod's
            # version label: keep one copy, the target's (the API server's word).
            "metric_relabel_configs": [{"action": "labeldrop", "regex": "exported_version"}],
        })
    if static:
        jobs.append({
            "job_name": f"{JOB}-static",
            "static_configs": [{"targets": list(s.targets), "labels": dict(s.labels)}
                               for s in static],
        })
    return {
        "global": {"scrape_interval": interval, "scrape_timeout": interval,
                   "evaluation_interval": interval},
        "scrape_configs": jobs,
    }


def _meta_label(pod_label: str) -> str:
    sanitized = "".join(c if c.isalnum() else "_" for c in pod_label)
    return f"__meta_kubernetes_pod_label_{sanitized}"


def _pod_relabelling() -> list[dict[str, Any]]:
    present = _meta_label(MODEL_LABEL).replace("_label_", "_labelpresent_", 1)
    return [
        {"action": "keep", "source_labels": [present], "regex": "true"},
        {"action": "keep", "source_labels": ["__meta_kubernetes_pod_container_port_name"],
         "regex": PORT_NAME},
        # A pending pod has no IP: its target would read ":8080", i.e. this machine.
        {"action": "keep", "source_labels": ["__meta_kubernetes_pod_phase"], "regex": "Running"},
        {"action": "keep", "source_labels": ["__meta_kubernetes_pod_ip"], "regex": ".+"},
        {"action": "replace", "source_labels": ["__meta_kubernetes_namespace"],
         "target_label": "namespace"},
        {"action": "replace", "source_labels": ["__meta_kubernetes_pod_name"],
         "target_label": "pod"},
        {"action": "replace", "source_labels": [_meta_label(MODEL_LABEL)],
         "target_label": "model_deployment"},
        {"action": "replace", "source_labels": [_meta_label(VERSION_LABEL)],
         "target_label": "version"},
    ]


class LocalPrometheus:
    """A running Prometheus. Use as a context manager or start()/stop()."""

    def __init__(self, cluster: LocalCluster | None = None, *,
                 static: Sequence[StaticTargets] = (),
                 config: PrometheusConfig | None = None):
        if cluster is None and not static:
            raise ValueError("nothing to scrape: give a cluster, static targets, or both")
        self.cluster = cluster
        self.static = tuple(static)
        self.config = config or PrometheusConfig()
        self.data_dir = self.config.data_dir or Path(tempfile.mkdtemp(prefix="modelyard-prom-"))
        self.port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("Prometheus is not running")
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def log(self) -> Path:
        return self.data_dir / "prometheus.log"

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        binary = self._binary()
        if self.data_dir.exists():
            shutil.rmtree(self.data_dir)
        self.data_dir.mkdir(parents=True)
        discovery = self._discovery() if self.cluster is not None else None
        config_file = self.data_dir / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(scrape_config(self.config, discovery, self.static),
                                              sort_keys=False))
        self.port = reserve_port()
        argv = [
            binary, f"--config.file={config_file}",
            f"--storage.tsdb.path={self.data_dir / 'tsdb'}",
            f"--storage.tsdb.retention.time={self.config.retention}",
            f"--web.listen-address={LOOPBACK}:{self.port}",
            "--web.enable-lifecycle",
        ]
        with self.log.open("wb") as out:
            self._process = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, cwd=self.data_dir,
            )
        try:
            self._await_ready()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=_STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=_STOP_GRACE_S)
        if self.port is not None:
            release_port(self.port)
        self.port = None
        if not self.config.keep_data:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def log_tail(self, lines: int = 40) -> str:
        if not self.log.exists():
            return "(no log)"
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def targets(self) -> list[dict[str, Any]]:
        """The active targets (``/api/v1/targets``): labels, health, lastScrape."""
        with urllib.request.urlopen(f"{self.url}/api/v1/targets?state=active",
                                    timeout=5) as reply:
            body: dict[str, Any] = json.load(reply)
        active: list[dict[str, Any]] = body["data"]["activeTargets"]
        return active

    # -- start-up -------------------------------------------------------------------

    def _binary(self) -> str:
        if self.config.binary is not None:
            found = shutil.which(self.config.binary)
            if found is None:
                raise PrometheusStartError(f"{self.config.binary!r} not found")
            return found
        if self.cluster is None and (debian := shutil.which("prometheus")):
            return debian
        return str(ensure_prometheus())

    def _await_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.config.start_timeout_s
        while time.monotonic() < deadline:
            code = self._process.poll()
            if code is not None:
                raise PrometheusStartError(
                    f"prometheus exited with code {code} while starting; "
                    f"its log ({self.log}):\n{self.log_tail()}")
            if _http_ok(f"{self.url}/-/ready"):
                return
            time.sleep(0.1)
        raise PrometheusStartError(
            f"prometheus was not ready within {self.config.start_timeout_s:.0f} s; "
            f"its log ({self.log}):\n{self.log_tail()}")

    def _discovery(self) -> Discovery:
        """A client certificate for ``modelyard-prometheus`` and its read-only role."""
        assert self.cluster is not None
        pki = self.cluster.data_dir / "pki"
        cert, key = self.data_dir / "discovery.crt", self.data_dir / "discovery.key"
        _issue_client_cert(pki / "ca.crt", pki / "ca.key", USER, cert, key)
        proc = self.cluster.kubectl("apply", "-f", "-", input=_RBAC, check=False)
        if proc.returncode != 0:
            raise PrometheusStartError(f"could not grant {USER} read access to pods: "
                                       f"{proc.stderr.strip()}")
        return Discovery(self.cluster.server, pki / "ca.crt", cert, key)


def ensure_prometheus(root: Path | None = None) -> Path:
    """The cached upstream ``prometheus`` with Kubernetes discovery, built first if missing
    (once, under a file lock: see :func:`.binaries.cached_build`)."""
    major, minor, patch = PROMETHEUS_VERSION.split(".")
    module = f"{_MODULE}/cmd/prometheus@v0.{int(major) * 100 + int(minor)}.{patch}"

    def build(go: str, out: Path, work: Path) -> None:
        ldflags = f"-s -w -X github.com/prometheus/common/version.Version={PROMETHEUS_VERSION}"
        env = {**os.environ, "GOBIN": str(out), "GOFLAGS": "-buildvcs=false",
               "CGO_ENABLED": "0"}
        _run([go, "install", "-trimpath", "-tags", "remove_all_sd,enable_kubernetes_sd",
              f"-ldflags={ldflags}", module], cwd=work, env=env)

    built = cached_build(f"Prometheus v{PROMETHEUS_VERSION} with Kubernetes discovery",
                         f"prometheus-v{PROMETHEUS_VERSION}",
                         lambda path: (path / "prometheus").is_file(), build, root=root)
    return built / "prometheus"


def _issue_client_cert(ca_cert_file: Path, ca_key_file: Path, user: str,
                       cert_file: Path, key_file: Path) -> None:
    ca_cert = x509.load_pem_x509_certificate(ca_cert_file.read_bytes())
    ca_key = serialization.load_pem_private_key(ca_key_file.read_bytes(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise PrometheusStartError(f"unexpected CA key type in {ca_key_file}")
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, user)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_file.chmod(0o600)
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            return bool(reply.status == 200)
    except (urllib.error.URLError, OSError):
        return False

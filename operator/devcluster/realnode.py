"""A real Kubernetes node beside the kwok nodes: containerd, the kubelet and kube-proxy,
built from pinned sources (:mod:`.nodebinaries`), running our images (:mod:`.images`).

Each node holds one block ``n`` (0-9, a file lock on ``/run/modelyard/realnode/<n>.lock``)
and lives in namespaces made for it, so nothing it does reaches this machine's own:

* **network**: ``modelyard-node-<n>``, joined to this machine by the veth pair
  ``mynode<n>``/``mynode<n>p`` over ``10.251.<n>.0/30``; the node's address (not
  loopback, as the kubelet needs) is ``10.251.<n>.2``. Pods get ``10.252.<n>.0/24`` on
  the bridge ``cni0`` inside it; one route here sends that range into the namespace.
  kube-proxy's and CNI's iptables chains are the namespace's own. The pod network of
  :mod:`.podnet` (``10.200-239.x``, ``10.250.x``) is untouched.
* **mounts**: a persistent mount namespace (``<run>/mnt``) shared by containerd, the
  kubelet and kube-proxy. Every container, volume and sandbox mount is made there and
  disappears with it. In it the six sysctls the kubelet would otherwise rewrite for the
  whole machine (``kernel.panic``, ``kernel.panic_on_oops``, ``vm.overcommit_memory``,
  ``vm.panic_on_oom``, ``kernel.keys.root_maxkeys``/``root_maxbytes``) read as the values
  it wants, so it leaves the real ones alone.
* **cgroups**: pods go under ``/modelyard-node-<n>`` in every cgroup v1 hierarchy.

The API server listens on loopback only, so a ``socat`` forwarder on ``10.251.<n>.1``
carries the node's connections to it, and pods resolve Services through a small cluster
DNS on the same address (:mod:`.clusterdns`). Teardown kills every process of the node (pods by
their cgroups, the rest by the network namespace), drops both namespaces, the veth, the
route, the cgroups and the node's files; containerd's image store stays, under the
cache, so the next run need not import the images again. A block left behind by a killed
process is cleared by the next owner.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

from . import nodeconfig as nc
from .binaries import cache_root
from .clusterdns import ClusterDns
from .images import Image
from .locks import try_lock
from .nodebinaries import HostTools, NodeBinaries
from .pki import Pki, issue_client_cert
from .ports import release_port, reserve_port

log = logging.getLogger(__name__)

BLOCKS = 10
RUN_DIR = Path("/run/modelyard/realnode")
CGROUP_V1 = Path("/sys/fs/cgroup")
# What the kubelet's setupKernelTunables wants; shown to it, never written to the machine.
KUBELET_SYSCTLS = {"vm/overcommit_memory": 1, "vm/panic_on_oom": 0, "kernel/panic": 10,
                   "kernel/panic_on_oops": 1, "kernel/keys/root_maxkeys": 1000000,
                   "kernel/keys/root_maxbytes": 25000000}
_GRACE_S = 10.0


class RealNodeError(RuntimeError):
    """The node did not come up; the message names the component and its log tail."""


class RealNode:
    """One real node of a local cluster, from :meth:`start` until :meth:`stop`."""

    def __init__(self, name: str, data: Path, *, binaries: NodeBinaries, tools: HostTools,
                 pki: Pki, apiserver_port: int, service_cidr: str):
        self.name = name
        self._data = data
        self._binaries = binaries
        self._tools = tools
        self._pki = pki
        self._apiserver_port = apiserver_port
        self._service_cidr = service_cidr
        self._lock: IO[bytes] | None = None
        self._processes: dict[str, subprocess.Popen[bytes]] = {}
        self.layout: nc.NodeLayout | None = None
        self._dns: ClusterDns | None = None
        self.started_in_s: float | None = None

    # -- lifecycle -------------------------------------------------------------------

    def start(self, images: Sequence[Image], kubectl: Sequence[str]) -> None:
        """Bring the node up, import ``images`` into its containerd, and wait until the
        API server has it Ready (``kubectl`` is the cluster's admin kubectl argv)."""
        started = time.monotonic()
        try:
            self._take_block(images)
            layout = self.layout
            assert layout is not None
            self._network(layout)
            self._dns = ClusterDns(layout.host_ip, _service_lookup([*kubectl]))
            self._mount_namespace(layout)
            self._cgroups(layout)
            self._write_configs(layout)
            self._launch("apiserver-forwarder", [
                "socat", f"TCP-LISTEN:{layout.apiserver_port},bind={layout.host_ip},fork,"
                "reuseaddr", f"TCP:127.0.0.1:{self._apiserver_port}"], in_node=False)
            self._launch("containerd", [str(self._binaries.path("containerd")),
                                        f"--config={layout.file('containerd.toml')}"])
            self._await(lambda: self._ctr("version", check=False).returncode == 0,
                        "containerd", 30)
            self._clear_containers()
            for image in images:
                self._import(image)
            self._launch("kubelet", [
                str(self._binaries.path("kubelet")), f"--config={layout.file('kubelet.yaml')}",
                f"--kubeconfig={layout.file('kubelet.kubeconfig')}",
                f"--root-dir={layout.data / 'kubelet'}", f"--cert-dir={layout.data / 'pki'}",
                f"--node-ip={layout.node_ip}", f"--hostname-override={self.name}",
                f"--node-labels={nc.NODE_LABEL}=real", "--v=1"])
            self._launch("kube-proxy", [str(self._binaries.path("kube-proxy")),
                                        f"--config={layout.file('kube-proxy.yaml')}", "--v=1"])
            wait = [*kubectl, "wait", "--for=condition=Ready", f"node/{self.name}"]
            self._await(lambda: subprocess.run([*wait, "--timeout=2s"], capture_output=True,
                                               check=False).returncode == 0, "kubelet", 90)
        except BaseException:
            self.stop()
            raise
        self.started_in_s = time.monotonic() - started
        log.info("real node %s Ready in %.1f s", self.name, self.started_in_s)

    def stop(self) -> None:
        """Everything of the node gone: processes, namespaces, mounts, links, cgroups."""
        layout = self.layout
        if layout is None:
            return
        for name in ("kube-proxy", "kubelet"):
            _terminate(self._processes.pop(name, None))
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            self._clear_containers()
        _kill_cgroups(layout.cgroup_root)
        for process in reversed(list(self._processes.values())):
            _terminate(process)
        self._processes.clear()
        if self._dns is not None:
            self._dns.stop()
            self._dns = None
        _clear_block(layout)
        shutil.rmtree(layout.data, ignore_errors=True)
        release_port(layout.apiserver_port)
        if self._lock is not None:
            self._lock.close()
            self._lock = None
        self.layout = None

    # -- helpers for tests -----------------------------------------------------------

    def api_endpoints(self) -> str:
        """An EndpointSlice sending the ``kubernetes`` Service to this node's forwarder."""
        assert self.layout is not None
        return json.dumps({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "kubernetes-real-nodes", "namespace": "default", "labels": {
                "kubernetes.io/service-name": "kubernetes",
                "endpointslice.kubernetes.io/managed-by": "modelyard.dev-devcluster"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [self.layout.host_ip], "conditions": {"ready": True}}],
            "ports": [{"name": "https", "port": self.layout.apiserver_port, "protocol": "TCP"}],
        })

    def ctr(self, *args: str) -> str:
        return self._ctr(*args).stdout

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self._data / "logs" / f"{name}.log"
        if not path.exists():
            return "(no log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    # -- start-up --------------------------------------------------------------------

    def _take_block(self, images: Sequence[Image]) -> None:
        RUN_DIR.mkdir(parents=True, exist_ok=True)
        for block in range(BLOCKS):
            handle = try_lock(RUN_DIR / f"{block}.lock")
            if handle is None:
                continue
            self._lock = handle
            self.layout = nc.NodeLayout(
                name=self.name, block=block, data=self._data, run=RUN_DIR / str(block),
                containerd_root=_store(block, images),
                node_ip=f"10.251.{block}.2", host_ip=f"10.251.{block}.1",
                pod_cidr=f"10.252.{block}.0/24", service_cidr=self._service_cidr,
                apiserver_port=reserve_port())
            _clear_block(self.layout)  # whatever a killed owner left
            return
        raise RealNodeError(f"all {BLOCKS} real-node blocks are in use")

    def _network(self, layout: nc.NodeLayout) -> None:
        ns, host, node = _netns(layout.block), f"mynode{layout.block}", f"mynode{layout.block}p"
        for args in (["netns", "add", ns],
                     ["link", "add", host, "type", "veth", "peer", "name", node, "netns", ns],
                     ["addr", "add", f"{layout.host_ip}/30", "dev", host],
                     ["link", "set", host, "up"],
                     ["-n", ns, "link", "set", "lo", "up"],
                     ["-n", ns, "addr", "add", f"{layout.node_ip}/30", "dev", node],
                     ["-n", ns, "link", "set", node, "up"],
                     ["route", "add", layout.pod_cidr, "via", layout.node_ip, "dev", host]):
            _check(["ip", *args])
        for key in ("net.ipv4.ip_forward=1", "net.bridge.bridge-nf-call-iptables=1"):
            _check(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", key])

    def _mount_namespace(self, layout: nc.NodeLayout) -> None:
        layout.run.mkdir(parents=True, exist_ok=True)
        handle = layout.run / "mnt"
        handle.touch()
        _check(["unshare", f"--mount={handle}", "--propagation=private", "true"])
        shown = layout.run / "sysctl"
        shown.mkdir(exist_ok=True)
        for key, value in KUBELET_SYSCTLS.items():
            fake = shown / key.replace("/", ".")
            fake.write_text(f"{value}\n")
            _check(["nsenter", f"--mount={handle}", "mount", "--bind", "-o", "ro", str(fake),
                    f"/proc/sys/{key}"])

    def _cgroups(self, layout: nc.NodeLayout) -> None:
        for hierarchy in _v1_hierarchies():
            path = hierarchy / layout.cgroup_root.strip("/")
            path.mkdir(exist_ok=True)
            if hierarchy.name == "cpuset":  # a new cpuset starts empty: give it its parent's
                for knob in ("cpuset.cpus", "cpuset.mems"):
                    (path / knob).write_text((hierarchy / knob).read_text())

    def _write_configs(self, layout: nc.NodeLayout) -> None:
        for folder in ("config", "logs", "cni/net.d", "kubelet", "pki", "pod-logs"):
            (layout.data / folder).mkdir(parents=True, exist_ok=True)
        layout.containerd_root.mkdir(parents=True, exist_ok=True)
        spec = subprocess.run([str(self._binaries.path("ctr")), "oci", "spec"],
                              capture_output=True, text=True, check=True).stdout
        server = f"https://{layout.host_ip}:{layout.apiserver_port}"
        kubelet_cert = issue_client_cert(self._pki, f"kubelet-{self.name}",
                                         f"system:node:{self.name}", "system:nodes")
        proxy_cert = issue_client_cert(self._pki, f"kube-proxy-{self.name}",
                                       "system:kube-proxy", None)
        files = {
            "containerd.toml": nc.containerd_config(layout, self._tools),
            "base-spec.json": nc.base_spec(json.loads(spec)),
            "kubelet.yaml": nc.kubelet_config(layout),
            "kube-proxy.yaml": nc.kube_proxy_config(layout, layout.file("kube-proxy.kubeconfig")),
            "kubelet.kubeconfig": nc.kubeconfig(server, self._pki.ca_cert, *kubelet_cert,
                                                f"system:node:{self.name}"),
            "kube-proxy.kubeconfig": nc.kubeconfig(server, self._pki.ca_cert, *proxy_cert,
                                                   "system:kube-proxy"),
            "resolv.conf": "",  # pods resolve nothing outside the cluster
        }
        for name, text in files.items():
            layout.file(name).write_text(text)
        (layout.data / "cni" / "net.d" / "10-modelyard.conflist").write_text(
            nc.cni_config(layout))

    def _launch(self, name: str, argv: list[str], in_node: bool = True) -> None:
        assert self.layout is not None
        if in_node:
            argv = ["nsenter", f"--net=/run/netns/{_netns(self.layout.block)}",
                    f"--mount={self.layout.run / 'mnt'}", "--", *argv]
        with (self._data / "logs" / f"{name}.log").open("wb") as out:
            self._processes[name] = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, cwd=self._data)

    def _await(self, ready: object, name: str, timeout_s: float) -> None:
        assert callable(ready)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for component, process in self._processes.items():
                if process.poll() is not None:
                    raise RealNodeError(f"{component} of node {self.name} exited "
                                        f"({process.returncode}):\n{self.log_tail(component)}")
            if ready():
                return
            time.sleep(0.2)
        raise RealNodeError(f"{name} of node {self.name} not ready within {timeout_s:.0f} s:\n"
                            f"{self.log_tail(name)}")

    def _ctr(self, *args: str, check: bool = True,
             timeout: float = 600) -> subprocess.CompletedProcess[str]:
        assert self.layout is not None
        return subprocess.run([str(self._binaries.path("ctr")), f"--address={self.layout.socket}",
                               "--namespace=k8s.io", *args], capture_output=True, text=True,
                              check=check, timeout=timeout)

    def _import(self, image: Image) -> None:
        if image.name in self._ctr("images", "ls", "--quiet").stdout.split():
            return  # imported by an earlier run: the store is kept under the cache
        started = time.monotonic()
        proc = self._ctr("images", "import", "--local", str(image.archive), check=False)
        if proc.returncode != 0:
            raise RealNodeError(f"ctr images import {image.archive} failed: {proc.stderr}")
        log.info("imported %s in %.0f s", image.name, time.monotonic() - started)

    def _clear_containers(self) -> None:
        """Remove every container and sandbox a previous run left in the kept store."""
        for kind in ("tasks", "containers"):
            names = self._ctr(kind, "ls", "--quiet", check=False).stdout.split()
            for name in names:
                if kind == "tasks":
                    self._ctr("tasks", "kill", "--signal=SIGKILL", name, check=False)
                    self._ctr("tasks", "delete", "--force", name, check=False)
                else:
                    self._ctr("containers", "delete", name, check=False)


def _store(block: int, images: Sequence[Image]) -> Path:
    """containerd's root for block ``block`` holding exactly ``images``: kept between runs
    (an image is imported once), and any other store of the block (older images, 12 GB for
    a runtime image: its layers and their unpacked snapshot) is removed, which containerd's
    own image deletion did not reliably do."""
    names = "\n".join(sorted(image.name for image in images))
    digest = hashlib.sha256(names.encode()).hexdigest()[:12]
    keep = cache_root() / "realnode" / f"containerd-{block}-{digest}"
    for old in keep.parent.glob(f"containerd-{block}*"):
        ours = old.name == f"containerd-{block}" or old.name.startswith(f"containerd-{block}-")
        if ours and old != keep:
            shutil.rmtree(old, ignore_errors=True)
    return keep


def _service_lookup(kubectl: list[str]) -> Callable[[str, str], str | None]:
    def lookup(service: str, namespace: str) -> str | None:
        proc = subprocess.run([*kubectl, "get", "service", service, "-n", namespace,
                               "-o", "jsonpath={.spec.clusterIP}"], capture_output=True,
                              text=True, check=False, timeout=10)
        return proc.stdout.strip() if proc.returncode == 0 else None

    return lookup


def _netns(block: int) -> str:
    return f"modelyard-node-{block}"


def _clear_block(layout: nc.NodeLayout) -> None:
    """Remove whatever a node of this block may have left: processes in its network
    namespace, pods in its cgroups, the namespaces, the veth (and so the route)."""
    ns = _netns(layout.block)
    _kill_cgroups(layout.cgroup_root)
    pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True,
                          check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    _await_exit(pids)
    subprocess.run(["ip", "link", "del", f"mynode{layout.block}"], capture_output=True,
                   check=False)
    subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
    handle = layout.run / "mnt"
    subprocess.run(["umount", "--lazy", str(handle)], capture_output=True, check=False)
    for hierarchy in _hierarchies():
        _remove_cgroup_tree(hierarchy / layout.cgroup_root.strip("/"))
    shutil.rmtree(layout.run, ignore_errors=True)


def _await_exit(pids: list[str]) -> None:
    """Wait (up to the grace period) until the killed ``pids`` are gone or only wait to be
    reaped: SIGKILL is delivered when a process next leaves the kernel, not at once."""
    deadline = time.monotonic() + _GRACE_S
    while time.monotonic() < deadline:
        living = []
        for pid in pids:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
            except OSError:
                continue
            if state not in ("Z", "X"):
                living.append(pid)
        if not living:
            return
        time.sleep(0.1)


def _v1_hierarchies() -> list[Path]:
    """The cgroup v1 hierarchies (where the node's root cgroup is made)."""
    return [p for p in _hierarchies() if p.name != "unified"]


def _hierarchies() -> list[Path]:
    """Every mounted cgroup hierarchy, the cgroup2 mount included (runc makes the pods'
    cgroups there too)."""
    if not CGROUP_V1.is_dir():
        return []
    return [p for p in sorted(CGROUP_V1.iterdir())
            if p.is_dir() and not p.is_symlink() and (p / "cgroup.procs").exists()]


def _kill_cgroups(root: str) -> None:
    """SIGKILL every process in the cgroup tree ``root`` (the node's pods), until none."""
    deadline = time.monotonic() + _GRACE_S
    while time.monotonic() < deadline:
        pids: set[int] = set()
        for hierarchy in _hierarchies():
            tree = hierarchy / root.strip("/")
            for procs in tree.rglob("cgroup.procs") if tree.is_dir() else ():
                with contextlib.suppress(OSError):
                    pids.update(int(p) for p in procs.read_text().split())
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


def _remove_cgroup_tree(path: Path) -> None:
    if not path.is_dir():
        return
    for child in sorted((p for p in path.rglob("*") if p.is_dir()),
                        key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            child.rmdir()
    with contextlib.suppress(OSError):
        path.rmdir()


def _check(argv: list[str]) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RealNodeError(f"{' '.join(argv)} failed: {proc.stderr.strip()}")


def _terminate(process: subprocess.Popen[bytes] | None) -> None:
    if process is None or process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=_GRACE_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=_GRACE_S)


__all__ = ["RealNode", "RealNodeError"]

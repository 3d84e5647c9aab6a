"""The configuration files of a real node: containerd, its base OCI spec, CNI, the kubelet
and kube-proxy. Pure functions of a :class:`NodeLayout`; :mod:`.realnode` writes them.

What this machine's kind needs (root in a VM without CAP_SYS_RESOURCE, cgroups v1 with a
cgroup2 mount, no registry) and is set here on purpose:

* every container starts with fixed rlimits (``nofile`` 20000, ``nproc`` 32768) from a
  base OCI spec, and containerd never lowers an OOM score below its own
  (``restrict_oom_score_adj``): raising a limit or lowering a score needs CAP_SYS_RESOURCE;
* runc (Debian's), with cgroupfs; the kubelet accepts cgroups v1 (``failCgroupV1: false``);
* the sandbox image is the locally built pause image, pinned so image GC keeps it;
* CNI, image GC and eviction thresholds are the node's own: nothing is written to
  ``/etc/cni``, ``/var/lib/cni`` or ``/var/lib/kubelet``, and a shared, filling disk does
  not taint the node or delete the images we imported;
* kube-proxy leaves conntrack's global limits alone (it runs in the node's own network
  namespace, where its iptables chains live and die).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .images import PAUSE_IMAGE
from .nodebinaries import HostTools

RLIMITS = (("RLIMIT_NOFILE", 20000), ("RLIMIT_NPROC", 32768))
NODE_LABEL = "modelyard.dev/node"


@dataclass(frozen=True)
class NodeLayout:
    """Where a real node keeps things and how it is addressed."""

    name: str
    block: int
    data: Path  # configs, kubelet root, logs: removed on teardown
    run: Path  # containerd state and socket, the mount namespace handle
    containerd_root: Path  # content and snapshots: kept between runs (the imported images)
    node_ip: str
    host_ip: str
    pod_cidr: str
    service_cidr: str
    apiserver_port: int  # the forwarder's port on host_ip

    @property
    def socket(self) -> Path:
        return self.run / "containerd.sock"

    @property
    def cgroup_root(self) -> str:
        return f"/modelyard-node-{self.block}"

    def file(self, name: str) -> Path:
        return self.data / "config" / name


def containerd_config(layout: NodeLayout, tools: HostTools) -> str:
    runtime = "plugins.'io.containerd.cri.v1.runtime'"
    images = "plugins.'io.containerd.cri.v1.images'"
    return f"""\
version = 3
root = "{layout.containerd_root}"
state = "{layout.run / 'state'}"
disabled_plugins = ["io.containerd.nri.v1.nri", "io.containerd.tracing.processor.v1.otlp"]

[grpc]
  address = "{layout.socket}"

[ttrpc]
  address = "{layout.run / 'containerd.sock.ttrpc'}"

[debug]
  address = ""

[{runtime}]
  enable_selinux = false
  disable_apparmor = true
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  enable_cdi = false

[{runtime}.containerd]
  default_runtime_name = "runc"

[{runtime}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
  base_runtime_spec = "{layout.file('base-spec.json')}"

[{runtime}.containerd.runtimes.runc.options]
  BinaryName = "{tools.runc}"
  SystemdCgroup = false

[{runtime}.cni]
  bin_dirs = ["{tools.cni_bin_dir}"]
  conf_dir = "{layout.data / 'cni' / 'net.d'}"

[{images}]
  snapshotter = "overlayfs"

[{images}.pinned_images]
  sandbox = "{PAUSE_IMAGE}"

[plugins.'io.containerd.grpc.v1.cri']
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
"""


def base_spec(default_spec: dict[str, Any]) -> str:
    """containerd's default OCI spec (``ctr oci spec``) with this machine's fixed rlimits."""
    spec = dict(default_spec)
    process = dict(spec.get("process", {}))
    process["rlimits"] = [{"type": t, "hard": n, "soft": n} for t, n in RLIMITS]
    spec["process"] = process
    return json.dumps(spec, indent=2)


def cni_config(layout: NodeLayout) -> str:
    return json.dumps({
        "cniVersion": "1.0.0",
        "name": "modelyard",
        "plugins": [{
            "type": "bridge", "bridge": "cni0", "isGateway": True, "ipMasq": True,
            "hairpinMode": True,
            "ipam": {"type": "host-local", "ranges": [[{"subnet": layout.pod_cidr}]],
                     "routes": [{"dst": "0.0.0.0/0"}],
                     "dataDir": str(layout.data / "cni" / "ipam")},
        }, {"type": "portmap", "capabilities": {"portMappings": True}}],
    }, indent=2)


def kubelet_config(layout: NodeLayout) -> str:
    config: dict[str, Any] = {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "failCgroupV1": False,
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": layout.cgroup_root,
        "cgroupsPerQOS": True,
        "enforceNodeAllocatable": ["pods"],
        "containerRuntimeEndpoint": f"unix://{layout.socket}",
        "address": layout.node_ip,
        "port": 10250,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": 10248,
        # Only the API server reaches the node's address (a network namespace of its own).
        "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
        "authorization": {"mode": "AlwaysAllow"},
        "podCIDR": layout.pod_cidr,
        "podLogsDir": str(layout.data / "pod-logs"),
        # Pods ask the node's cluster DNS (.clusterdns, on the host's end of the link) and
        # nothing else: no upstream resolver.
        "resolvConf": str(layout.file("resolv.conf")),
        "clusterDNS": [layout.host_ip],
        "clusterDomain": "cluster.local",
        "failSwapOn": False,
        "protectKernelDefaults": False,
        "maxPods": 30,
        "serializeImagePulls": False,
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%",
                         "nodefs.inodesFree": "1%", "imagefs.available": "1%"},
        "rotateCertificates": False,
        "serverTLSBootstrap": False,
        "localStorageCapacityIsolation": True,
        "containerLogMaxSize": "10Mi",
        "shutdownGracePeriod": "0s",
    }
    return yaml.safe_dump(config)


def kube_proxy_config(layout: NodeLayout, kubeconfig: Path) -> str:
    config: dict[str, Any] = {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "mode": "iptables",
        "hostnameOverride": layout.name,
        "bindAddress": layout.node_ip,
        "healthzBindAddress": "127.0.0.1:10256",
        "metricsBindAddress": "127.0.0.1:10249",
        "clusterCIDR": layout.pod_cidr,
        "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s",
                      "tcpCloseWaitTimeout": "0s"},
        "iptables": {"localhostNodePorts": False},
    }
    return yaml.safe_dump(config)


def kubeconfig(server: str, ca: Path, cert: Path, key: Path, user: str) -> str:
    """A kubeconfig for the node's components. The API server's certificate names
    ``localhost``; the node reaches it through the forwarder on the host's link address."""
    return json.dumps({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "local", "cluster": {
            "server": server, "certificate-authority": str(ca), "tls-server-name": "localhost"}}],
        "users": [{"name": user, "user": {"client-certificate": str(cert),
                                          "client-key": str(key)}}],
        "contexts": [{"name": "local", "context": {"cluster": "local", "user": user}}],
        "current-context": "local",
    }, indent=2)


__all__ = ["NODE_LABEL", "NodeLayout", "base_spec", "cni_config", "containerd_config",
           "kube_proxy_config", "kubeconfig", "kubelet_config"]

"""The RBAC proof: the real operator, holding nothing but the chart's ServiceAccount token,
runs a whole canary rollout, a ``kubectl scale``, a scale to zero behind the chart's
activator and back, and a deletion without a single 403; the activator, holding nothing but
its own ServiceAccount's token, holds a request for that model and turns away one for a
model that does not exist; and the API server's audit log shows each of them used every
permission the chart grants it (least privilege both ways).

The chart's activator Deployment and Service are installed too: kwok reports its pods Ready
with pod IPs, so the Service's EndpointSlices list them, as the operator expects; no
activator process runs behind those IPs, so the operator's scrape of their ``/metrics``
fails (a logged warning) and nothing wakes the model but its spec.

With the chart's ``nodeCache`` on, the same operator brings the node cache to model pods
in a namespace that enforces Pod Security's ``restricted`` level (where a hostPath of
their own is refused), through a claim it keeps there, bound to a hostPath
PersistentVolume it creates; a namespace deleted and made again gets its claim back, bound
to the same volume. Every rule the cache adds is used, and nothing is refused.

These tests start a local control plane of their own whose audit policy also records the
*reads* (list, watch, get) of the operator's namespace's ServiceAccounts; the shared
``cluster`` fixture records writes only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from support import ROOT, Kube, fresh_namespace, install_crd, wait_for

from modelyard.operator.devcluster.ports import reserve_port

CHART = ROOT / "charts" / "modelyard"
OPERATOR_NS = "modelyard-system"
RBAC_KINDS = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}
ROLE_KINDS = {"ClusterRole", "Role"}
# Writes of everyone (as the shared cluster logs them) and every request of the ServiceAccounts
# of OPERATOR_NS, reads included, with the response code.
AUDIT_POLICY = f"""\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: Metadata
  userGroups: ["system:serviceaccounts:{OPERATOR_NS}"]
- level: Metadata
  verbs: [create, update, patch, delete, deletecollection]
- level: None
"""
GPUS, REPLICAS = 1, 2

Permission = tuple[str, str, str]  # (apiGroup, resource[/subresource], verb)


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from modelyard.operator.devcluster import ClusterConfig, LocalCluster

    policy = tmp_path_factory.mktemp("audit") / "policy.yaml"
    policy.write_text(AUDIT_POLICY)
    # The last --audit-policy-file wins: ours replaces the writes-only default. With the
    # Gateway API installed, canary traffic goes through HTTPRoutes and their rule is used.
    config = ClusterConfig(gateway_api=True,
                           extra_apiserver_args=[f"--audit-policy-file={policy}"])
    with LocalCluster(config) as local:
        install_crd(local)
        local.kubectl("create", "namespace", OPERATOR_NS)
        yield local


@pytest.fixture(scope="module")
def helm_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("helm-home")


def lease_name(account: str) -> str:
    """A Lease per test: each operator must create its own (and prove `create` is needed)."""
    return f"{account}-leader"


@dataclass(frozen=True)
class Installed:
    """What install_rbac applied of the chart: the two ServiceAccounts and the RBAC."""

    operator: str  # the operator's ServiceAccount
    activator: str  # the activator's ServiceAccount, also its Deployment and Service
    objs: list[dict[str, Any]]  # the RBAC objects

    def granted(self, account: str) -> set[Permission]:
        """Every (group, resource, verb) the chart's bindings give ``account``."""
        roles = {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o
                 for o in self.objs if o["kind"] in ROLE_KINDS}
        bound = [roles[(b["roleRef"]["kind"],
                        b["metadata"].get("namespace") if b["roleRef"]["kind"] == "Role"
                        else None, b["roleRef"]["name"])]
                 for b in self.objs if b["kind"] in ("ClusterRoleBinding", "RoleBinding")
                 if {"kind": "ServiceAccount", "name": account, "namespace": OPERATOR_NS}
                 in b["subjects"]]
        return granted_permissions(bound)


def install_rbac(cluster: Any, home: Path, release: str, values: dict[str, Any]) -> Installed:
    """Apply the chart's ServiceAccounts and RBAC objects, and its activator Deployment and
    Service (kwok runs the pods: the Service gets ready endpoints, as in a real cluster)."""
    from modelyard.operator.devcluster.helm import ensure_helm

    account = "modelyard" if release == "modelyard" else f"{release}-modelyard"
    values = {**values, "leaderElection": {"enabled": True, "leaseName": lease_name(account)}}
    values_file = home / f"{release}.yaml"
    values_file.write_text(yaml.safe_dump(values))
    rendered = ensure_helm().run("template", release, str(CHART), f"--namespace={OPERATOR_NS}",
                                 f"--values={values_file}", home=home)
    everything = [o for o in yaml.safe_load_all(rendered.stdout) if o]
    activator = f"{account}-activator"
    objs = [o for o in everything if o["kind"] in RBAC_KINDS]
    runs = [o for o in everything if o["kind"] in ("Deployment", "Service")
            and o["metadata"]["name"] == activator]
    assert len(runs) == 2, "the chart's activator Deployment and Service"
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(objs + runs))
    assert sorted(o["metadata"]["name"] for o in objs if o["kind"] == "ServiceAccount") == \
        [account, activator]
    return Installed(account, activator, objs)


def activator_addresses(cluster: Any, service: str) -> list[str] | None:
    """The distinct ready addresses behind the chart's activator Service, once both
    replicas are ready. (kwok has given two pods of one node the same address at times;
    the operator's slice lists an address once.)"""
    slices = json.loads(cluster.kubectl(
        "get", "endpointslices", "-n", OPERATOR_NS, "-o", "json",
        "-l", f"kubernetes.io/service-name={service}").stdout)["items"]
    ready = [a for s in slices for e in s.get("endpoints") or []
             if (e.get("conditions") or {}).get("ready") for a in e["addresses"]]
    return sorted(set(ready)) if len(ready) == 2 else None


@pytest.fixture
def token_kubeconfig(audited: Any, tmp_path: Path) -> Callable[[str], tuple[str, Path]]:
    """A kubeconfig holding only the given SA's token: (its user name, the file)."""

    def write(account: str) -> tuple[str, Path]:
        token = audited.kubectl("create", "token", account, "-n", OPERATOR_NS,
                                "--duration=1h").stdout.strip()
        admin = json.loads(audited.kubeconfig.read_text())
        user = f"system:serviceaccount:{OPERATOR_NS}:{account}"
        config = {**admin, "users": [{"name": user, "user": {"token": token}}],
                  "contexts": [{"name": "sa", "context": {
                      "cluster": admin["clusters"][0]["name"], "user": user}}],
                  "current-context": "sa"}
        path = tmp_path / f"{account}.kubeconfig"
        path.write_text(json.dumps(config))
        path.chmod(0o600)
        return user, path

    return write


@pytest.fixture
def as_service_account(token_kubeconfig: Callable[[str], tuple[str, Path]],
                       monkeypatch: pytest.MonkeyPatch) -> Any:
    """Point in-process operators at a kubeconfig holding only the given SA's token, with
    the environment the chart's Deployment gives the operator."""

    def use(installed: Installed) -> str:
        account = installed.operator
        user, path = token_kubeconfig(account)
        monkeypatch.setenv("KUBECONFIG", str(path))
        # What the chart's Deployment gives the operator.
        monkeypatch.setenv("MODELYARD_LEADER_ELECTION", "true")
        monkeypatch.setenv("MODELYARD_LEASE_NAME", lease_name(account))
        monkeypatch.setenv("POD_NAMESPACE", OPERATOR_NS)
        monkeypatch.setenv("POD_NAME", f"{account}-0")
        monkeypatch.setenv("MODELYARD_ACTIVATOR_SERVICE", f"{OPERATOR_NS}/{installed.activator}")
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        return user

    return use


def model(name: str, version: str, steps: list[dict[str, Any]]) -> str:
    return yaml.safe_dump({
        "apiVersion": "modelyard.dev/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": name},
        "spec": {
            "model": {"version": version, "uri": f"s3://models/{name}/{version}/model.pt"},
            "resources": {"gpu": {"count": GPUS, "product": "NVIDIA-H100-80GB-HBM3"}},
            "replicas": REPLICAS,
            "rollout": {"strategy": "Canary", "steps": steps},
        },
    })


def status(kube: Kube, name: str) -> dict[str, Any]:
    return dict((kube.get("md", name) or {}).get("status", {}))


def drive_a_models_life(kube: Kube, name: str) -> None:
    """Create, canary to promotion, `kubectl scale`, delete: everything the operator does."""
    steps = [{"weight": 50, "pauseSeconds": 5}]  # long enough to see the canary's two Services
    kube.apply(model(name, "1", steps))
    wait_for(lambda: status(kube, name).get("readyReplicas") == REPLICAS, what="v1 ready")

    kube.apply(model(name, "2", steps))
    wait_for(lambda: status(kube, name).get("canary"), what="canary started")
    wait_for(lambda: kube.get("service", f"{name}-v2") and kube.get("service", f"{name}-v1"),
             what="a Service per live version")
    wait_for(lambda: status(kube, name).get("stableVersion") == "2"
             and not status(kube, name).get("canary")
             and kube.get("deployment", f"{name}-v1") is None
             and kube.get("service", f"{name}-v1") is None, timeout=120, what="v2 promoted")

    kube.run("scale", f"md/{name}", "--replicas=3")
    wait_for(lambda: (kube.get("deployment", f"{name}-v2") or {}).get("spec", {})
             .get("replicas") == 3 and status(kube, name).get("readyReplicas") == 3,
             what="scaled to 3")

    kube.run("delete", "md", name, "--wait=true", "--timeout=60s")
    wait_for(lambda: kube.get("deployment", f"{name}-v2") is None
             and kube.get("service", name) is None
             and kube.get("service", f"{name}-v2") is None, timeout=90,
             what="children garbage-collected")


def drive_a_conversion(kube: Kube, name: str) -> None:
    """A version that asks for conversion gets its Job (kwok holds the Job's pod Running, so
    it stays converting); when the spec stops asking, the Job is deleted."""
    def manifest(convert: bool) -> str:
        doc = yaml.safe_load(model(name, "1", [{"weight": 50}]))
        doc["spec"]["model"].update(format="export", uri=f"s3://models/{name}/1/model.pt2")
        if convert:
            doc["spec"]["model"]["convert"] = {"target": "aoti"}
        return yaml.safe_dump(doc)

    def jobs() -> list[Any]:
        return list(kube.get("jobs", selector=f"modelyard.dev/convert-for={name}") or [])

    kube.apply(manifest(convert=True))
    wait_for(jobs, what="the conversion Job")
    assert status(kube, name).get("readyReplicas", 0) == 0  # nothing starts before it
    kube.apply(manifest(convert=False))
    wait_for(lambda: not jobs(), what="the conversion Job deleted")
    kube.run("delete", "md", name, "--wait=true", "--timeout=60s")


def sleepy(name: str, min_replicas: int) -> str:
    return yaml.safe_dump({
        "apiVersion": "modelyard.dev/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": name},
        "spec": {
            "model": {"version": "1", "uri": f"s3://models/{name}/1/model.pt"},
            "resources": {"gpu": {"count": GPUS, "product": "NVIDIA-H100-80GB-HBM3"}},
            "autoscaling": {"minReplicas": min_replicas, "maxReplicas": 2,
                            "metric": "concurrency", "target": 1},
        },
    })


def activator_slice(kube: Kube, name: str) -> dict[str, Any] | None:
    found: dict[str, Any] | None = kube.get("endpointslice", f"{name}-activator")
    return found


def drive_to_zero_and_back(kube: Kube, name: str, addresses: list[str],
                           at_zero: Callable[[], None]) -> None:
    """A model that may scale to zero: at zero its Service leads to the chart's activator
    (a selector-less Service and the operator's EndpointSlice); ``at_zero`` runs there;
    with a replica ready the Service selects the model's pods again."""
    kube.apply(sleepy(name, 0))
    wait_for(lambda: activator_slice(kube, name)
             and "selector" not in (kube.get("service", name) or {}).get("spec", {"selector": 1}),
             what="the model at zero, its Service on the activator")
    found = activator_slice(kube, name)
    assert found is not None
    assert sorted(a for e in found["endpoints"] for a in e["addresses"]) == addresses
    assert found["ports"] == [{"name": "http", "port": 8080, "protocol": "TCP"}]
    assert found["metadata"]["labels"]["kubernetes.io/service-name"] == name
    deployment = kube.get("deployment", f"{name}-v1")
    assert deployment["spec"]["replicas"] == 0
    at_zero()

    kube.apply(sleepy(name, 1))
    wait_for(lambda: status(kube, name).get("readyReplicas") == 1
             and activator_slice(kube, name) is None
             and (kube.get("service", name) or {}).get("spec", {}).get("selector"),
             what="a replica ready, the activator's slice gone, the selector back")
    service = kube.get("service", name)
    assert service["spec"]["selector"]["modelyard.dev/model-deployment"] == name
    kube.run("delete", "md", name, "--wait=true", "--timeout=60s")


def drive_as(cluster: Any, user: str, drive: Callable[[], None]) -> None:
    """Run ``drive``, naming any refused request when it gets stuck."""
    try:
        drive()
    except AssertionError as exc:
        _, refused = used_permissions(cluster, user)
        counts = Counter(refused)
        raise AssertionError(f"{exc}\nrequests refused to {user}: "
                             f"{', '.join(f'{r} (x{n})' for r, n in counts.items())}") from exc


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def ask_the_activator(kubeconfig: Path, namespace: str, name: str) -> None:
    """``modelyard activator`` as its pods run it, with only its ServiceAccount's token:
    a request for the model at zero is held (pods listed, the ModelDeployment found) and let
    go with a 503 at its timeout; one for a model that does not exist is a 404; SIGTERM
    stops it cleanly."""
    port, admin = reserve_port(), reserve_port()
    log = kubeconfig.with_suffix(".log")
    env = {k: v for k, v in os.environ.items() if k != "KUBERNETES_SERVICE_HOST"}
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(Path(sys.executable).with_name("modelyard")), "activator", "--host", "127.0.0.1",
             "--port", str(port), "--admin-port", str(admin), "--timeout-seconds", "1"],
            env={**env, "KUBECONFIG": str(kubeconfig)}, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: _healthy(f"http://127.0.0.1:{admin}/healthz"), what="the activator")
        held = httpx.post(f"http://127.0.0.1:{port}/v2/models/{name}/infer", content=b"{}",
                          headers={"Host": f"{name}.{namespace}.svc"}, timeout=30)
        assert held.status_code == 503, held.text
        assert "no ready replica" in held.json()["error"]
        assert "Retry-After" in held.headers
        missing = httpx.get(f"http://127.0.0.1:{port}/v2/models/nosuch",
                            headers={"Host": f"nosuch.{namespace}.svc"}, timeout=30)
        assert missing.status_code == 404, missing.text
    finally:
        process.terminate()
        code = process.wait(30)
    assert code == 0, log.read_text()


def used_permissions(cluster: Any, user: str) -> tuple[set[Permission], list[str]]:
    """(group, resource, verb) of every resource request ``user`` made, and any refused."""
    used: set[Permission] = set()
    refused = []
    for entry in cluster.writes_by(user):  # every request, with this cluster's audit policy
        ref = entry.get("objectRef")
        if not ref:
            continue  # discovery (/apis, /version): open to every authenticated user
        resource = ref["resource"] + (f"/{ref['subresource']}" if ref.get("subresource") else "")
        code = entry.get("responseStatus", {}).get("code", 0)
        # Refused by RBAC; not a 403 the authorizer allowed (a write into a namespace being
        # deleted is refused by the API server's namespace lifecycle, with a 403 too).
        if code == 403 and (entry.get("annotations") or {}).get(
                "authorization.k8s.io/decision") != "allow":
            refused.append(f"{entry['verb']} {resource} in {ref.get('namespace')}")
        used.add((ref.get("apiGroup", ""), resource, entry["verb"]))
        if entry["verb"] == "patch" and code == 201:
            used.add((ref.get("apiGroup", ""), resource, "create"))  # apply that created
    return used, refused


def granted_permissions(objs: list[dict[str, Any]]) -> set[Permission]:
    return {(group, resource, verb)
            for o in objs if o["kind"] in ("ClusterRole", "Role")
            for rule in o["rules"]
            for group in rule["apiGroups"] for resource in rule["resources"]
            for verb in rule["verbs"]}


# A refusal as the Kubernetes client and kopf log it. "403" as a number of its own: not
# inside a timestamp (lastScaleTime 1795587947.143403) or an IP address.
_DENIED = re.compile(r"(?<![\d.])403(?![\d.])|Forbidden|forbidden|Not enough permissions")


def assert_least_privilege(cluster: Any, user: str, granted: set[Permission],
                           caplog: pytest.LogCaptureFixture | None = None) -> None:
    if caplog is not None:
        denied_in_log = [r.getMessage() for r in caplog.records if _DENIED.search(r.getMessage())]
        assert not denied_in_log, denied_in_log
    used, refused = used_permissions(cluster, user)
    assert not refused, refused
    assert used <= granted, sorted(used - granted)
    unused = granted - used
    assert not unused, f"granted but never used: {sorted(unused)}"


def test_the_operator_runs_a_whole_rollout_with_only_the_charts_cluster_wide_rbac(
        audited: Any, helm_home: Path, as_service_account: Any,
        token_kubeconfig: Callable[[str], tuple[str, Path]],
        caplog: pytest.LogCaptureFixture) -> None:
    from modelyard.operator.runner import OperatorThread

    installed = install_rbac(audited, helm_home, "modelyard", {})
    assert {o["kind"] for o in installed.objs} == RBAC_KINDS
    addresses = wait_for(lambda: activator_addresses(audited, installed.activator),
                         what="the chart's activator pods behind its Service")
    user = as_service_account(installed)
    activator_user, activator_config = token_kubeconfig(installed.activator)
    caplog.set_level(logging.INFO)
    with fresh_namespace(audited, prefix="rbac") as ns, OperatorThread():
        kube = Kube(audited, ns)
        drive_as(audited, user, lambda: drive_a_models_life(kube, "life"))
        drive_as(audited, user, lambda: drive_a_conversion(kube, "converted"))
        drive_as(audited, user, lambda: drive_to_zero_and_back(
            kube, "sleepy", addresses, at_zero=lambda: ask_the_activator(
                activator_config, ns, "sleepy")))
    assert any("could not read the activator at" in r.getMessage() for r in caplog.records)
    assert_least_privilege(audited, user, installed.granted(installed.operator), caplog)
    assert installed.granted(installed.activator) == {
        ("", "pods", "list"), ("modelyard.dev", "modeldeployments", "get")}
    assert_least_privilege(audited, activator_user, installed.granted(installed.activator))


def test_the_operator_runs_with_only_the_charts_namespaced_rbac(
        audited: Any, helm_home: Path, as_service_account: Any,
        token_kubeconfig: Callable[[str], tuple[str, Path]],
        caplog: pytest.LogCaptureFixture) -> None:
    from modelyard.operator.runner import OperatorThread

    with fresh_namespace(audited, prefix="scoped") as ns, \
            fresh_namespace(audited, prefix="other") as other:
        installed = install_rbac(audited, helm_home, "scoped", {"watchNamespaces": [ns]})
        roles = {(o["kind"], o["metadata"].get("namespace")) for o in installed.objs}
        assert ("Role", ns) in roles
        assert not any(o["metadata"].get("namespace") == other for o in installed.objs)
        addresses = wait_for(lambda: activator_addresses(audited, installed.activator),
                             what="the chart's activator pods behind its Service")
        user = as_service_account(installed)
        activator_user, activator_config = token_kubeconfig(installed.activator)
        caplog.set_level(logging.INFO)
        # A model in a namespace the operator may not touch: it is not even seen.
        Kube(audited, other).apply(model("elsewhere", "1", [{"weight": 50}]))
        with OperatorThread([ns]):
            kube = Kube(audited, ns)
            drive_as(audited, user, lambda: drive_a_models_life(kube, "scoped"))
            drive_as(audited, user, lambda: drive_a_conversion(kube, "converted"))
            drive_as(audited, user, lambda: drive_to_zero_and_back(
                kube, "sleepy", addresses, at_zero=lambda: ask_the_activator(
                    activator_config, ns, "sleepy")))
            assert status(Kube(audited, other), "elsewhere") == {}
        assert_least_privilege(audited, user, installed.granted(installed.operator), caplog)
        used, _ = used_permissions(audited, user)
        assert ("", "namespaces", "watch") in used  # kopf follows the namespaces it serves
        # The activator's EndpointSlices, read in the release namespace, which is not watched.
        slices_read = {(e["objectRef"].get("namespace"), e["verb"])
                       for e in audited.writes_by(user)
                       if (e.get("objectRef") or {}).get("resource") == "endpointslices"}
        assert (OPERATOR_NS, "list") in slices_read
        assert_least_privilege(audited, activator_user, installed.granted(installed.activator))


# ------------------------------------------------------------------ the node cache

CACHE = "/var/lib/modelyard/models"
CACHED_NS = "cache-restricted"


def _hostpath_pod() -> str:
    """What model pods mounted before: the cache as a hostPath of their own."""
    return yaml.safe_dump({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "hostpath-cache"},
        "spec": {
            "securityContext": {"runAsNonRoot": True, "runAsUser": 10001,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "c", "image": "pause",
                "securityContext": {"allowPrivilegeEscalation": False,
                                    "capabilities": {"drop": ["ALL"]}},
                "volumeMounts": [{"name": "node-cache", "mountPath": "/cache"}]}],
            "volumes": [{"name": "node-cache",
                         "hostPath": {"path": CACHE, "type": "DirectoryOrCreate"}}],
        },
    })


@contextlib.contextmanager
def restricted(cluster: Any) -> Iterator[Kube]:
    """The namespace, enforcing Pod Security's restricted level; deleted after, waited for."""
    cluster.kubectl("create", "namespace", CACHED_NS)
    cluster.kubectl("label", "namespace", CACHED_NS,
                    "pod-security.kubernetes.io/enforce=restricted",
                    "pod-security.kubernetes.io/enforce-version=latest")
    cluster.kubectl("wait", "--for=create", "serviceaccount/default", "-n", CACHED_NS,
                    "--timeout=30s")
    try:
        yield Kube(cluster, CACHED_NS)
    finally:
        cluster.kubectl("delete", "namespace", CACHED_NS, "--timeout=120s", timeout=150,
                        check=False)


def persistent_volume(cluster: Any, name: str) -> dict[str, Any]:
    return dict(json.loads(cluster.kubectl("get", "pv", name, "-o", "json").stdout))


def serves_from_the_node_cache(kube: Kube, cache: Any) -> None:
    """The model's replicas admitted, scheduled and running, with the namespace's claim."""
    def running() -> list[dict[str, Any]]:
        pods = kube.get("pods", selector="modelyard.dev/model-deployment=cached") or []
        up = [p for p in pods if p["status"].get("phase") == "Running"]
        return up if len(up) == REPLICAS else []

    for pod in wait_for(running, timeout=120, what="the model's pods running"):
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        assert volumes["node-cache"]["persistentVolumeClaim"] == {
            "claimName": cache.claim_name}
        assert not [v for v in volumes.values() if "hostPath" in v]
    claim = kube.get("pvc", cache.claim_name)
    assert claim["status"]["phase"] == "Bound"
    assert claim["spec"]["volumeName"] == cache.volume_name(CACHED_NS)


def test_the_node_cache_reaches_pods_where_pod_security_is_restricted(
        audited: Any, helm_home: Path, as_service_account: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from modelyard.operator.render import NodeCache
    from modelyard.operator.runner import OperatorThread

    plain = install_rbac(audited, helm_home, "plain", {})
    installed = install_rbac(audited, helm_home, "cached",
                             {"nodeCache": {"enabled": True, "maxBytes": "50Gi"}})
    added = installed.granted(installed.operator) - plain.granted(plain.operator)
    assert added == {("", "persistentvolumes", "create"), ("", "persistentvolumes", "patch"),
                     ("", "persistentvolumeclaims", "create"),
                     ("", "persistentvolumeclaims", "patch")}
    user = as_service_account(installed)
    monkeypatch.setenv("MODELYARD_NODE_CACHE_PATH", CACHE)  # as the chart's Deployment
    monkeypatch.setenv("MODELYARD_NODE_CACHE_MAX_BYTES", "50Gi")
    cache = NodeCache(CACHE, 50 * 2**30)
    volume_name = cache.volume_name(CACHED_NS)
    try:
        with OperatorThread():
            with restricted(audited) as kube:
                # The namespace refuses the old way: a pod with a hostPath of the cache.
                refused = kube.run("create", "--dry-run=server", "-f", "-",
                                   input=_hostpath_pod(), check=False)
                assert refused.returncode != 0
                assert 'violates PodSecurity "restricted:latest"' in refused.stderr
                assert 'uses restricted volume type "hostPath"' in refused.stderr
                drive_as(audited, user, lambda: (kube.apply(model("cached", "1", [{"weight": 50}])),
                                                 serves_from_the_node_cache(kube, cache)))
                volume = persistent_volume(audited, volume_name)
                assert volume["spec"]["hostPath"] == {"path": CACHE,
                                                      "type": "DirectoryOrCreate"}
                assert volume["spec"]["capacity"] == {"storage": str(50 * 2**30)}
                first_claim = volume["spec"]["claimRef"]["uid"]

            # The namespace went with its claim; the volume (Retain) keeps the files.
            wait_for(lambda: persistent_volume(audited, volume_name)["status"]["phase"]
                     == "Released", what="the volume released by the deleted claim")
            with restricted(audited) as kube:  # made again, with the same model
                drive_as(audited, user, lambda: (kube.apply(model("cached", "1", [{"weight": 50}])),
                                                 serves_from_the_node_cache(kube, cache)))
                claim_uid = kube.get("pvc", cache.claim_name)["metadata"]["uid"]
                assert claim_uid != first_claim
                volume = persistent_volume(audited, volume_name)
                assert volume["spec"]["claimRef"]["uid"] == claim_uid
    finally:
        audited.kubectl("delete", "pv", volume_name, "--wait=false", check=False)
    used, refused = used_permissions(audited, user)
    assert not refused, refused
    assert added <= used, sorted(added - used)

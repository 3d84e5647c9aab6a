"""The RBAC proof: the real operator, holding nothing but the chart's ServiceAccount token,
runs a whole canary rollout, a ``kubectl scale`` and a deletion without a single 403; and
the API server's audit log shows it used every permission the chart grants (least
privilege both ways).

These tests start a local control plane of their own whose audit policy also records the
*reads* (list, watch, get) of the operator's namespace's ServiceAccounts; the shared
``cluster`` fixture records writes only.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import ROOT, Kube, fresh_namespace, install_crd, wait_for

CHART = ROOT / "charts" / "modelyard"
OPERATOR_NS = "modelyard-system"
RBAC_KINDS = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}
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


def install_rbac(cluster: Any, home: Path, release: str,
                 values: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """Apply the chart's ServiceAccount and RBAC objects; return the SA name and them."""
    from modelyard.operator.devcluster.helm import ensure_helm

    account = "modelyard" if release == "modelyard" else f"{release}-modelyard"
    values = {**values, "leaderElection": {"enabled": True, "leaseName": lease_name(account)}}
    values_file = home / f"{release}.yaml"
    values_file.write_text(yaml.safe_dump(values))
    rendered = ensure_helm().run("template", release, str(CHART), f"--namespace={OPERATOR_NS}",
                                 f"--values={values_file}", home=home)
    objs = [o for o in yaml.safe_load_all(rendered.stdout) if o and o["kind"] in RBAC_KINDS]
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(objs))
    assert [o["metadata"]["name"] for o in objs if o["kind"] == "ServiceAccount"] == [account]
    return account, objs


@pytest.fixture
def as_service_account(audited: Any, tmp_path: Path,
                       monkeypatch: pytest.MonkeyPatch) -> Any:
    """Point in-process operators at a kubeconfig holding only the given SA's token."""

    def use(account: str) -> str:
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
        monkeypatch.setenv("KUBECONFIG", str(path))
        # What the chart's Deployment gives the operator.
        monkeypatch.setenv("MODELYARD_LEADER_ELECTION", "true")
        monkeypatch.setenv("MODELYARD_LEASE_NAME", lease_name(account))
        monkeypatch.setenv("POD_NAMESPACE", OPERATOR_NS)
        monkeypatch.setenv("POD_NAME", f"{account}-0")
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
    steps = [{"weight": 50, "pauseSeconds": 1}]
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


def drive_as(cluster: Any, user: str, kube: Kube, name: str) -> None:
    """drive_a_models_life, naming any refused request when it gets stuck."""
    try:
        drive_a_models_life(kube, name)
    except AssertionError as exc:
        _, refused = used_permissions(cluster, user)
        counts = Counter(refused)
        raise AssertionError(f"{exc}\nrequests refused to {user}: "
                             f"{', '.join(f'{r} (x{n})' for r, n in counts.items())}") from exc


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
        if code == 403:
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


def assert_least_privilege(cluster: Any, user: str, objs: list[dict[str, Any]],
                           caplog: pytest.LogCaptureFixture) -> None:
    denied_in_log = [r.getMessage() for r in caplog.records
                     if any(s in r.getMessage() for s in
                            ("403", "Forbidden", "forbidden", "Not enough permissions"))]
    assert not denied_in_log, denied_in_log
    used, refused = used_permissions(cluster, user)
    assert not refused, refused
    granted = granted_permissions(objs)
    assert used <= granted, sorted(used - granted)
    unused = granted - used
    assert not unused, f"granted but never used: {sorted(unused)}"


def test_the_operator_runs_a_whole_rollout_with_only_the_charts_cluster_wide_rbac(
        audited: Any, helm_home: Path, as_service_account: Any,
        caplog: pytest.LogCaptureFixture) -> None:
    from modelyard.operator.runner import OperatorThread

    account, objs = install_rbac(audited, helm_home, "modelyard", {})
    assert {o["kind"] for o in objs} == RBAC_KINDS
    user = as_service_account(account)
    caplog.set_level(logging.INFO)
    with fresh_namespace(audited, prefix="rbac") as ns, OperatorThread():
        drive_as(audited, user, Kube(audited, ns), "life")
    assert_least_privilege(audited, user, objs, caplog)


def test_the_operator_runs_with_only_the_charts_namespaced_rbac(
        audited: Any, helm_home: Path, as_service_account: Any,
        caplog: pytest.LogCaptureFixture) -> None:
    from modelyard.operator.runner import OperatorThread

    with fresh_namespace(audited, prefix="scoped") as ns, \
            fresh_namespace(audited, prefix="other") as other:
        account, objs = install_rbac(audited, helm_home, "scoped", {"watchNamespaces": [ns]})
        roles = {(o["kind"], o["metadata"].get("namespace")) for o in objs}
        assert ("Role", ns) in roles
        assert not any(o["metadata"].get("namespace") == other for o in objs)
        user = as_service_account(account)
        caplog.set_level(logging.INFO)
        # A model in a namespace the operator may not touch: it is not even seen.
        Kube(audited, other).apply(model("elsewhere", "1", [{"weight": 50}]))
        with OperatorThread([ns]):
            drive_as(audited, user, Kube(audited, ns), "scoped")
            assert status(Kube(audited, other), "elsewhere") == {}
        assert_least_privilege(audited, user, objs, caplog)
        used, _ = used_permissions(audited, user)
        assert ("", "namespaces", "watch") in used  # kopf follows the namespaces it serves

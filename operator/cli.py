"""``modelyard``: the command line.

* ``modelyard dev up``: the main job. A local GPU cluster (real control plane,
  kwok GPU nodes), the CRD, the operator, and the examples applied; waits until
  they are Ready, prints what to look at next, and runs until Ctrl-C.
* ``modelyard dev cluster``: just the local cluster, until Ctrl-C.
* ``modelyard operator``: run the operator (what the operator image runs).
* ``modelyard activator``: run the activator (:mod:`modelyard.activator`, scale from zero;
  the operator image runs it too, with the ``activator`` extra).
* ``modelyard build-binaries``: build and cache the cluster binaries now.
* ``modelyard build-node``: build and cache a real node's binaries and images now.
* ``modelyard status|history|promote NAME -n NS``: look at and steer a ModelDeployment.
* ``modelyard chat NAME -n NS``: talk to a generative model, streamed in the terminal.
* ``modelyard convert SOURCE -o PACKAGE``: compile a model into a verified AOTInductor
  package (:mod:`modelyard.runtime.convert`; needs the ``runtime`` extra, and ``convert``
  to quantise).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .devcluster import LocalCluster
    from .devcluster.pods import PodProcesses
    from .runner import OperatorThread

DEFAULT_STATE_DIR = Path(".modelyard")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modelyard", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    dev = sub.add_parser("dev", help="a local GPU cluster for development and demos")
    dev_sub = dev.add_subparsers(dest="dev_command", required=True)
    for name, text in (("up", "cluster + CRD + operator + examples (the main job)"),
                       ("cluster", "only the local cluster")):
        p = dev_sub.add_parser(name, help=text)
        p.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR,
                       help="where the kubeconfig, logs and etcd data live (default .modelyard)")
        p.add_argument("--topology", type=Path, help="YAML file of node pools")
        p.add_argument("--exit-when-ready", action="store_true",
                       help="stop (cleanly) once everything is ready instead of waiting")
        if name == "up":
            p.add_argument("--examples", type=Path, default=Path("examples"),
                           help="manifests to apply (default examples/)")
            p.add_argument("--timeout", type=float, default=180.0,
                           help="seconds to wait for the examples to become Ready")

    op = sub.add_parser("operator", help="run the operator")
    op.add_argument("--namespace", "-n", action="append", default=[],
                    help="watch only this namespace (repeatable); default all")
    op.add_argument("--liveness", default=os.environ.get("MODELYARD_LIVENESS"),
                    help="serve a liveness probe at this URL, e.g. http://0.0.0.0:8081/healthz")
    sub.add_parser("activator", add_help=False,
                   help="run the activator (scale from zero); `modelyard activator --help`")
    sub.add_parser("convert", add_help=False,
                   help="compile a model into a verified AOTInductor package (format aoti); "
                        "`modelyard convert --help`")
    sub.add_parser("build-binaries", help="build and cache the local cluster's binaries")
    sub.add_parser("build-node", help="build and cache a real node's binaries (kubelet, "
                   "kube-proxy, containerd) and images (operator, runtime, pause)")
    for name, text in (("status", "a ModelDeployment's state in a few lines"),
                       ("history", "the versions a ModelDeployment has served"),
                       ("promote", "promote the rollout in progress now"),
                       ("abort", "abort the rollout in progress: all traffic back to stable"),
                       ("retry", "roll the rolled-back version out again"),
                       ("rollback", "go back to a version that served before")):
        p = sub.add_parser(name, help=text)
        p.add_argument("name")
        p.add_argument("--namespace", "-n", default="default")
        if name == "rollback":
            p.add_argument("--to", help="the version to go back to (default: the last one "
                                        "that served before the current)")

    chat = sub.add_parser(
        "chat", help="talk to a generative model (runtime.engine vllm): each line a turn, "
                     "the reply streamed as it comes, the conversation kept; Ctrl-D ends")
    chat.add_argument("name")
    chat.add_argument("--namespace", "-n", default="default")
    chat.add_argument("--url", help="the model's endpoint (e.g. a port-forward's "
                                    "http://127.0.0.1:8080); default: its status.url")
    chat.add_argument("--api-key", default=None,
                      help="sent as a Bearer token (default $MODELYARD_API_KEY)")
    chat.add_argument("--system", help="a system message that opens the conversation")
    chat.add_argument("--max-tokens", type=int, help="longest reply, in tokens")
    chat.add_argument("--temperature", type=float, help="sampling temperature")
    chat.add_argument("--param", action="append", default=[], metavar="KEY=JSON",
                      help="a further request field, e.g. top_p=0.9 (repeatable)")

    digest = sub.add_parser(
        "digest", help="write a model directory's SHA256SUMS manifest and print its digest "
                       "(spec.model.sha256 of a format hf model)")
    digest.add_argument("directory")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["activator"]:  # its own flags: see modelyard.activator.settings
        return _run_activator(argv[1:])
    if argv[:1] == ["convert"]:  # its own flags: see modelyard.runtime.convert
        from modelyard.runtime.convert import main as convert_main

        return convert_main(argv[1:])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kopf").setLevel(logging.WARNING)
    if args.command in DEV_COMMANDS and not _has_devcluster():
        print(f"modelyard: `{args.command}` is development tooling (the local cluster), which "
              "the product package does not ship: run it from a source checkout (`make run`, "
              "docs/development.md)", file=sys.stderr)
        return 2
    if args.command == "build-binaries":
        from .devcluster import ensure_binaries

        print(ensure_binaries().root)
        return 0
    if args.command == "build-node":
        from .devcluster.nodeartefacts import build_node_artefacts

        built = build_node_artefacts()
        print(built.binaries.root)
        for image in (built.images.base, *built.images.all()):
            size = image.archive.stat().st_size / 1e6
            print(f"{image.name}\t{size:.0f} MB\t{image.archive}")
        return 0
    if args.command == "operator":
        return _run_operator(args.namespace, args.liveness)
    if args.command == "digest":
        from modelyard.runtime import modeldir

        print(modeldir.write_manifest(Path(args.directory)))
        return 0
    if args.command == "chat":
        return _chat(parser, args)
    if args.command in ("status", "history", "promote", "abort", "retry", "rollback"):
        import functools

        from . import usercli

        commands: dict[str, Callable[[str, str], None]] = {
            "status": usercli.show_status, "history": usercli.show_history,
            "promote": usercli.promote, "abort": usercli.abort, "retry": usercli.retry,
            "rollback": functools.partial(usercli.rollback, to=getattr(args, "to", None)),
        }
        command = commands[args.command]
        try:
            command(args.name, args.namespace)
        except usercli.CommandError as exc:
            print(f"modelyard: {exc}", file=sys.stderr)
            return exc.code
        return 0
    return _dev(args)


DEV_COMMANDS = ("dev", "build-binaries", "build-node")


def _chat(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    import json

    from . import usercli

    logging.getLogger("httpx").setLevel(logging.WARNING)  # no log line per turn
    params = {}
    for item in args.param:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            parser.error(f"--param {item!r}: expected KEY=JSON, e.g. top_p=0.9")
        try:
            params[key] = json.loads(raw)
        except ValueError:
            params[key] = raw  # a bare word is a string
    options = {"system": args.system, "max_tokens": args.max_tokens,
               "temperature": args.temperature, "params": params}
    try:
        return usercli.chat(args.name, args.namespace, url=args.url, api_key=args.api_key,
                            options=options)
    except usercli.CommandError as exc:
        print(f"modelyard: {exc}", file=sys.stderr)
        return exc.code


def _has_devcluster() -> bool:
    """The local cluster is in a source checkout (an editable install), not in the wheel."""
    import importlib.util

    return importlib.util.find_spec("modelyard.operator.devcluster") is not None


def _run_operator(namespaces: list[str], liveness: str | None) -> int:
    """Leader election follows MODELYARD_LEADER_ELECTION & co. (see leader.py)."""
    from kubernetes.config import ConfigException

    from .kube import load_api_client
    from .runner import OperatorThread

    try:
        load_api_client()
    except (ConfigException, OSError) as exc:
        print(f"modelyard: no Kubernetes credentials: not in a pod, and no usable kubeconfig "
              f"($KUBECONFIG or ~/.kube/config): {exc}", file=sys.stderr)
        return 1

    with _stop_on_signals() as stop, OperatorThread(namespaces, liveness=liveness):
        stop.wait()
    return 0


def _run_activator(argv: list[str]) -> int:
    """The activator is its own package (``modelyard.activator``) with its own extra."""
    try:
        from modelyard.activator.server import main as activator_main
    except ModuleNotFoundError as exc:
        print(f"modelyard: the activator needs the `activator` extra "
              f"(pip install 'modelyard[activator]'): {exc}", file=sys.stderr)
        return 1
    return activator_main(argv)


def _dev(args: argparse.Namespace) -> int:
    from .devcluster import ClusterConfig, ClusterStartError, LocalCluster, load_topology
    from .devcluster.topology import DEFAULT_TOPOLOGY

    topology = load_topology(args.topology) if args.topology else DEFAULT_TOPOLOGY
    state = args.state_dir.resolve()
    cluster = LocalCluster(ClusterConfig(topology=topology, data_dir=state / "cluster",
                                         real_pods=args.dev_command == "up"))
    with _stop_on_signals() as stop:
        try:
            cluster.start()
        except ClusterStartError as exc:
            print(f"modelyard: the local cluster failed to start:\n{exc}", file=sys.stderr)
            return 1
        operators: list[OperatorThread] = []
        supervisors: list[PodProcesses] = []
        try:
            print(f"modelyard: cluster up in {cluster.started_in_s:.1f} s "
                  f"(Kubernetes at {cluster.server})")
            if args.dev_command == "up":
                code = _up(cluster, args, stop, operators, supervisors)
                if code:
                    return code
            _print_next_steps(cluster, args.dev_command == "up")
            if not args.exit_when_ready:
                print("modelyard: running; Ctrl-C stops everything")
                stop.wait()
        finally:
            print("modelyard: stopping")
            for operator in operators:
                with contextlib.suppress(RuntimeError):
                    operator.stop()
            for supervisor in supervisors:
                supervisor.stop()
            cluster.stop()
    return 0


def _up(cluster: LocalCluster, args: argparse.Namespace, stop: threading.Event,
        operators: list[OperatorThread], supervisors: list[PodProcesses]) -> int:
    from .devcluster import ClusterStartError
    from .devcluster.pods import PodProcesses
    from .runner import OperatorThread

    os.environ["KUBECONFIG"] = str(cluster.kubeconfig)
    try:
        cluster.install_crd()
    except ClusterStartError as exc:
        print(f"modelyard: {exc}", file=sys.stderr)
        return 1
    operator = OperatorThread()
    operators.append(operator)
    operator.start()
    print("modelyard: operator running")
    models_dir = args.state_dir.resolve() / "models"
    for built in _demo_models(args.examples, models_dir):
        print(f"modelyard: demo model written to {built}")
    pods = PodProcesses(cluster, models_dir=models_dir,
                        log_dir=args.state_dir.resolve() / "pods")
    pods.start()
    supervisors.append(pods)
    applied = cluster.kubectl("apply", "-R", "-f", str(args.examples), check=False)
    if applied.returncode != 0:
        print(f"modelyard: applying {args.examples} failed:\n{applied.stderr}", file=sys.stderr)
        return 1
    print(applied.stdout.strip())
    started = time.monotonic()
    deadline = started + args.timeout
    while time.monotonic() < deadline and not stop.is_set():
        waited = cluster.kubectl("wait", "--for=condition=Ready", "md", "--all",
                                 "--all-namespaces", "--timeout=5s", check=False)
        if waited.returncode == 0:
            print(f"modelyard: every ModelDeployment is Ready "
                  f"({time.monotonic() - started:.1f} s after apply)")
            return _predict(cluster, pods, deadline, stop)
    print("modelyard: not every ModelDeployment became Ready in time:", file=sys.stderr)
    print(cluster.kubectl("get", "md", "-A", "-o", "wide", check=False).stdout, file=sys.stderr)
    return 1


def _demo_models(examples: Path, models_dir: Path) -> list[Path]:
    """Write the demo ResNet-18 wherever an example points at a missing file:///models/ file,
    in the example's format (``export``, ``aoti`` or the legacy ``torchscript``)."""
    import yaml

    from .devcluster.pods import MODELS_MOUNT

    built = []
    files = [examples] if examples.is_file() else sorted(examples.rglob("*.y*ml"))
    for path in files:
        for doc in yaml.safe_load_all(path.read_text()):
            if not isinstance(doc, dict) or doc.get("kind") != "ModelDeployment":
                continue
            model = doc.get("spec", {}).get("model", {})
            uri = str(model.get("uri", ""))
            if not uri.startswith(f"file://{MODELS_MOUNT}"):
                continue
            target = models_dir / uri.removeprefix(f"file://{MODELS_MOUNT}")
            if not target.exists():
                from modelyard.runtime.demo import build

                batching = doc.get("spec", {}).get("runtime", {}).get("batching", {})
                built.append(build(target, size=64,
                                   format=str(model.get("format", "torchscript")),
                                   max_batch=int(batching.get("maxBatchSize", 32))))
    return built


def _predict(cluster: LocalCluster, pods: PodProcesses, deadline: float,
             stop: threading.Event) -> int:
    """Send one real inference to every runtime pod and show who answered."""
    import json

    import httpx
    import numpy as np

    from modelyard.runtime.client import Client

    listing = json.loads(cluster.kubectl(
        "get", "pods", "-A", "-l", "app.kubernetes.io/managed-by=modelyard", "-o", "json").stdout)
    where = {f"{p['metadata']['namespace']}/{p['metadata']['name']}":
             (p["spec"].get("nodeName", "?"),
              next(e["value"] for e in p["spec"]["containers"][0]["env"]
                   if e["name"] == "MODELYARD_MODEL_NAME"))
             for p in listing["items"]}
    while not set(where) <= set(pods.endpoints()):  # kwok is faster than a process start
        if time.monotonic() > deadline or stop.is_set():
            print("modelyard: runtime processes did not start for every pod", file=sys.stderr)
            return 1
        time.sleep(0.2)
    answered = 0
    for key, (ip, port) in sorted(pods.endpoints().items()):
        if key not in where:
            continue
        node, model = where[key]
        with Client(f"http://{ip}:{port}", model, timeout=30) as client:
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if client.ready():
                        break
                if time.monotonic() > deadline or stop.is_set():
                    print(f"modelyard: the runtime of {key} did not become ready; see "
                          f"its log in {pods.log_dir}", file=sys.stderr)
                    return 1
                time.sleep(0.5)
            meta = client.metadata()["inputs"][0]
            shape = [1 if d == -1 else d for d in meta["shape"]]
            image = np.random.default_rng(0).random(shape, dtype=np.float32)
            began = time.monotonic()
            outputs = client.infer({meta["name"]: image})
            took = (time.monotonic() - began) * 1000
        scores = next(iter(outputs.values()))[0]
        top = np.argsort(scores)[::-1][:3].tolist()
        print(f"modelyard: {model} answered from pod {key} on node {node} at {ip}:{port} "
              f"in {took:.0f} ms: top classes {top}")
        answered += 1
    if not answered:
        print("modelyard: no runtime pod answered", file=sys.stderr)
        return 1
    return 0


def _print_next_steps(cluster: LocalCluster, with_models: bool) -> None:
    print()
    print(cluster.kubectl("get", "nodes", "-L", "nvidia.com/gpu.product", check=False).stdout)
    if with_models:
        print(cluster.kubectl("get", "md", "-A", check=False).stdout)
        print(cluster.kubectl("get", "pods", "-A", "-l", "app.kubernetes.io/managed-by=modelyard",
                              "-o", "wide", check=False).stdout)
    kubectl = cluster.binaries.path("kubectl")
    print("Try it (in another terminal):")
    print(f"  export KUBECONFIG={cluster.kubeconfig}")
    print(f"  alias kubectl={kubectl}")
    print("  kubectl get md -A")
    print("  kubectl describe md resnet -n vision")
    print("  kubectl get pods -A -o wide")
    ip = cluster.kubectl("get", "pods", "-n", "vision", "-o", "jsonpath={.items[0].status.podIP}",
                         check=False).stdout.strip() if with_models else ""
    if ip:
        print(f"  curl http://{ip}:8080/v2/models/resnet   # a pod's own address: its runtime")
        print(f"  open http://{ip}:8080/ in a browser      # try the model")
        print("  kubectl get endpointslices -n vision        # the Service's ready endpoints")
    print()


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[threading.Event]:
    stop = threading.Event()

    def handler(signum: int, frame: object) -> None:
        stop.set()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


if __name__ == "__main__":
    raise SystemExit(main())

"""``modelyard``: the command line.

* ``modelyard dev up``: the main job. A local GPU cluster (real control plane,
  kwok GPU nodes), the CRD, the operator, and the examples applied; waits until
  they are Ready, prints what to look at next, and runs until Ctrl-C.
* ``modelyard dev cluster``: just the local cluster, until Ctrl-C.
* ``modelyard operator``: run the operator (what the operator image runs).
* ``modelyard build-binaries``: build and cache the cluster binaries now.
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
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .crd import CRD_FILE, render_yaml

if TYPE_CHECKING:
    from .devcluster import LocalCluster
    from .runner import OperatorThread

DEFAULT_STATE_DIR = Path(".modelyard")


def main(argv: Sequence[str] | None = None) -> int:
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
    sub.add_parser("build-binaries", help="build and cache the local cluster's binaries")

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kopf").setLevel(logging.WARNING)
    if args.command == "build-binaries":
        from .devcluster import ensure_binaries

        print(ensure_binaries().root)
        return 0
    if args.command == "operator":
        return _run_operator(args.namespace)
    return _dev(args)


def _run_operator(namespaces: list[str]) -> int:
    from .runner import OperatorThread

    with _stop_on_signals() as stop, OperatorThread(namespaces):
        stop.wait()
    return 0


def _dev(args: argparse.Namespace) -> int:
    from .devcluster import ClusterConfig, ClusterStartError, LocalCluster, load_topology
    from .devcluster.topology import DEFAULT_TOPOLOGY

    topology = load_topology(args.topology) if args.topology else DEFAULT_TOPOLOGY
    state = args.state_dir.resolve()
    cluster = LocalCluster(ClusterConfig(topology=topology, data_dir=state / "cluster"))
    with _stop_on_signals() as stop:
        try:
            cluster.start()
        except ClusterStartError as exc:
            print(f"modelyard: the local cluster failed to start:\n{exc}", file=sys.stderr)
            return 1
        operators: list[OperatorThread] = []
        try:
            print(f"modelyard: cluster up in {cluster.started_in_s:.1f} s "
                  f"(Kubernetes at {cluster.server})")
            if args.dev_command == "up":
                code = _up(cluster, args, stop, operators)
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
            cluster.stop()
    return 0


def _up(cluster: LocalCluster, args: argparse.Namespace, stop: threading.Event,
        operators: list[OperatorThread]) -> int:
    from .runner import OperatorThread

    os.environ["KUBECONFIG"] = str(cluster.kubeconfig)
    crd = cluster.kubectl("apply", "--server-side", "-f", "-", input=render_yaml(), check=False)
    if crd.returncode != 0:
        print(f"modelyard: installing the CRD failed: {crd.stderr}", file=sys.stderr)
        return 1
    cluster.kubectl("wait", "--for=condition=Established", f"crd/{CRD_FILE[:-5]}",
                    "--timeout=30s")
    operator = OperatorThread()
    operators.append(operator)
    operator.start()
    print("modelyard: operator running")
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
            return 0
    print("modelyard: not every ModelDeployment became Ready in time:", file=sys.stderr)
    print(cluster.kubectl("get", "md", "-A", "-o", "wide", check=False).stdout, file=sys.stderr)
    return 1


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

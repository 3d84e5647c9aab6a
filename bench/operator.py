"""The operator at scale (issue #16): N ModelDeployments of one replica applied at once, on
the local cluster, against the same N plain Deployments + Services with no operator.

    .venv/bin/python -m bench.operator --n 100             # ~9 min on 2 shared cores
    .venv/bin/python -m bench.operator --n 100 --n 1000    # ~30 min more

For each N, on a fresh local cluster (kwok nodes, enough of them for 2N pods):

1. **The limit.** The Deployments and Services the operator would render for the N models
   (``render.render_deployment`` / ``render_service``, without owner references or our
   labels) applied with one ``kubectl apply``: time until all N Deployments are available.
   Then the same Deployments with the next version's pod template: time until all are
   rolled out. This is what the cluster's own controllers can do; the namespace is then
   deleted.
2. **The operator**, as the image runs it (``modelyard operator``, a process of its own,
   every setting at its default), started before the apply. The N ModelDeployments applied
   with one ``kubectl apply``: time until all are Ready at their generation; the
   operator's CPU-seconds (``/proc``) over that, per model; its peak RSS (``VmHWM``).
3. **At rest**: after the operator has settled (a quiet spell: no write of its own in the
   audit log for 15 s), a 310 s window (one whole default resync period): its writes
   there (the API server's audit log, user ``modelyard-operator``) and its CPU share.
4. **Version bump**: all N ModelDeployments to version 2 in one apply: time until every
   one reports version 2 Stable and Ready; CPU over that.
5. **Handler failures**: kopf's "Handler ... failed" lines and every traceback in the
   operator's log, by exception.

Times come from watches (``kubectl get -w``), stamped as the API server reports each
change. Nothing here asserts a timing: it prints a table and writes JSON and markdown to
``bench/results/``. On a shared machine, wall-clock figures are indicative.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime as dt
import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from bench import write_results
from bench.cluster import Watch, install_crd, wait_for
from modelyard.operator import api, api_status, render
from modelyard.operator.devcluster.pki import OPERATOR_USER
from modelyard.operator.devcluster.ports import reserve_port

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PODS_PER_NODE = 110
# The at-rest window covers one whole resync period of the operator's default (300 s), so
# the resync's cost is in the figure, not only the quiet between two resyncs.
AT_REST_S = 310.0
QUIET_S = 15.0  # no operator write for this long: settled, the at-rest window may start
TICK = os.sysconf("SC_CLK_TCK")
Objects = dict[str, tuple[str, ...]]


# ================================================================ the objects


def names(n: int) -> list[str]:
    return [f"m{i:04d}" for i in range(n)]


def model_manifests(n: int, version: str) -> str:
    return yaml.safe_dump_all({
        "apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": name},
        "spec": {"model": {"version": version, "uri": f"file:///models/{name}/{version}/m.pt"},
                 "resources": {"gpu": {"count": 0}}, "replicas": 1},
    } for name in names(n))


def plain_manifests(n: int, namespace: str, version: str) -> str:
    """What the operator renders for the same models, as plain objects that nothing owns
    (and that the operator's label selectors do not match). The Deployment keeps the name
    of version 1 and its (immutable) selector, so version 2 is a rolling update of the
    same Deployment: a new pod template."""
    docs: list[dict[str, Any]] = []
    for name in names(n):
        owner = render.Owner(name, namespace, "")
        deployment, first = (render.render_deployment(owner, api.parse_spec({
            "model": {"version": v, "uri": f"file:///models/{name}/{v}/m.pt"},
            "resources": {"gpu": {"count": 0}}, "replicas": 1}), 1) for v in (version, "1"))
        deployment["metadata"]["name"] = first["metadata"]["name"]
        deployment["spec"]["selector"] = first["spec"]["selector"]
        deployment["spec"]["template"]["metadata"]["labels"] = \
            first["spec"]["template"]["metadata"]["labels"]
        for obj in (deployment, render.render_service(owner)):
            obj["metadata"].pop("ownerReferences", None)
            obj["metadata"].get("labels", {}).pop(render.MANAGED_BY, None)
            docs.append(obj)
    # JSON, not PyYAML: a spec-hash annotation such as 0123456789012345 or 1234e56789012345
    # is a string to PyYAML's YAML 1.1, which leaves it unquoted, and a number to kubectl
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": docs})


def md_fields(md: dict[str, Any]) -> tuple[str, ...]:
    """(Ready, at its generation, newest version, its phase) of a ModelDeployment."""
    status = md.get("status") or {}
    ready = next((c.get("status", "") for c in status.get("conditions") or []
                  if c.get("type") == "Ready"), "")
    current = status.get("observedGeneration") == (md.get("metadata") or {}).get("generation")
    newest = (status.get("versions") or [{}])[0]
    return ready, str(current), str(newest.get("version", "")), str(newest.get("phase", ""))


def deployment_fields(deployment: dict[str, Any]) -> tuple[str, ...]:
    """(generation, observed, replicas, updated, available) of a Deployment."""
    status = deployment.get("status") or {}
    return (str((deployment.get("metadata") or {}).get("generation")),
            str(status.get("observedGeneration")), str(status.get("replicas", 0)),
            str(status.get("updatedReplicas", 0)), str(status.get("availableReplicas", 0)))


def all_ready(n: int) -> Callable[[Objects], bool]:
    return lambda objects: len(objects) == n and all(
        f[0] == "True" and f[1] == "True" for f in objects.values())


def all_stable(n: int, version: str) -> Callable[[Objects], bool]:
    return lambda objects: len(objects) == n and all(
        f == ("True", "True", version, api_status.VersionPhase.STABLE) for f in objects.values())


def all_available(n: int, generation: str) -> Callable[[Objects], bool]:
    return lambda objects: len(objects) == n and all(
        f == (generation, generation, "1", "1", "1") for f in objects.values())


# ================================================================ the operator process


@dataclass
class Usage:
    cpu_s: float  # user + system, since the process started
    rss_mb: float
    peak_rss_mb: float


class OperatorProcess:
    """``modelyard operator`` as the image runs it, with the operator's own credentials;
    its log in ``log_path``."""

    def __init__(self, cluster: Any, log_path: Path):
        self.log_path = log_path
        port = reserve_port()
        self.liveness = f"http://127.0.0.1:{port}/healthz"
        env = {k: v for k, v in os.environ.items() if not k.startswith("MODELYARD_")}
        env["KUBECONFIG"] = str(cluster.operator_kubeconfig)
        self._log = log_path.open("w")
        self.process = subprocess.Popen(
            [str(Path(sys.executable).parent / "modelyard"), "operator",
             "--liveness", self.liveness],
            stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def wait_started(self) -> None:
        def up() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"the operator exited: {self.log_path.read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(self.liveness, timeout=2).status_code == 200
            return False
        wait_for(up, timeout=120, what="the operator's liveness probe", interval=0.5)

    def usage(self) -> Usage:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        status = dict(line.split(":", 1) for line in
                      Path(f"/proc/{self.process.pid}/status").read_text().splitlines()
                      if ":" in line)
        return Usage((int(fields[11]) + int(fields[12])) / TICK,
                     int(status["VmRSS"].split()[0]) / 1024,
                     int(status["VmHWM"].split()[0]) / 1024)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self._log.close()


def handler_failures(log_text: str) -> dict[str, int]:
    """kopf's retried handler failures, and every traceback's exception, by kind."""
    found: collections.Counter[str] = collections.Counter()
    found["kopf handler failures (retried)"] = len(re.findall(r"Handler '[^']+' failed",
                                                             log_text))
    found["'could not check for the Gateway API'"] = log_text.count(
        "could not check for the Gateway API")
    for block in log_text.split("Traceback (most recent call last):")[1:]:
        last = next((line for line in block.splitlines()
                     if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b", line)), "?")
        found[f"traceback: {last[:80]}"] += 1
    return {k: v for k, v in found.items() if v}


class Profile:
    """``py-spy record`` of the operator process over one phase (``--profile``): the
    collapsed stacks (samples of threads on a CPU; idle ones are left out) to ``path``."""

    def __init__(self, pid: int, path: Path, duration_s: float | None = None):
        self.path = path
        argv = [str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(pid),
                "--format", "raw", "--output", str(path), "--rate", "50", "--nonblocking",
                "--full-filenames"]
        if duration_s is not None:
            argv += ["--duration", str(math.ceil(duration_s))]
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)

    def stop(self) -> dict[str, Any]:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        self.process.wait(120)
        return summarize_profile(self.path) if self.path.exists() else {}


def summarize_profile(path: Path, top: int = 12) -> dict[str, Any]:
    """Where the samples are: by package (the innermost frame of ours, kopf's, the
    kubernetes client's... that each sample is in, for what the time is spent on) and the
    functions that hold the most samples, inclusive of what they call."""
    packages: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        samples = int(count)
        total += samples
        frames = [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")]
        packages[_package(frames)] += samples
        for frame in set(frames):
            inclusive[frame] += samples
    def share(n: int) -> float:
        return round(100 * n / total, 1) if total else 0.0
    return {"samples": total,
            "by_package_pct": {k: share(v) for k, v in packages.most_common()},
            "top_inclusive_pct": dict(itertools.islice(
                ((k.replace(f"{ROOT}/", ""), share(v)) for k, v in inclusive.most_common()
                 if f"{ROOT}/operator/" in k), top))}


_PACKAGES = (("modelyard", f"{ROOT}/operator/"), ("pydantic", "/pydantic"),
             ("kubernetes client", "/kubernetes/"), ("kopf", "/kopf/"),
             ("aiohttp", "/aiohttp/"), ("urllib3", "/urllib3/"), ("json", "/json/"),
             ("asyncio", "/asyncio/"), ("logging", "/logging/"), ("yaml", "/yaml/"))


def _package(frames: list[str]) -> str:
    """The package of the innermost frame that belongs to a known one."""
    for frame in reversed(frames):
        for name, marker in _PACKAGES:
            if marker in frame:
                return name
    return "other"


# ================================================================ one N


@dataclass
class Stopwatch:
    """A watch of one kind in one namespace, and the time of one change to it."""

    cluster: Any
    namespace: str

    def watch(self, kind: str, fields: Callable[[dict[str, Any]], tuple[str, ...]]) -> Watch:
        watch = Watch([str(self.cluster.binaries.path("kubectl")),
                       f"--kubeconfig={self.cluster.kubeconfig}", "-n", self.namespace,
                       "get", kind, "--watch", "--output-watch-events", "-o", "json"], fields)
        watch.start()
        return watch

    def apply(self, manifest: str) -> tuple[float, float]:
        """``kubectl apply`` as a user runs it: (when it started, how long it took). An
        apply that fails part-way (a busy API server times a request out) is run again, as
        a user would; the time counts from the first."""
        start = time.monotonic()
        for attempt in range(3):
            done = self.cluster.kubectl("-n", self.namespace, "apply", "-f", "-",
                                        input=manifest, timeout=1800, check=False)
            if done.returncode == 0:
                break
            print(f"  kubectl apply failed (attempt {attempt + 1}): {done.stderr[-600:]}",
                  flush=True)
        else:
            raise RuntimeError("kubectl apply failed three times")
        return start, time.monotonic() - start


def until(watch: Watch, after: float, holds: Callable[[Objects], bool], what: str,
          timeout: float) -> float:
    """Seconds from ``after`` until ``holds`` first held (as the watch stamped it)."""
    wait_for(lambda: holds(watch.state()), timeout=timeout, what=what, interval=1.0)
    stamp = watch.first(after, holds)
    assert stamp is not None
    return stamp - after


class OperatorWrites:
    """The operator's writes in the API server's audit log, read on from where the last
    call stopped (the log only grows, until it is rotated)."""

    def __init__(self, cluster: Any):
        self.path: Path = cluster.audit_log
        self.offset = 0
        self.entries: list[tuple[float, dict[str, Any]]] = []

    def read(self) -> list[tuple[float, dict[str, Any]]]:
        size = self.path.stat().st_size if self.path.exists() else 0
        if size < self.offset:  # rotated
            self.offset = 0
        with self.path.open("rb") as handle:
            handle.seek(self.offset)
            chunk = handle.read(size - self.offset)
        complete = chunk[:chunk.rfind(b"\n") + 1]
        self.offset += len(complete)
        for line in complete.splitlines():
            if OPERATOR_USER.encode() not in line:
                continue
            entry = json.loads(line)
            if entry.get("user", {}).get("username") == OPERATOR_USER:
                stamp = dt.datetime.fromisoformat(entry["stageTimestamp"]).timestamp()
                self.entries.append((stamp, entry))
        return self.entries

    def between(self, start: float, end: float) -> list[dict[str, Any]]:
        return [entry for stamp, entry in self.read() if start <= stamp <= end]

    def settle(self, timeout: float) -> float:
        """Wait for a quiet spell (no operator write for QUIET_S); seconds it took."""
        start = time.time()

        def quiet() -> bool:
            now = time.time()
            return now - start >= QUIET_S and not self.between(now - QUIET_S, now)
        wait_for(quiet, timeout=timeout, what="a quiet spell", interval=2.0)
        return time.time() - start


def _describe(write: dict[str, Any]) -> str:
    ref = write["objectRef"]
    sub = f"/{ref['subresource']}" if ref.get("subresource") else ""
    return f"{write['verb']} {ref.get('resource')}{sub}"


def nodes_for(n: int) -> int:
    return math.ceil(2.2 * n / PODS_PER_NODE) + 1  # room for both versions in a bump


@contextlib.contextmanager
def local_cluster(n: int) -> Iterator[Any]:
    from modelyard.operator.devcluster import ClusterConfig, LocalCluster, NodePool

    pools = (NodePool("cpu", count=nodes_for(n), cpu="512", memory="4Ti",
                      pods=PODS_PER_NODE),)
    with LocalCluster(ClusterConfig(topology=pools)) as cluster:
        install_crd(cluster)
        yield cluster


def limit_part(cluster: Any, n: int, timeout: float) -> dict[str, Any]:
    """The same objects with no operator: what the cluster's own controllers can do."""
    out: dict[str, Any] = {}
    with cluster.fresh_namespace("limit") as namespace:
        limit = Stopwatch(cluster, namespace)
        watch = limit.watch("deployments", deployment_fields)
        try:
            start, out["limit_apply_s"] = limit.apply(plain_manifests(n, namespace, "1"))
            out["limit_ready_s"] = until(watch, start, all_available(n, "1"),
                                         "all plain Deployments available", timeout)
            print(f"  limit: {n} available after {out['limit_ready_s']:.1f} s", flush=True)
            start, out["limit_bump_apply_s"] = limit.apply(plain_manifests(n, namespace, "2"))
            out["limit_bump_s"] = until(watch, start, all_available(n, "2"),
                                        "all plain Deployments rolled out", timeout)
            print(f"  limit: {n} rolled out after {out['limit_bump_s']:.1f} s", flush=True)
        finally:
            watch.stop()
    cluster.kubectl("delete", "namespace", namespace, "--wait=true", timeout=1800)
    return out


def operator_part(cluster: Any, n: int, timeout: float, operator: OperatorProcess, *,
                  rest_s: float, profile_dir: Path | None) -> dict[str, Any]:
    out: dict[str, Any] = {"rest_window_s": rest_s}

    def profile(phase: str, duration_s: float | None = None) -> Profile | None:
        return None if profile_dir is None else Profile(
            operator.process.pid, profile_dir / f"operator-{n}-{phase}.txt", duration_s)

    audit = OperatorWrites(cluster)
    with cluster.fresh_namespace("models") as namespace:
        models = Stopwatch(cluster, namespace)
        watch = models.watch("md", md_fields)
        try:
            before, profiling = operator.usage(), profile("create")
            start, out["apply_s"] = models.apply(model_manifests(n, "1"))
            out["ready_s"] = until(watch, start, all_ready(n), "all Ready", timeout)
            after = operator.usage()
            if profiling:
                out["profile_create"] = profiling.stop()
            out["cpu_per_model_s"] = (after.cpu_s - before.cpu_s) / n
            out["peak_rss_create_mb"] = after.peak_rss_mb
            print(f"  operator: {n} Ready after {out['ready_s']:.1f} s", flush=True)

            out["settle_s"] = audit.settle(timeout)
            rest_start, before, profiling = time.time(), operator.usage(), profile("rest", rest_s)
            time.sleep(rest_s)  # the measurement window itself
            rest_end, after = time.time(), operator.usage()
            if profiling:
                out["profile_rest"] = profiling.stop()
            writes = audit.between(rest_start, rest_end)
            out["rest_writes"] = len(writes)
            out["rest_writes_by_kind"] = dict(collections.Counter(map(_describe, writes)))
            out["rest_cpu_pct"] = 100 * (after.cpu_s - before.cpu_s) / (rest_end - rest_start)
            out["rest_rss_mb"] = after.rss_mb
            print(f"  at rest: {len(writes)} writes, {out['rest_cpu_pct']:.1f} % CPU",
                  flush=True)

            before = operator.usage()
            start, out["bump_apply_s"] = models.apply(model_manifests(n, "2"))
            out["bump_s"] = until(watch, start, all_stable(n, "2"),
                                  "all at version 2, Stable", timeout)
            after = operator.usage()
            out["bump_cpu_per_model_s"] = (after.cpu_s - before.cpu_s) / n
            out["peak_rss_mb"] = after.peak_rss_mb
            print(f"  operator: {n} at version 2 after {out['bump_s']:.1f} s", flush=True)
        finally:
            watch.stop()
    return out


def run_one(n: int, workdir: Path, rest_s: float, profile_dir: Path | None, *,
            limit: bool = True) -> dict[str, Any]:
    timeout = 120 + 2.0 * n
    out: dict[str, Any] = {"n": n, "nodes": nodes_for(n)}
    with local_cluster(n) as cluster:
        if limit:
            out |= limit_part(cluster, n, timeout)
        operator = OperatorProcess(cluster, workdir / f"operator-{n}.log")
        try:
            operator.wait_started()
            out |= operator_part(cluster, n, timeout, operator, rest_s=rest_s,
                                 profile_dir=profile_dir)
        finally:
            # Failures while it ran. What its stop logs is told apart: when asyncio.run ends,
            # loop.shutdown_asyncgens closes kopf's abandoned watch generators in no set
            # order, and CPython then logs "generator didn't stop after athrow()" for a
            # watch whose inner context manager was closed first: noise after kopf stopped,
            # not a failed or lost watch.
            running = operator.log_path.read_text()
            operator.stop()
            out["failures"] = handler_failures(running)
            out["failures_at_stop"] = handler_failures(
                operator.log_path.read_text()[len(running):])
    return out


# ================================================================ the table


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "—"


def _s(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f} s"


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def render_markdown(results: dict[str, Any]) -> str:
    runs = results["runs"]
    head = "| | " + " | ".join(f"N={r['n']}" for r in runs) + " |"
    rule = "|---|" + "---|" * len(runs)

    def row(label: str, cell: Callable[[dict[str, Any]], str]) -> str:
        return f"| {label} | " + " | ".join(cell(r) for r in runs) + " |"

    lines = [f"# Operator benchmark, {results['when']}", "",
             f"{results['machine']}; the local cluster (kwok nodes), every operator setting "
             "at its default; one-replica models. Wall-clock figures on a shared machine are "
             "indicative.", "", head, rule,
             row("**all Ready after the apply / limit**",
                 lambda r: f"**{_ratio(r['ready_s'], r.get('limit_ready_s'))}**"),
             row("all Ready after the apply", lambda r: f"{r['ready_s']:.1f} s"),
             row("limit: plain Deployments + Services all available",
                 lambda r: _s(r.get("limit_ready_s"))),
             row("`kubectl apply` itself: models / plain",
                 lambda r: f"{_s(r['apply_s'])} / {_s(r.get('limit_apply_s'))}"),
             row("all Ready after `kubectl apply` returned: models / plain",
                 lambda r: f"{_s(r['ready_s'] - r['apply_s'])} / "
                           f"{_s(_minus(r.get('limit_ready_s'), r.get('limit_apply_s')))}"),
             row("**version bump: all Stable / limit**",
                 lambda r: f"**{_ratio(r['bump_s'], r.get('limit_bump_s'))}**"),
             row("version bump: all Stable", lambda r: f"{r['bump_s']:.1f} s"),
             row("limit: plain Deployments rolled out", lambda r: _s(r.get("limit_bump_s"))),
             row("operator CPU per model: create / bump",
                 lambda r: f"{r['cpu_per_model_s'] * 1000:.0f} ms / "
                           f"{r['bump_cpu_per_model_s'] * 1000:.0f} ms"),
             row("operator RSS, peak (after create / overall)",
                 lambda r: f"{r['peak_rss_create_mb']:.0f} MB / {r['peak_rss_mb']:.0f} MB"),
             row("operator writes at rest (window)",
                 lambda r: f"{r['rest_writes']} in {r['rest_window_s']:.0f} s" + (
                     f" ({', '.join(f'{k}: {v}' for k, v in r['rest_writes_by_kind'].items())})"
                     if r["rest_writes"] else "")),
             row("operator CPU at rest", lambda r: f"{r['rest_cpu_pct']:.1f} %"),
             row("handler failures", lambda r: "; ".join(
                 f"{k}: {v}" for k, v in r["failures"].items()) or "0"),
             row("errors logged while the operator stops", lambda r: "; ".join(
                 f"{k}: {v}" for k, v in r.get("failures_at_stop", {}).items()) or "0"),
             ""]
    for r in runs:
        for phase in ("create", "rest"):
            found = r.get(f"profile_{phase}")
            if not found or not found.get("samples"):
                continue
            lines += [f"Profile of the operator, N={r['n']}, {phase} ({found['samples']} "
                      "samples at 50/s, threads on a CPU): by package "
                      + ", ".join(f"{k} {v} %" for k, v in found["by_package_pct"].items()),
                      "", "| function (inclusive) | share |", "|---|---|",
                      *(f"| `{k}` | {v} % |" for k, v in
                        list(found["top_inclusive_pct"].items())[:12]), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, action="append",
                        help="ModelDeployments per run (repeatable); default 100")
    parser.add_argument("--rest", type=float, default=AT_REST_S,
                        help="seconds of the at-rest window (default %(default)s)")
    parser.add_argument("--profile", action="store_true",
                        help="sample the operator with py-spy while it creates and at rest")
    parser.add_argument("--no-limit", action="store_true",
                        help="skip the no-operator limit (its cells then show —)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="modelyard-bench-operator-"))
    results: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}", "runs": []}
    for n in args.n or [100]:
        print(f"N={n}", flush=True)
        results["runs"].append(run_one(n, workdir, args.rest,
                                       workdir if args.profile else None,
                                       limit=not args.no_limit))
    text = render_markdown(results)
    print("\n" + text)
    print(f"operator logs: {workdir}")
    sizes = "-".join(str(r["n"]) for r in results["runs"])
    write_results(args.out, f"operator-{sizes}", results, text)


if __name__ == "__main__":
    main()

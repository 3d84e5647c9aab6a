"""The activator's own cost per relayed token (issue #11), without a cluster.

    .venv/bin/python -m bench.activator [--rounds 2] [--activator NAME=SOURCE ...]

The synthetic stream server (``bench/llm_sse.py``: the first token after 20 ms, then one
every 10 ms, exact limits, next to no CPU) on loopback, hit by ``bench/llm_load.py``
(streamed completions of ``max_tokens`` tokens, closed loop) at concurrency 1, 8 and 32,
directly and through the real activator: its ``main`` with its real settings on uvicorn,
as in production, in a process of its own whose pod lookups are played (one ready pod:
the synthetic server; ``Host: synthetic.bench.svc``). The paths are interleaved round by
round; the activator's CPU time is read from ``/proc`` over each window (warm-up
included) and given per relayed token and as a share of one core.

``--activator NAME=SOURCE`` adds another activator to compare, side by side in the same
run: SOURCE is a git revision (``HEAD``: the committed activator against the working
tree's) or a folder holding an ``activator/`` package; the rest of modelyard is the
working tree's. Nothing is asserted: a table is printed and written, with the windows,
to ``bench/results/activator-<date>.{md,json}``. The machine's cores are shared with
the client and the server (and whatever else runs: the load average is recorded).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from bench import llm_cluster, write_results
from bench.cluster import wait_for
from modelyard.operator.devcluster.ports import reserve_port

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
NAMESPACE = "bench"
HOST = f"{llm_cluster.SYNTHETIC}.{NAMESPACE}.svc"
TREE = "activator"  # the working tree's, always measured


def serve_static(argv: Sequence[str]) -> int:
    """In the activator's process: its ``main`` with the pod lookups played, one ready
    pod at ``127.0.0.1:argv[0]``; the rest of ``argv`` are its flags."""
    from modelyard.activator import server
    from modelyard.activator.discovery import Lookup
    from modelyard.activator.routing import Endpoint, ModelRef

    ready = [Endpoint("127.0.0.1", int(argv[0]))]

    class StaticPods:
        async def lookup(self, ref: ModelRef) -> Lookup:
            return Lookup(list(ready))

    server.load_api_client = lambda: None  # type: ignore[assignment]
    server.KubePods = lambda *_: StaticPods()  # type: ignore[assignment,misc]
    return server.main(argv[1:])


def import_root(name: str, source: str, workdir: Path) -> Path:
    """A folder to put first on ``PYTHONPATH``: ``modelyard.activator`` from ``source``
    (a git revision or a folder holding ``activator/``), the other packages the tree's."""
    folder = Path(source)
    if not (folder / "activator").is_dir():
        folder = workdir / f"src-{name}"
        folder.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", source, "activator"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    root = workdir / f"import-{name}"
    (root / "modelyard").mkdir(parents=True)
    for package in ("activator", "contract", "operator", "runtime"):
        target = folder / "activator" if package == "activator" else ROOT / package
        (root / "modelyard" / package).symlink_to(target.resolve(), target_is_directory=True)
    return root


@contextlib.contextmanager
def synthetic_server(port: int) -> Iterator[str]:
    server = subprocess.Popen(
        [sys.executable, "-m", "bench.llm_sse", "127.0.0.1", str(port),
         f"{llm_cluster.SYNTHETIC_FIRST_MS:g}", f"{llm_cluster.SYNTHETIC_INTERVAL_MS:g}"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: llm_cluster._listening("127.0.0.1", port), 30, "the synthetic server")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(10)


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of process ``pid`` onto ``cpus``."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(task.name), cpus)


def measure(args: argparse.Namespace, workdir: Path,
            progress: Any = print) -> dict[str, Any]:
    sources = dict(item.split("=", 1) for item in args.activator or [])
    port = reserve_port()
    cpus = sorted(os.sched_getaffinity(0))
    if args.pin:  # the activators on the last core; this process, server and client not
        os.sched_setaffinity(0, set(cpus[:-1]))
    with contextlib.ExitStack() as stack:
        direct = stack.enter_context(synthetic_server(port))
        activators: dict[str, llm_cluster.ActivatorProcess] = {}
        for name in [TREE, *sources]:
            env = {**os.environ}
            if name in sources:
                root = import_root(name, sources[name], workdir)
                env["PYTHONPATH"] = os.pathsep.join(
                    p for p in (str(root), env.get("PYTHONPATH")) if p)
            activators[name] = stack.enter_context(llm_cluster.activator_process(
                [sys.executable, "-m", "bench.activator", "_serve", str(port)], "127.0.0.1",
                workdir / f"{name}.log", env, cwd=ROOT))
        if args.pin:
            for process in activators.values():
                pin(process.process.pid, {cpus[-1]})
        paths: dict[str, tuple[str, str | None]] = {"direct": (direct, None)}
        paths |= {name: (process.url, HOST) for name, process in activators.items()}
        top = max(args.concurrency)
        for name, path in paths.items():  # connections, caches, the first imports
            progress(f"warming up {name}")
            llm_cluster.run_load(*path, concurrency=top, warmup_s=0, duration_s=2,
                                 max_tokens=args.max_tokens)
        plan = llm_cluster.LoadPlan(tuple(args.concurrency), args.rounds, args.warmup,
                                    args.duration, args.max_tokens)
        rows, windows = llm_cluster.compare(activators, NAMESPACE, paths, plan, progress)
    for row in rows:
        row["limit_tokens_per_s"] = llm_cluster.synthetic_limit(row["concurrency"],
                                                                args.max_tokens)
    return {"plan": vars(args) | {"activator": sources}, "rows": rows, "windows": windows}


def render_markdown(results: dict[str, Any]) -> str:
    plan = results["plan"]
    lines = [
        f"# The activator's own cost, {results['when']}", "",
        f"{results['machine']}; load average {results['loadavg'][0]:.2f} at the start, "
        f"{results['loadavg'][1]:.2f} at the end. Command: `{results['command']}`. "
        f"`bench/llm_sse.py` on loopback (first token {llm_cluster.SYNTHETIC_FIRST_MS:g} ms, "
        f"then one every {llm_cluster.SYNTHETIC_INTERVAL_MS:g} ms, {plan['max_tokens']} "
        f"tokens a request) directly and through each activator; {plan['rounds']} rounds of "
        f"{plan['warmup']:g} s warm-up + {plan['duration']:g} s per path and concurrency, "
        "interleaved. x limit: against the server's exact tokens/s; TTFT: request written "
        "→ first token read; CPU: the activator's process over its windows (warm-up "
        "included), as a share of one core and per relayed token."
        + (" **Pinned:** the activator alone on one core, the server and the client on "
           "the other(s)." if plan.get("pin") else ""), "",
        "| conc. | path | tokens/s | x limit | x direct (rounds) | TTFT p50 ms | added | "
        "TTFT p99 ms | CPU share | µs/token | requests (errors) |",
        "|---|---|---|---|---|---|---|---|---|---|---|"]
    shown: set[int] = set()
    for row in results["rows"]:
        c, d, a = row["concurrency"], row["direct"], row["activator"]
        limit = row["limit_tokens_per_s"]
        if c not in shown:
            shown.add(c)
            lines.append(f"| {c} | direct | {d['tokens_per_s']:.1f} | "
                         f"{d['tokens_per_s'] / limit:.3f} | 1 | {d['ttft_p50_ms']:.1f} | | "
                         f"{d['ttft_p99_ms']:.1f} | {d['activator_cpu_share']:.0%} (idle) | "
                         f"| {d['completed']} ({d['errors']}) |")
        rounds = row["tokens_ratio_rounds"]
        lines.append(
            f"| {c} | {row['path']} | {a['tokens_per_s']:.1f} | "
            f"{a['tokens_per_s'] / limit:.3f} | **{row['tokens_ratio']:.3f}** "
            f"({min(rounds):.3f}..{max(rounds):.3f}) | {a['ttft_p50_ms']:.1f} | "
            f"{row['ttft_p50_added_ms']:+.1f} | {a['ttft_p99_ms']:.1f} | "
            f"{a['activator_cpu_share']:.0%} | **{a['activator_cpu_us_per_token']:.0f}** | "
            f"{a['completed']} ({a['errors']}) |")
    errors = [f"{r['path']} c={r['concurrency']}: {r['activator']['first_error']}"
              for r in results["rows"] if r["activator"]["first_error"]]
    if errors:
        lines += ["", "First errors: " + "; ".join(errors)[:1000]]
    return "\n".join([*lines, ""])


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_serve"]:
        sys.exit(serve_static(argv[1:]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, action="append",
                        help="concurrency levels (repeatable; default 1, 8, 32)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=float, default=1.0, help="per window, s")
    parser.add_argument("--duration", type=float, default=5.0, help="per window, s")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--activator", action="append", metavar="NAME=SOURCE",
                        help="another activator to measure beside the tree's: a git "
                             "revision or a folder holding activator/ (repeatable)")
    parser.add_argument("--pin", action="store_true",
                        help="the activator alone on the last core, the server and the "
                             "client on the others, as on a cluster where it runs on its "
                             "own CPU (needs 2 or more)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.concurrency = args.concurrency or [1, 8, 32]
    if args.pin and len(os.sched_getaffinity(0)) < 2:
        parser.error("--pin needs at least 2 CPUs")
    started = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="modelyard-bench-activator-") as workdir:
        results = measure(args, Path(workdir), lambda line: print(line, flush=True))
    results |= {
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "command": " ".join([".venv/bin/python -m bench.activator", *argv]),
        "machine": f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}",
        "loadavg": [started, os.getloadavg()[0]]}
    results["plan"]["out"] = str(args.out)
    text = render_markdown(results)
    print("\n" + text)
    write_results(args.out, "activator", results, text)


if __name__ == "__main__":
    main()

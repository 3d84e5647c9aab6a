"""Weight-load throughput of a multi-GB model directory (part ``weights`` of ``bench.llm``).

A Llama-shaped model directory of about ``--weights-gb`` GB of float32 safetensors
shards (written here with numpy: the tensor names, shapes and index a Hugging Face
``LlamaForCausalLM`` checkpoint has, small random values, the tokenizer of the demo
model) is served over HTTP by ``python -m http.server`` (a process of its own) and
measured in one run:

* the limits: SHA-256 in memory (1 and 2 threads, the verifier's ceiling), the origin
  on loopback read by 4 ``curl`` at once into /dev/null (the download's ceiling), and the
  disk's own read rate of the cache entry's files with the page cache emptied of them
  (one sequential reader, and 4 readers at once as the verifier reads);
* modelyard's :func:`modelyard.runtime.modeldir.fetch_dir`, as the launcher calls it:
  the download into an empty node cache (download + verify), a cache hit with the files
  out of the page cache (re-verify from disk), a cache hit with them in it;
* optionally (``--vllm-load``) vLLM's own load of the cached copy, from its log
  ("Loading weights took"), run right after a verification as the launcher runs it.

The page cache is emptied of the benchmark's own files only (``fsync`` then
``posix_fadvise(DONTNEED)``, checked with ``fincore``), not system-wide: a global
``drop_caches`` would also slow every other job on a shared machine. ``--evict
drop-caches`` does that instead (root only).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from modelyard.operator.devcluster.ports import reserve_port
from modelyard.runtime import modeldir
from modelyard.runtime.storage import sha256_of

MB = 1e6
SHARD_BYTES = 512 * 2**20  # about; a tensor is never split
_READ = 8 * 2**20


# ============================================================================= the model


def llama_tensors(layers: int, hidden: int, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """The tensors of a Hugging Face LlamaForCausalLM (intermediate 2x hidden, as the demo
    model has), in checkpoint order."""
    inter = 2 * hidden
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (hidden,)),
                (p + "post_attention_layernorm.weight", (hidden,))]
        out += [(f"{p}self_attn.{n}_proj.weight", (hidden, hidden)) for n in "qkvo"]
        out += [(p + "mlp.gate_proj.weight", (inter, hidden)),
                (p + "mlp.up_proj.weight", (inter, hidden)),
                (p + "mlp.down_proj.weight", (hidden, inter))]
    return [*out, ("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]


def layers_for(gigabytes: float, hidden: int) -> int:
    per_layer = (4 * hidden * hidden + 3 * hidden * 2 * hidden) * 4
    return max(1, round(gigabytes * 1e9 / per_layer))


def build_big(dest: Path, tokenizer_from: Path, gigabytes: float,
              hidden: int = 2048) -> dict[str, Any]:
    """Write the directory (shards, index, config, tokenizer, SHA256SUMS); hash as it is
    written, so the manifest costs no second read. Every file is fsync'ed."""
    config = json.loads((tokenizer_from / "config.json").read_text())
    layers = layers_for(gigabytes, hidden)
    vocab = int(config["vocab_size"])
    heads = hidden // 128  # vLLM's CPU attention takes head sizes up to 256
    config |= {"hidden_size": hidden, "intermediate_size": 2 * hidden, "head_dim": 128,
               "num_hidden_layers": layers, "num_attention_heads": heads,
               "num_key_value_heads": heads}
    dest.mkdir(parents=True)
    entries: dict[str, str] = {}
    for item in sorted(tokenizer_from.iterdir()):
        if item.name not in ("config.json", "model.safetensors", modeldir.MANIFEST):
            shutil.copy(item, dest / item.name)
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    block = np.random.default_rng(0).normal(0, 0.02, 16 * 2**20).astype(np.float32)
    tensors = llama_tensors(layers, hidden, vocab)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensors:
        nbytes = 4 * int(np.prod(shape))
        if size and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    weight_map: dict[str, str] = {}
    total = 0
    for index, shard in enumerate(shards, start=1):
        fname = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        entries[fname] = _write_shard(dest / fname, shard, block)
        weight_map |= {name: fname for name, _ in shard}
        total += (dest / fname).stat().st_size
    (dest / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total - 8 * len(shards)}, "weight_map": weight_map},
        indent=2))
    for path in dest.iterdir():
        if path.name not in entries:
            entries[path.name] = sha256_of(path)
    (dest / modeldir.MANIFEST).write_text(modeldir.canonical(entries))
    for path in dest.iterdir():
        _fsync(path)
    return {"layers": layers, "hidden": hidden, "heads": heads, "vocab": vocab,
            "shards": len(shards), "tensors": len(tensors),
            "bytes": sum((dest / p).stat().st_size for p in entries),
            "digest": modeldir.digest(entries)}


def _write_shard(path: Path, shard: list[tuple[str, tuple[int, ...]]],
                 block: np.ndarray) -> str:
    """One safetensors file (8-byte header size, JSON header, raw little-endian data)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shard:
        nbytes = 4 * int(np.prod(shape))
        header[name] = {"dtype": "F32", "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    digest = hashlib.sha256()
    ones = np.ones(1, np.float32)
    with path.open("wb") as out:
        for piece in (len(text).to_bytes(8, "little"), text):
            out.write(piece)
            digest.update(piece)
        start = 0
        for name, shape in shard:
            count = int(np.prod(shape))
            norm = name.endswith("norm.weight")
            while count:
                take = min(count, block.size - start)
                data = np.resize(ones, take) if norm else block[start:start + take]
                raw = data.tobytes()
                out.write(raw)
                digest.update(raw)
                count -= take
                start = (start + take) % block.size
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ============================================================================ page cache


def files_of(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file())


def evict(paths: list[Path], how: str) -> str:
    """Empty the page cache of ``paths``; what was done, in words."""
    if how == "none":
        return "page cache left as it was"
    for path in paths:
        _fsync(path)
    if how == "drop-caches":
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "echo 3 > /proc/sys/vm/drop_caches (system-wide)"
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return "fsync + posix_fadvise(DONTNEED) of these files only"


def resident_share(paths: list[Path]) -> float | None:
    """The share of the files' bytes in the page cache (util-linux ``fincore``)."""
    if not shutil.which("fincore"):
        return None
    proc = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw",
                           "--output", "RES,SIZE", *map(str, paths)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return None
    resident = size = 0
    for line in proc.stdout.split("\n"):
        if line.strip():
            res, total = line.split()
            resident, size = resident + int(res), size + int(total)
    return resident / size if size else None


# ================================================================================ limits


def hash_rate(threads: int, megabytes: int = 256) -> float:
    """SHA-256 in memory, ``threads`` at once (hashlib releases the GIL), MB/s."""
    buffer = np.random.default_rng(1).integers(0, 255, megabytes * 2**20, np.uint8).tobytes()
    view = memoryview(buffer)
    step = 2**20

    def one() -> None:
        digest = hashlib.sha256()
        for at in range(0, len(view), step):
            digest.update(view[at:at + step])

    workers = [threading.Thread(target=one) for _ in range(threads)]
    began = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return threads * len(buffer) / MB / (time.perf_counter() - began)


def read_rate(paths: list[Path], readers: int) -> float:
    """Read the files to the end, ``readers`` files at once, 8 MiB reads; MB/s."""
    queue = list(paths)
    lock = threading.Lock()
    total = 0

    def reader() -> None:
        nonlocal total
        buffer = bytearray(_READ)
        while True:
            with lock:
                if not queue:
                    return
                path = queue.pop(0)
            count = 0
            with path.open("rb", buffering=0) as file:
                while n := file.readinto(buffer):
                    count += n
            with lock:
                total += count

    workers = [threading.Thread(target=reader) for _ in range(readers)]
    began = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return total / MB / (time.perf_counter() - began)


def wire_rate(base: str, names: list[str], parallel: int = 4) -> float:
    """The origin read by ``parallel`` curl processes at once into /dev/null; MB/s."""
    queue = list(names)
    total = 0
    began = time.perf_counter()
    running: list[subprocess.Popen[bytes]] = []
    while queue or running:
        while queue and len(running) < parallel:
            running.append(subprocess.Popen(
                ["curl", "-sS", "-f", "-o", "/dev/null", "-w", "%{size_download}",
                 base + queue.pop(0)], stdout=subprocess.PIPE))
        done = running.pop(0)
        out, _ = done.communicate()
        if done.returncode != 0:
            raise RuntimeError(f"curl failed ({done.returncode})")
        total += int(float(out or b"0"))
    return total / MB / (time.perf_counter() - began)


@contextlib.contextmanager
def origin(directory: Path, host: str = "127.0.0.1") -> Iterator[str]:
    """``python -m http.server`` serving ``directory``: its base URL."""
    port = reserve_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "http.server", "--bind", host, "--directory", str(directory),
         str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://{host}:{port}/"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                import urllib.request

                with urllib.request.urlopen(base, timeout=1):
                    break
            time.sleep(0.05)
        yield base
    finally:
        process.terminate()
        process.wait(10)


# ================================================================================= vLLM


def vllm_load(python: Path, model: Path, log_path: Path, env: dict[str, str],
              timeout: float) -> dict[str, Any]:
    """vLLM on ``model`` until it reports its weight load; stopped right after."""
    from modelyard.operator.devcluster import llm

    port = reserve_port()
    argv = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
            "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
            "--max-model-len", "256", "--enforce-eager", "--max-num-seqs", "4"]
    began = time.monotonic()
    with log_path.open("wb") as out:
        process = subprocess.Popen(argv, env={**os.environ, **env,
                                              "PYTHONPATH": str(llm.IMPORT_ROOT)},
                                   stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    found: dict[str, Any] = {}
    try:
        while time.monotonic() - began < timeout and process.poll() is None:
            text = log_path.read_text(errors="replace")
            if m := re.search(r"Loading weights took ([0-9.]+) seconds", text):
                found["load_weights_s"] = float(m.group(1))
                found["spawn_to_loaded_s"] = time.monotonic() - began
            if m := re.search(r"Model loading took ([0-9.]+) GiB memory and ([0-9.]+) seconds",
                              text):
                found["model_loading_gib"] = float(m.group(1))
                found["model_loading_s"] = float(m.group(2))
            if "load_weights_s" in found and "model_loading_s" in found:
                break
            time.sleep(0.2)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, 15)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait(10)
    if "load_weights_s" not in found:
        tail = log_path.read_text(errors="replace")[-1500:]
        found["error"] = f"no 'Loading weights took' line (exit {process.returncode}): {tail}"
    return found


# ================================================================================== part


def weights_part(workdir: Path, tiny: Path, *, gigabytes: float, how: str,
                 vllm: dict[str, Any] | None) -> dict[str, Any]:
    """Everything above, in one run; ``vllm`` (python, env, lock) adds vLLM's own load."""
    root = workdir / "weights"
    model = root / "origin" / "big"
    print(f"weights: writing a ~{gigabytes:g} GB float32 Llama directory", flush=True)
    began = time.perf_counter()
    built = build_big(model, tiny, gigabytes)
    built["write_s"] = time.perf_counter() - began
    size = built["bytes"]
    print(f"  {size / 1e9:.2f} GB in {built['shards']} shards, {built['layers']} layers, "
          f"written and hashed in {built['write_s']:.1f} s", flush=True)
    out: dict[str, Any] = {"model": built, "evict": how}
    limits: dict[str, Any] = {"sha256_1_thread_mb_s": hash_rate(1),
                              "sha256_2_threads_mb_s": hash_rate(2)}
    cache = modeldir.NodeCache(root / "node-cache")
    with origin(root / "origin") as base:
        uri = base + "big/"
        names = [p.relative_to(model).as_posix() for p in files_of(model)]
        limits["origin_4_curl_mb_s"] = wire_rate(uri, names)
        print(f"  limits: sha256 {limits['sha256_1_thread_mb_s']:.0f} MB/s (1 thread), "
              f"{limits['sha256_2_threads_mb_s']:.0f} MB/s (2); origin by 4 curl "
              f"{limits['origin_4_curl_mb_s']:.0f} MB/s", flush=True)
        runs: dict[str, Any] = {}
        runs["download"] = _fetch(uri, cache, built["digest"])
        print(f"  download + verify: {runs['download']['mb_s']:.0f} MB/s", flush=True)
    entry = cache.entry(built["digest"])
    files = files_of(entry)
    for readers in (1, 4):
        done = evict(files, how)
        before = resident_share(files)
        limits[f"disk_read_{readers}_cold_mb_s"] = read_rate(files, readers)
        limits[f"disk_read_{readers}_resident_before"] = before
        out["evicted_with"] = done
    print(f"  disk read, out of the page cache: {limits['disk_read_1_cold_mb_s']:.0f} MB/s "
          f"(1 reader), {limits['disk_read_4_cold_mb_s']:.0f} MB/s (4)", flush=True)
    evict(files, how)
    before = resident_share(files)
    runs["hit_cold"] = _fetch(uri, cache, built["digest"]) | {"resident_before": before}
    runs["hit_warm"] = _fetch(uri, cache, built["digest"]) | {
        "resident_before": resident_share(files)}
    print(f"  cache hit: {runs['hit_cold']['mb_s']:.0f} MB/s out of the page cache, "
          f"{runs['hit_warm']['mb_s']:.0f} MB/s in it", flush=True)
    out |= {"limits": limits, "runs": runs}
    if vllm is not None:
        print("  vLLM's own load of the verified copy (waiting for the vLLM lock)", flush=True)
        with vllm["lock"]() as waited:
            _fetch(uri, cache, built["digest"])  # as the launcher: verify, then load
            out["vllm"] = vllm_load(vllm["python"], entry, workdir / "vllm-big.log",
                                    vllm["env"], timeout=vllm["timeout"]) | {
                "lock_wait_s": waited}
        if "load_weights_s" in out["vllm"]:
            out["vllm"]["mb_s"] = size / MB / out["vllm"]["load_weights_s"]
            print(f"  vLLM loaded the weights in {out['vllm']['load_weights_s']:.2f} s "
                  f"({out['vllm']['mb_s']:.0f} MB/s)", flush=True)
        else:
            print(f"  vLLM: {out['vllm']['error'][:300]}", flush=True)
    shutil.rmtree(root, ignore_errors=True)  # gigabytes: do not leave them behind
    return out


def _fetch(uri: str, cache: modeldir.NodeCache, digest: str) -> dict[str, Any]:
    began = time.perf_counter()
    with modeldir.fetch_dir(uri, cache, digest) as fetched:
        seconds = time.perf_counter() - began
        return {"source": fetched.source, "bytes": fetched.bytes,
                "downloaded": fetched.downloaded, "seconds": seconds,
                "mb_s": fetched.bytes / MB / seconds}
